"""Self-contained HTML drift report: tables and charts, no script, no external assets.

Contract: :func:`render_html` ``(results, history) -> str`` where ``results`` are
:class:`monitoring.drift.DriftResult` (one per version) and ``history`` maps a
version to ``[(created_at, overall score), ...]`` from ``drift_reports``. The
page holds, per version, the statistics table, reference vs production
histograms of prompt and response length (shares per bin) and the overall drift
score over time with the threshold as a dashed rule, then the top new words.
Charts come from :mod:`tuneloop.monitoring.charts` (Vega-Lite rendered to inline
SVG offline), each an ``<svg role="img" aria-label="TITLE">``. No database
access: the caller reads ``history`` (portable SQL, either backend).
"""

from __future__ import annotations

import html
import itertools
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from tuneloop.monitoring import charts
from tuneloop.monitoring.drift import DriftResult

#: the two series of every histogram, and the title of the drift-over-time chart
REFERENCE, PRODUCTION = "reference (training data)", "production"
TIMELINE_TITLE = "overall drift score over time"

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f4f4f4}.drifted{color:#b00;font-weight:bold}
.ok{color:#070}svg{margin:.5em 1em .5em 0;vertical-align:top}"""


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def _bin_labels(edges: Sequence[float], n: int) -> list[str]:
    """Labels of the ``n`` bins that ``edges`` cut: ``≤a``, ``a–b``, ..., ``>z`` (``all`` without edges)."""
    labels = (
        ["≤" + _fmt(edges[0])]
        + [f"{_fmt(a)}–{_fmt(b)}" for a, b in itertools.pairwise(edges)]
        + [">" + _fmt(edges[-1])]
        if len(edges)
        else ["all"]
    )
    return labels[:n] + [str(i) for i in range(len(labels), n)]


def _when(t: Any, iso: bool) -> str:
    """A history timestamp: ISO 8601 for a time axis (what Vega parses), else to the second for a label."""
    if isinstance(t, datetime):
        return t.isoformat() if iso else t.isoformat(sep=" ", timespec="seconds")
    return t.isoformat() if hasattr(t, "isoformat") else str(t)


def _histogram(title: str, edges: Sequence[float], ref: Sequence[float], prod: Sequence[float]) -> str:
    """Reference vs production shares per bin, side by side, as an SVG chart titled ``title``."""
    labels = _bin_labels(edges, max(len(ref), len(prod)))
    chart = charts.paired_bars(labels, {REFERENCE: list(ref), PRODUCTION: list(prod)}, title=title, width=340)
    return charts.svg(chart)


def _timeline(points: Sequence[tuple[Any, float]], threshold: float) -> str:
    """Overall drift score per stored computation, with the threshold as a dashed rule, as an SVG chart: on a
    time axis once there are two or more times (one point alone on a time axis gets a sub-second tick label)."""
    temporal = len({t for t, _ in points}) > 1 and all(hasattr(t, "isoformat") for t, _ in points)
    rows = [{"computed at": _when(t, temporal), "overall score": float(v)} for t, v in points]
    chart = charts.line(
        rows,
        "computed at",
        "overall score",
        title=TIMELINE_TITLE,
        threshold=threshold,
        x_type="temporal" if temporal else "ordinal",
        width=340,
    )
    return charts.svg(chart)


def render_html(results: Sequence[DriftResult], history: Mapping[str, Sequence[tuple[Any, float]]]) -> str:
    out = [
        "<!doctype html><html><head><meta charset='utf-8'><title>tuneloop drift report</title>",
        f"<style>{_CSS}</style></head><body><h1>Drift report</h1>",
    ]
    if not results:
        out.append("<p>No model version had traffic in the window.</p>")
    for r in results:
        verdict = "skipped" if r.skipped else ("DRIFTED" if r.drifted else "no drift")
        out.append(
            f'<section class="version" id="v-{html.escape(r.model_version)}"><h2>{html.escape(r.model_version)} — '
            f'<span class="{"drifted" if r.drifted else "ok"}">{verdict}</span></h2>'
            f"<p>window {html.escape(r.window)} ({_fmt(r.window_start)} – {_fmt(r.window_end)}), {r.n_requests} requests; "
            f"overall score {_fmt(r.score)} (threshold {_fmt(r.threshold)})</p>"
        )
        if r.skipped:
            out.append(f"<p>{html.escape(r.skipped)}</p></section>")
            continue
        out.append(
            "<table class='stats'><tr><th>feature</th><th>statistic</th><th>value</th><th>threshold</th><th>drifted</th></tr>"
        )
        for f in r.features:
            out.append(
                f"<tr><td>{f.feature}</td><td>{f.statistic}</td><td>{_fmt(f.value)}</td><td>{_fmt(f.threshold)}</td>"
                f"<td class='{'drifted' if f.drifted else 'ok'}'>{'yes' if f.drifted else 'no'}</td></tr>"
            )
        out.append("</table><div>")
        for name, hgm in r.histograms.items():
            out.append(
                _histogram(
                    name.replace("_psi", "").replace("_", " ")
                    + (" (highest probability)" if name.startswith("confidence") else " (tokens)"),
                    hgm["edges"],
                    hgm["reference"],
                    hgm["production"],
                )
            )
        out.append(_timeline(history.get(r.model_version, []), r.threshold))
        out.append("</div>")
        if r.new_words:
            out.append(
                "<h3>Top new words (not in the training vocabulary)</h3><table class='words'><tr><th>word</th><th>count</th></tr>"
                + "".join(f"<tr><td>{html.escape(w)}</td><td>{c}</td></tr>" for w, c in r.new_words)
                + "</table>"
            )
        out.append("</section>")
    out.append("</body></html>")
    return "".join(out)
