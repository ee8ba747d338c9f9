"""`tuneloop drift report` as a user runs it: a table on the terminal, drift rows stored, and an HTML report
that headless Chromium lays out and paints with its histograms, timeline and statistics."""

from __future__ import annotations

import html
import json
import os
import re
import signal
import subprocess

import numpy as np
from conftest import require_tool
from PIL import Image
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
    chromium = require_tool("chromium")
    value = f"{stored[0]['value']:.4g}"

    # layout: a test-only copy of the page with a script that writes every plot's laid-out box into the DOM;
    # pixels: a screenshot of the page itself
    probe = tmp_path / "drift-probe.html"
    probe.write_text(out.read_text().replace("</body>", _LAYOUT_PROBE + "</body>"))
    png = tmp_path / "drift.png"
    dom, dom_err = _chromium(chromium, tmp_path / "chrome-dom", "--dump-dom", probe.as_uri())
    _, shot_err = _chromium(
        chromium, tmp_path / "chrome-png", f"--screenshot={png}", "--window-size=1280,1600", out.as_uri()
    )
    assert dom.count('class="hist"') == 2 and 'class="timeline"' in dom and "<rect" in dom, dom_err[-3000:]
    assert "chat-v1" in dom and "Top new words" in dom and value in dom
    boxes = json.loads(html.unescape(re.search(r'<pre id="layout">(.*?)</pre>', dom, re.S).group(1)))
    assert [b["cls"] for b in boxes] == ["hist", "hist", "timeline"], boxes
    for b in boxes:  # each plot is laid out at the size the report gives it, inside the page
        assert b["w"] >= 400 and b["h"] >= 150 and b["x"] >= 0 and b["y"] > 0, b
        assert b["bars"] + b["marks"] > 0, b  # and holds drawn marks (bars / the threshold line)
    assert sum(b["bars"] for b in boxes if b["cls"] == "hist") > 0 and max(b["bars_h"] for b in boxes) > 0

    # the screenshot is not blank and shows the orange production bars and grey reference bars
    assert png.exists(), shot_err[-3000:]
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert img.shape == (1600, 1280, 3)
    non_white = float((img.min(axis=2) < 240).mean())
    colours = len(np.unique(img.reshape(-1, 3), axis=0))
    orange = int((np.abs(img - (0xE6, 0x7E, 0x22)).max(axis=2) <= 12).sum())
    grey = int((np.abs(img - (0x99, 0x99, 0x99)).max(axis=2) <= 12).sum())
    # (measured: ~4% non-white, ~500 colours, ~11k orange and ~14k grey pixels; a blank page has 0, 1, 0, 0)
    assert non_white > 0.02 and colours > 50, (non_white, colours)
    assert orange > 2000 and grey > 2000, (orange, grey)


_LAYOUT_PROBE = """<pre id="layout"></pre><script>
document.getElementById("layout").textContent = JSON.stringify(
  [...document.querySelectorAll("svg")].map(s => {
    const r = s.getBoundingClientRect();
    const bars = [...s.querySelectorAll("rect")].map(e => e.getBoundingClientRect());
    return {cls: s.getAttribute("class"), x: r.x, y: r.y, w: r.width, h: r.height,
            bars: bars.filter(b => b.width > 0).length, bars_h: Math.max(0, ...bars.map(b => b.height)),
            marks: s.querySelectorAll("line, polyline, circle").length};
  }));
</script>"""


def _chromium(exe: str, profile, *args: str, timeout_s: float = 45) -> tuple[str, str]:
    """Run headless Chromium; its (stdout, stderr). A browser that hangs (seen once under heavy machine load,
    never on this page's content) is killed with its whole process group and run once more."""
    for attempt in (1, 2):
        proc = subprocess.Popen(
            [
                exe,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--hide-scrollbars",
                "--run-all-compositor-stages-before-draw",
                "--virtual-time-budget=5000",
                f"--user-data-dir={profile}-{attempt}",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            return proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    raise AssertionError(f"chromium {' '.join(args)} hung twice for {timeout_s} s")


def test_bad_window_and_unknown_version_are_clear_errors(cli, db):
    r = cli("drift", "report", "--window", "soon", check=False)
    assert r.returncode == 2 and "error: bad window" in r.stderr and "Traceback" not in r.stderr
    r = cli("drift", "profile", "nope", check=False)
    assert r.returncode == 2 and "unknown model version 'nope'" in r.stderr
