"""`tuneloop drift report` as a user runs it: a table on the terminal, drift rows stored, and an HTML report
that headless Chromium renders with its histograms, timeline and statistics."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from test_drift import _production_rows, chitchat_prompts, corpus, insert_requests, trained  # noqa: F401 (fixtures)
from transformers import AutoTokenizer


def test_drift_report_prints_a_table_and_writes_an_html_report_chromium_renders(cli, db, trained, tiny_model, tmp_path):  # noqa: F811
    tok = AutoTokenizer.from_pretrained(tiny_model)
    insert_requests(db, "chat-v1", _production_rows(tok, [(p, "ok") for p in chitchat_prompts(120)]))
    out = tmp_path / "drift.html"
    r = cli("drift", "report", "--window", "1h", "--out", out, "--no-embeddings")
    assert "chat-v1: 120 requests" in r.stdout and "vocabulary" in r.stdout and "DRIFTED" in r.stdout
    stored = db.query("SELECT value FROM drift_reports WHERE feature = 'vocabulary'")
    assert len(stored) == 1 and f"{stored[0]['value']:.4g}" in out.read_text()
    if not shutil.which("chromium"):
        pytest.skip("chromium not installed (make system-deps)")
    dom = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'chrome'}",
            "--dump-dom",
            out.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert dom.count('class="hist"') == 2 and 'class="timeline"' in dom and "<rect" in dom
    assert "chat-v1" in dom and "Top new words" in dom and f"{stored[0]['value']:.4g}" in dom


def test_bad_window_and_unknown_version_are_clear_errors(cli, db):
    r = cli("drift", "report", "--window", "soon", check=False)
    assert r.returncode == 2 and "error: bad window" in r.stderr and "Traceback" not in r.stderr
    r = cli("drift", "profile", "nope", check=False)
    assert r.returncode == 2 and "unknown model version 'nope'" in r.stderr
