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
* :func:`write_report` renders a summary as one HTML file with bar charts drawn by
  :mod:`tuneloop.monitoring.charts` (inline SVG rendered offline, no script, each
  under an ``<h3>`` title): gates, simulated feedback and answer F1 per phase and
  serving version, the canary's arms, drift statistics, stage durations.
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
    heldout: dict[str, Any] = field(default_factory=dict)
    promoted: str | None = None


# what the demo must show (the README and docs/BENCHMARKS.md list the same targets)
MIN_TASK_SUCCESS = 0.40
MIN_RATIO = 3.0
MIN_UP_GAP = 0.30


def scorecard(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The demo's targets, each ``{target, before, after, met}``: what v1 did, what v2 did, whether it is met."""
    rows: list[dict[str, Any]] = []
    versions = list(summary.get("versions", {}))
    if len(versions) < 2:
        return rows
    v1, v2 = versions[0], versions[1]
    c = summary.get("canary") or {}
    by = str(c.get("decided_by") or "")
    live = summary.get("promoted") == v2 and by not in ("", "demo")
    rows.append(
        {
            "target": "v2 promoted by the live server's canary judge",
            "before": f"{v1} in production",
            "after": f"{summary.get('promoted') or v1} in production"
            + (f" ({c.get('decision')} by {by})" if c else ""),
            "met": live,
        }
    )
    h = summary.get("heldout") or {}
    if h:
        s1, s2 = h["task_success"][v1], h["task_success"][v2]
        rows.append(
            {
                "target": f"held-out task success >= {MIN_TASK_SUCCESS:.0%}",
                "before": f"{s1:.0%}",
                "after": f"{s2:.0%}",
                "met": s2 >= MIN_TASK_SUCCESS,
            }
        )
        rows.append(
            {
                "target": f"held-out task success >= {MIN_RATIO:g}x v1's",
                "before": f"{s1:.0%}",
                "after": f"{s2:.0%} ({'v1 had none' if not s1 else f'{s2 / s1:.1f}x'})",
                "met": s2 >= MIN_RATIO * s1 and s2 > 0,
            }
        )
        rows.append(
            {
                "target": "paired 95% CI lower bound of the difference > 0",
                "before": "-",
                "after": f"{h['delta']:+.0%} [{h['ci'][0]:+.0%}, {h['ci'][1]:+.0%}] over {h['n']} phrasings",
                "met": h["ci"][0] > 0,
            }
        )
    g = (summary.get("gates") or {}).get(v2) or {}
    forget = next((x for x in g.get("checks", []) if x["name"] == "forgetting"), None)
    if forget and not forget.get("skipped"):
        rows.append(
            {
                "target": f"retention: perplexity rise on v1's data <= {forget['threshold']:.0%}",
                "before": "-",
                "after": f"{forget['value']:+.1%}",
                "met": bool(forget["passed"]),
            }
        )
    arms = (summary.get("canary") or {}).get("arms") or {}  # the judge's view: from the start to the decision
    ca, pa = arms.get("canary") or {}, arms.get("production") or {}
    if ca.get("rated") and pa.get("rated"):
        u2 = 1 - ca["negative"] / ca["rated"]
        u1 = 1 - pa["negative"] / pa["rated"]
        rows.append(
            {
                "target": f"canary: thumbs-up share of v2's arm >= v1's + {MIN_UP_GAP:.0%} points",
                "before": f"{u1:.0%} of {pa['rated']} rated ({pa.get('model_version')})",
                "after": f"{u2:.0%} of {ca['rated']} rated ({ca.get('model_version')})",
                "met": u2 - u1 >= MIN_UP_GAP,
            }
        )
    d = summary.get("drift") or {}
    sb, sa = (d.get("before") or {}).get("score"), (d.get("after") or {}).get("score")
    if isinstance(sb, int | float) and isinstance(sa, int | float):
        rows.append(
            {
                "target": "drift of production traffic vs the serving version's reference goes down",
                "before": f"{sb:.3g} ({(d.get('before') or {}).get('model_version')})",
                "after": f"{sa:.3g} ({(d.get('after') or {}).get('model_version')})",
                "met": sa < sb,
            }
        )
    return rows


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
                fmt_num(mine.get(g.get("metric", "token_f1"))),
                ("passed" if g.get("passed") else "failed") if g else "-",
                fmt_num(q["value"]) if q else "-",
            ]
        )
    print_table(
        ["version", "stage", "dataset", "eval loss", "gate metric", "gate", "CI low"], rows, title="model versions"
    )
    from tuneloop.store_monitoring import log_counts

    counts = log_counts(db)
    print(
        f"\nrequests served: {counts['requests']}; feedback: {counts['feedback']} ({counts['corrections']} corrections); "
        f"used in training: {st.sample.get('card', {}).get('origins', {})}"
    )
    if st.promoted:
        why = "; ".join(st.canary.get("reasons", [])) if st.canary else "gate passed"
        print(f"promoted: {st.promoted} ({why})")
    for k in ("before", "after"):
        if st.drift.get(k):
            print(f"drift {k}: {drift_line(st.drift[k])}")
    summary = {
        "total_s": round(total, 1),
        "timings_s": st.timings,
        "versions": st.versions,
        "gates": st.gates,
        "traffic": st.traffic,
        "drift": st.drift,
        "sample": st.sample,
        "canary": st.canary,
        "heldout": st.heldout,
        "promoted": st.promoted,
        "requests": counts["requests"],
        "feedback": {"n": counts["feedback"], "c": counts["corrections"]},
        "notes": st.notes,
    }
    summary["scorecard"] = card = scorecard(summary)
    if card:
        print_table(
            ["target", "before (v1)", "after (v2)", "met"],
            [[r["target"], r["before"], r["after"], "yes" if r["met"] else "NO"] for r in card],
            title="what the loop changed",
        )
    for note in st.notes:
        print(f"note: {note}")
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


# ---- HTML report (charts: tuneloop.monitoring.charts, Vega-Lite rendered to inline SVG offline) ----


def _bar_chart(
    title: str,
    items: list[tuple[str, float]],
    fmt: str = ".3~g",
    threshold: float | None = None,
    value_title: str = "value",
) -> str:
    """An ``<h3>`` title and under it a horizontal bar chart of ``items`` (``fmt``: a d3 number format) as SVG;
    nothing when there are no items."""
    from html import escape

    from tuneloop.monitoring import charts

    if not items:
        return ""
    # the <h3> is the visible title; the chart carries it only as its aria-label
    chart = charts.bars(items, title="", threshold=threshold, value_title=value_title, fmt=fmt, width=400)
    return f"<h3>{escape(title)}</h3>" + charts.svg(chart, label=title)


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
    if summary.get("scorecard"):
        parts.append(
            "<h2>What the loop changed</h2><table><tr><th>target</th><th>before (v1)</th><th>after (v2)</th><th>met</th></tr>"
        )
        for r in summary["scorecard"]:
            parts.append(
                f"<tr><td>{escape(r['target'])}</td><td>{escape(r['before'])}</td><td>{escape(r['after'])}</td>"
                f"<td>{'yes' if r['met'] else '<b>NO</b>'}</td></tr>"
            )
        parts.append("</table>")
    h = summary.get("heldout") or {}
    if h:
        parts.append(
            _bar_chart(
                f"task success on {h['n']} held-out question phrasings (never trained on)",
                list(h["task_success"].items()),
                ".0%",
                value_title="task success",
            )
        )
    parts.append("<h2>Gates</h2>")
    for name, g in summary.get("gates", {}).items():
        summ = g.get("extra", {}).get("summary") or {}
        metric = g.get("metric", "token_f1")
        parts.append(
            _bar_chart(
                f"{name}: mean {metric} on the held-out split",
                [(k, float((v or {}).get(metric) or 0)) for k, v in summ.items()],
                value_title=metric,
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
    parts.append(_bar_chart("simulated feedback per phase", items, ".0f", value_title="ratings"))
    items = [
        (f"{phase}: {v}", d["task_success"]) for phase, t in tr.items() for v, d in t.get("by_version", {}).items()
    ]
    parts.append(
        _bar_chart(
            "answers that state the right fact (thumbs-up share), per phase and serving version",
            items,
            ".0%",
            value_title="thumbs-up share",
        )
    )
    if summary.get("canary"):
        c = summary["canary"]
        parts.append(
            f"<h2>Canary</h2><p>decision: <b>{escape(c['decision'])}</b> — {escape('; '.join(c['reasons']))}</p>"
        )
        arms = c.get("arms", {})
        parts.append(
            _bar_chart(
                "thumbs-down share per arm",
                [(f"{a} ({s.get('model_version')})", s.get("negative_share", 0)) for a, s in arms.items()],
                ".0%",
                value_title="thumbs-down share",
            )
        )
        parts.append(
            _bar_chart(
                "p50 time to first token per arm (s)",
                [(f"{a} ({s.get('model_version')})", s.get("ttft_p50_s") or 0) for a, s in arms.items()],
                value_title="seconds",
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
        who = d.get("model_version", "")
        parts.append(
            _bar_chart(
                f"drift statistics {phase} ({who}; overall score {fmt_num(d.get('score'))})",
                items,
                value_title="statistic",
            )
        )
    if not summary.get("drift"):
        parts.append("<p>not measured</p>")
    parts.append(
        _bar_chart("stage durations (s)", list(summary.get("timings_s", {}).items()), ".0f", value_title="seconds")
    )
    parts.append(f"<h2>Raw summary</h2><pre>{escape(json.dumps(summary, indent=2, default=str)[:20000])}</pre>")
    Path(path).write_text("\n".join(parts))
