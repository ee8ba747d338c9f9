"""Self-contained HTML drift report (inline SVG, no plotting dependency).

Contract: :func:`render_html` ``(results, history) -> str`` where ``results`` are
:class:`monitoring.drift.DriftResult` (one per version) and ``history`` maps a
version to ``[(created_at, overall score), ...]`` from ``drift_reports``. The
page holds, per version, the statistics table, reference vs production
histograms of prompt and response length (``<svg class="hist">``), drift over
time (``<svg class="timeline">``) and the top new words. No external assets.
No database access: the caller reads ``history`` (portable SQL, either backend).
"""

from __future__ import annotations

import html
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from tuneloop.monitoring.drift import DriftResult

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f4f4f4}.drifted{color:#b00;font-weight:bold}
.ok{color:#070}svg{background:#fafafa;border:1px solid #ddd;margin:.5em 1em .5em 0}.legend{font-size:.85em}"""


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def svg_histogram(
    title: str, edges: Sequence[float], ref: Sequence[float], prod: Sequence[float], w: int = 420, h: int = 180
) -> str:
    """Side-by-side bars per bin: reference (grey) vs production (orange), shares of each sample."""
    n = len(ref)
    top = max([*ref, *prod, 1e-9])
    bw = (w - 40) / max(n, 1)
    parts = [
        f'<svg class="hist" width="{w}" height="{h + 40}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="5" y="14" font-size="12">{html.escape(title)}</text>',
    ]
    labels = (
        ["≤" + _fmt(edges[0])]
        + [f"{_fmt(a)}–{_fmt(b)}" for a, b in itertools.pairwise(edges)]
        + [">" + _fmt(edges[-1])]
        if len(edges)
        else ["all"]
    )
    for i in range(n):
        for j, (vals, color) in enumerate(((ref, "#999"), (prod, "#e67e22"))):
            bh = (h - 30) * vals[i] / top
            x = 30 + i * bw + j * bw / 2
            parts.append(
                f'<rect class="{"ref" if j == 0 else "prod"}" x="{x:.1f}" y="{h - bh:.1f}" width="{bw / 2 - 1:.1f}" '
                f'height="{bh:.1f}" fill="{color}"><title>{labels[i] if i < len(labels) else i}: {vals[i]:.3f}</title></rect>'
            )
        if i < len(labels):
            parts.append(f'<text x="{30 + i * bw:.1f}" y="{h + 14}" font-size="8">{html.escape(labels[i])}</text>')
    parts.append(
        f'<text class="legend" x="30" y="{h + 34}" font-size="10" fill="#666">grey: reference (training data) · orange: production</text></svg>'
    )
    return "".join(parts)


def svg_timeline(points: Sequence[tuple[Any, float]], threshold: float, w: int = 420, h: int = 160) -> str:
    """Overall drift score per computation, with the threshold line."""
    parts = [
        f'<svg class="timeline" width="{w}" height="{h}" role="img" aria-label="drift over time">',
        '<text x="5" y="14" font-size="12">overall drift score over time</text>',
    ]
    top = max([threshold, *[p[1] for p in points], 1e-9]) * 1.1

    def y(v: float) -> float:
        return h - 10 - (h - 30) * v / top

    parts.append(
        f'<line x1="30" x2="{w - 5}" y1="{y(threshold):.1f}" y2="{y(threshold):.1f}" stroke="#b00" stroke-dasharray="4"/>'
    )
    if points:
        step = (w - 40) / max(len(points) - 1, 1)
        xy = [(30 + i * step, y(v)) for i, (_, v) in enumerate(points)]
        parts.append(
            '<polyline fill="none" stroke="#2c7be5" stroke-width="2" points="'
            + " ".join(f"{a:.1f},{b:.1f}" for a, b in xy)
            + '"/>'
        )
        for (a, b), (t, v) in zip(xy, points):
            parts.append(
                f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="#2c7be5"><title>{html.escape(str(t))}: {v:.3f}</title></circle>'
            )
    parts.append("</svg>")
    return "".join(parts)


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
                svg_histogram(
                    name.replace("_psi", "").replace("_", " ")
                    + (" (highest probability)" if name.startswith("confidence") else " (tokens)"),
                    hgm["edges"],
                    hgm["reference"],
                    hgm["production"],
                )
            )
        out.append(svg_timeline(history.get(r.model_version, []), r.threshold))
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
