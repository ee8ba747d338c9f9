"""`tuneloop drift report` as a user runs it: a table on the terminal, drift rows stored, and an HTML report
that headless Chromium lays out and paints with its histograms, timeline and statistics (charts from
``tuneloop.monitoring.charts``: Vega-Lite rendered to inline SVG)."""

from __future__ import annotations

import html
import json
import os
import re
import signal
import subprocess
from datetime import datetime

import numpy as np
from conftest import require_tool
from PIL import Image
from test_drift import _production_rows, chitchat_prompts, corpus, insert_requests, trained  # noqa: F401 (fixtures)
from transformers import AutoTokenizer

from tuneloop.monitoring.charts import PRODUCTION, REFERENCE, THRESHOLD
from tuneloop.monitoring.drift import DriftResult, FeatureResult
from tuneloop.monitoring.report import TIMELINE_TITLE, render_html


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
    # one chart per histogram and one for the score over time, each an <svg role="img"> named by its title
    assert re.findall(r'<svg role="img" aria-label="([^"]*)"', dom) == CHARTS, dom_err[-3000:]
    assert "chat-v1" in dom and "Top new words" in dom and value in dom
    boxes = json.loads(html.unescape(re.search(r'<pre id="layout">(.*?)</pre>', dom, re.S).group(1)))
    assert [b["label"] for b in boxes] == CHARTS and [b["title"] for b in boxes] == [[t] for t in CHARTS], boxes
    for b in boxes:  # each chart is laid out at the size the report gives it, inside the page
        assert b["role"] == "img" and (b["w"], b["h"]) == (b["aw"], b["ah"]), b  # not squeezed or stretched
        assert b["w"] >= 340 and b["h"] >= 150 and b["x"] >= 0 and b["y"] > 0, b
    hists, timeline = boxes[:2], boxes[2]
    for b in hists:  # reference vs production bars with a height, under the bin labels the report built
        assert b["bars"] > 0 and b["bars_h"] > 0 and b["legend"] == ["reference (training data)", "production"], b
        assert b["axis"][0].startswith("≤") and any(a.startswith(">") for a in b["axis"]), b
    # the score over time: one point per stored computation (one so far) and the threshold as a red rule
    overall = db.query("SELECT count(*) AS n FROM drift_reports WHERE feature = 'overall'")[0]["n"]
    assert timeline["lines"] == 1 and timeline["points"] == overall == 1, timeline
    assert timeline["rules"] == [THRESHOLD], timeline
    assert re.search(r"overall score [0-9.]+ \(threshold [0-9.]+\)", dom)

    # the screenshot is not blank and shows the blue reference bars and the orange production bars
    assert png.exists(), shot_err[-3000:]
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert img.shape == (1600, 1280, 3)
    non_white = float((img.min(axis=2) < 240).mean())
    colours = len(np.unique(img.reshape(-1, 3), axis=0))
    blue = int((np.abs(img - _rgb(REFERENCE)).max(axis=2) <= 12).sum())
    orange = int((np.abs(img - _rgb(PRODUCTION)).max(axis=2) <= 12).sum())
    # (measured: ~4% non-white, ~600 colours, ~9k blue and ~9k orange pixels; a blank page has 0, 1, 0, 0)
    assert non_white > 0.02 and colours > 50, (non_white, colours)
    assert blue > 2000 and orange > 2000, (blue, orange)


def test_render_html_labels_each_histograms_bins_and_draws_the_threshold():
    """Without a model: the page built from a DriftResult names its bins ≤a, a–b, >b and draws the threshold rule."""
    edges = [4.0, 8.0, 16.0]
    result = DriftResult(
        id="r1",
        model_version="chat-v1",
        window="1h",
        window_start=datetime(2025, 1, 1, 9),
        window_end=datetime(2025, 1, 1, 10),
        n_requests=50,
        features=[FeatureResult("prompt_length_psi", "psi", 0.31, 0.2, True)],
        score=0.31,
        threshold=0.2,
        drifted=True,
        histograms={
            "prompt_length_psi": {"edges": edges, "reference": [0.1, 0.4, 0.3, 0.2], "production": [0, 0.1, 0.3, 0.6]}
        },
    )
    history = {"chat-v1": [(datetime(2025, 1, 1, 9 + i), v) for i, v in enumerate([0.05, 0.12, 0.31])]}
    page = render_html([result], history)
    svgs = re.findall(r'<svg role="img" aria-label="([^"]*)".*?</svg>', page, re.S)
    assert svgs == ["prompt length (tokens)", "overall drift score over time"]
    hist, timeline = re.findall(r'<svg role="img".*?</svg>', page, re.S)
    assert "X-axis for a discrete scale with 4 values: ≤4, 4–8, 8–16, &gt;16" in hist
    assert "reference (training data)" in hist and "production" in hist
    assert f'stroke="{THRESHOLD}"' in timeline and "stroke-dasharray" in timeline  # the dashed threshold rule
    assert timeline.count('role="graphics-symbol" aria-roledescription="point"') == 3  # one per stored score
    assert "overall score 0.31 (threshold 0.2)" in page and "<script" not in page


def test_a_single_stored_score_is_plotted_at_its_time_to_the_second():
    result = DriftResult("r1", "chat-v1", "1h", None, None, 50, [], 0.31, 0.2, True)
    page = render_html([result], {"chat-v1": [(datetime(2025, 1, 1, 9, 30, 5, 123456), 0.31)]})
    (timeline,) = re.findall(r'<svg role="img" aria-label="overall drift score over time".*?</svg>', page, re.S)
    assert ">2025-01-01 09:30:05</text>" in timeline and f'stroke="{THRESHOLD}"' in timeline
    assert timeline.count('aria-roledescription="point"') == 1


CHARTS = ["prompt length (tokens)", "response length (tokens)", TIMELINE_TITLE]


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return int(hex_colour[1:3], 16), int(hex_colour[3:5], 16), int(hex_colour[5:7], 16)


_LAYOUT_PROBE = """<pre id="layout"></pre><script>
document.getElementById("layout").textContent = JSON.stringify(
  [...document.querySelectorAll("svg")].map(s => {
    const r = s.getBoundingClientRect();
    const bars = [...s.querySelectorAll(".mark-rect.role-mark path")].map(e => e.getBoundingClientRect());
    const texts = sel => [...s.querySelectorAll(sel)].map(t => t.textContent);
    return {label: s.getAttribute("aria-label"), role: s.getAttribute("role"), x: r.x, y: r.y, w: r.width, h: r.height,
            aw: +s.getAttribute("width"), ah: +s.getAttribute("height"),
            bars: bars.filter(b => b.width > 0 && b.height > 0).length, bars_h: Math.max(0, ...bars.map(b => b.height)),
            points: s.querySelectorAll(".mark-symbol.role-mark path").length,
            lines: s.querySelectorAll(".mark-line.role-mark path").length,
            rules: [...s.querySelectorAll(".mark-rule.role-mark line")].map(l => l.getAttribute("stroke")),
            title: texts(".role-title-text text"), axis: texts(".role-axis-label text"),
            legend: texts(".role-legend-label text")};
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
