"""The demo's record and its report: a summary table on stdout, ``summary.json`` and ``report.html``.

Contract
--------
* :class:`DemoState` is what a demo run records as it goes: stage timings, notes,
  versions (dataset, training metrics, run id), gate verdicts, traffic and drift
  per phase, the sampled dataset, the canary decision and what was promoted.
* :func:`finish` prints the model-versions table (stage, dataset, eval loss,
  token F1, gate verdict, CI lower bound) and the totals (requests served,
  feedback, what training used, promotion, drift), then writes ``summary.json``
  and ``report.html`` into the output folder.
* :func:`write_report` renders a summary as one HTML file with inline SVG bar
  charts (no plotting dependency): gates, simulated feedback and answer F1 per
  phase and serving version, the canary's arms, drift statistics, stage durations.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneloop.db import Database


@dataclass
class DemoState:
    started: float = field(default_factory=time.monotonic)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    gates: dict[str, dict[str, Any]] = field(default_factory=dict)
    traffic: dict[str, dict[str, Any]] = field(default_factory=dict)
    drift: dict[str, dict[str, Any]] = field(default_factory=dict)
    sample: dict[str, Any] = field(default_factory=dict)
    canary: dict[str, Any] = field(default_factory=dict)
    promoted: str | None = None


def finish(db: Database, st: DemoState, out: Path) -> Path:
    """Print the summary, write ``summary.json`` and ``report.html`` into ``out``; the report's path."""
    from tuneloop.registry import list_versions
    from tuneloop.table import print_table

    total = time.monotonic() - st.started
    versions = list_versions(db)
    print()
    rows = []
    for v in versions:
        g = st.gates.get(v.name) or {}
        q = next((c for c in g.get("checks", []) if c["name"] == "quality"), None)
        summ = g.get("extra", {}).get("summary") or {}
        mine = next(iter(summ.values()), None) or {}
        rows.append(
            [
                v.name,
                v.stage,
                v.dataset_id or "-",
                fmt_num(mine.get("loss")),
                fmt_num(mine.get("token_f1")),
                ("passed" if g.get("passed") else "failed") if g else "-",
                fmt_num(q["value"]) if q else "-",
            ]
        )
    print_table(
        ["version", "stage", "dataset", "eval loss", "token F1", "gate", "CI low"], rows, title="model versions"
    )
    n = db.query("SELECT count(*) AS n FROM requests")[0]["n"]
    f = db.query("SELECT count(*) AS n, count(correction) AS c FROM feedback")[0]
    print(
        f"\nrequests served: {n}; feedback: {f['n']} ({f['c']} corrections); "
        f"used in training: {st.sample.get('card', {}).get('origins', {})}"
    )
    if st.promoted:
        why = "; ".join(st.canary.get("reasons", [])) if st.canary else "gate passed"
        print(f"promoted: {st.promoted} ({why})")
    for k in ("before", "after"):
        if st.drift.get(k):
            print(f"drift {k}: {drift_line(st.drift[k])}")
    for note in st.notes:
        print(f"note: {note}")
    summary = {
        "total_s": round(total, 1),
        "timings_s": st.timings,
        "versions": st.versions,
        "gates": st.gates,
        "traffic": st.traffic,
        "drift": st.drift,
        "sample": st.sample,
        "canary": st.canary,
        "promoted": st.promoted,
        "requests": n,
        "feedback": f,
        "notes": st.notes,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    write_report(out / "report.html", summary)
    print(f"\nreport: {out / 'report.html'}  (total {total / 60:.1f} min)")
    return out / "report.html"


def fmt_num(v: object) -> str:
    """A number in 4 significant digits, ``-`` for None."""
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def drift_line(d: dict[str, Any]) -> str:
    """Drift statistics of one measurement on one line (``feature value (drifted)``)."""
    feats: dict[str, Any] = d["features"] if isinstance(d.get("features"), dict) else d
    parts = []
    for k, v in feats.items():
        if isinstance(v, dict) and "value" in v:
            parts.append(f"{k} {fmt_num(v['value'])}{' (drifted)' if v.get('drifted') else ''}")
    return ", ".join(parts) or json.dumps(d, default=str)[:200]


# ---- HTML report (inline SVG, no plotting dependency) ----------------------------------------------


def _bars(title: str, items: list[tuple[str, float]], fmt: str = "{:.3g}", threshold: float | None = None) -> str:
    """A horizontal bar chart as inline SVG."""
    from html import escape

    if not items:
        return ""
    w, row, left = 640, 24, 220
    top = max([v for _, v in items] + [threshold or 0, 1e-9])
    h = row * len(items) + 30
    out = [f'<h3>{escape(title)}</h3><svg width="{w}" height="{h}" role="img" aria-label="{escape(title)}">']
    for i, (label, v) in enumerate(items):
        y = 10 + i * row
        bw = max(1, (w - left - 70) * max(v, 0) / top)
        out.append(
            f'<text x="{left - 6}" y="{y + 15}" text-anchor="end" font-size="12">{escape(label)}</text>'
            f'<rect x="{left}" y="{y + 3}" width="{bw:.1f}" height="{row - 8}" fill="#4c78a8"/>'
            f'<text x="{left + bw + 4}" y="{y + 15}" font-size="12">{escape(fmt.format(v))}</text>'
        )
    if threshold is not None:
        x = left + (w - left - 70) * threshold / top
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="5" y2="{h - 15}" stroke="#e45756" stroke-dasharray="4"/>'
            f'<text x="{x + 3:.1f}" y="{h - 4}" font-size="11" fill="#e45756">threshold</text>'
        )
    out.append("</svg>")
    return "".join(out)


def write_report(path: Path, summary: dict[str, Any]) -> None:
    """``report.html``: versions and gates, traffic and feedback, drift before/after, stage timings."""
    from html import escape

    parts = [
        "<!doctype html><meta charset='utf-8'><title>tuneloop demo</title>",
        "<style>body{font-family:sans-serif;max-width:900px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}pre{background:#f6f6f6;padding:8px;white-space:pre-wrap}</style>",
        f"<h1>tuneloop demo</h1><p>total {summary['total_s'] / 60:.1f} min; promoted: <b>{escape(str(summary.get('promoted')))}</b>; "
        f"requests served: {summary.get('requests')}; feedback: {summary.get('feedback')}</p>",
    ]
    for n in summary.get("notes", []):
        parts.append(f"<p><i>note: {escape(n)}</i></p>")
    parts.append("<h2>Gates</h2>")
    for name, g in summary.get("gates", {}).items():
        summ = g.get("extra", {}).get("summary") or {}
        metric = g.get("metric", "token_f1")
        parts.append(
            _bars(
                f"{name}: mean {metric} on the held-out split",
                [(k, float((v or {}).get(metric) or 0)) for k, v in summ.items()],
            )
        )
        lines = [f"gate {'PASSED' if g.get('passed') else 'FAILED'}: {g.get('candidate')} vs {g.get('baseline')}"]
        lines += [f"  {c['name']}: {c['detail']}" for c in g.get("checks", [])]
        parts.append(f"<pre>{escape(chr(10).join(lines))}</pre>")
    parts.append("<h2>Production traffic and feedback</h2>")
    tr = summary.get("traffic", {})
    items = []
    for phase, t in tr.items():
        items += [(f"{phase}: thumbs up", t.get("up", 0)), (f"{phase}: thumbs down", t.get("down", 0))]
    parts.append(_bars("simulated feedback per phase", items, "{:.0f}"))
    items = [(f"{phase}: {v}", d["f1"]) for phase, t in tr.items() for v, d in t.get("by_version", {}).items()]
    parts.append(_bars("mean token F1 of answers vs the reference reply, per phase and serving version", items))
    if summary.get("canary"):
        c = summary["canary"]
        parts.append(
            f"<h2>Canary</h2><p>decision: <b>{escape(c['decision'])}</b> — {escape('; '.join(c['reasons']))}</p>"
        )
        arms = c.get("arms", {})
        parts.append(
            _bars(
                "thumbs-down share per arm",
                [(f"{a} ({s.get('model_version')})", s.get("negative_share", 0)) for a, s in arms.items()],
                "{:.0%}",
            )
        )
        parts.append(
            _bars(
                "p50 latency per arm (s)",
                [(f"{a} ({s.get('model_version')})", s.get("latency_p50_s") or 0) for a, s in arms.items()],
            )
        )
    parts.append("<h2>Drift</h2>")
    for phase, d in summary.get("drift", {}).items():
        feats = d.get("features") if isinstance(d.get("features"), dict) else d
        items = [
            (k, float(v["value"]))
            for k, v in feats.items()
            if isinstance(v, dict) and isinstance(v.get("value"), (int, float))
        ]
        parts.append(_bars(f"drift statistics {phase}", items))
    if not summary.get("drift"):
        parts.append("<p>not measured</p>")
    parts.append(_bars("stage durations (s)", list(summary.get("timings_s", {}).items()), "{:.0f}"))
    parts.append(f"<h2>Raw summary</h2><pre>{escape(json.dumps(summary, indent=2, default=str)[:20000])}</pre>")
    Path(path).write_text("\n".join(parts))
