"""Charts for the web console and the HTML reports: Vega-Lite specs built with altair, rendered to SVG offline.

Contract
--------
* Every builder takes plain rows (lists of dicts, or ``(label, value)`` pairs) and returns an ``altair.Chart``
  (a Vega-Lite spec); nothing here reads the database.
* :func:`svg` renders a chart to standalone SVG text with vl-convert (Vega's own renderer compiled into a
  Python wheel): no JavaScript in the page, no network, the same picture in a report file, a browser and a
  screenshot. The SVG carries ``role="img"`` and an ``aria-label`` (the chart's title, or ``label``) so a screen
  reader announces what it is; numbers a reader needs exactly are also in a table next to every chart.
* :func:`line` (one line per ``color`` value, optional dashed threshold rule), :func:`bars` (horizontal, optional
  threshold rule) and :func:`paired_bars` (two series side by side per bin: reference vs production) are all a
  caller needs; styling (fonts, sizes, colours) is this module's, so every page looks alike.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import altair as alt

#: colours of the two series of a comparison (Vega's tableau10: blue, orange), and of a threshold
REFERENCE, PRODUCTION, THRESHOLD = "#4c78a8", "#f58518", "#e45756"


def _config(chart: Any) -> Any:
    return chart.configure_view(stroke="#ddd").configure_axis(labelFontSize=11, titleFontSize=11)


def line(
    rows: Sequence[Mapping[str, Any]],
    x: str,
    y: str,
    *,
    title: str,
    color: str | None = None,
    threshold: float | None = None,
    x_type: Literal["quantitative", "temporal", "ordinal", "nominal"] = "temporal",
    x_title: str | None = None,
    y_title: str | None = None,
    width: int = 520,
    height: int = 180,
) -> alt.Chart | alt.LayerChart:
    """``y`` against ``x`` as lines with points (one per value of ``color``); a dashed red rule at ``threshold``."""
    data = alt.Data(values=[dict(r) for r in rows])
    enc: dict[str, Any] = {
        "x": alt.X(x, type=x_type, title=x_title or x),
        "y": alt.Y(y, type="quantitative", title=y_title or y),
        "tooltip": [alt.Tooltip(x, type=x_type), alt.Tooltip(y, type="quantitative", format=".4g")],
    }
    if color:
        enc["color"] = alt.Color(color, type="nominal", title=color)
    base = alt.Chart(data).mark_line(point=True).encode(**enc)
    layers: list[alt.Chart] = [base]
    if threshold is not None:
        rule = alt.Chart(alt.Data(values=[{"threshold": threshold}])).mark_rule(color=THRESHOLD, strokeDash=[4, 4])
        layers.append(rule.encode(y=alt.Y("threshold", type="quantitative")))
    chart = alt.layer(*layers) if len(layers) > 1 else base
    return _config(chart.properties(title=title, width=width, height=height))


def bars(
    items: Sequence[tuple[str, float]],
    *,
    title: str,
    threshold: float | None = None,
    value_title: str = "value",
    fmt: str = ".3g",
    width: int = 420,
) -> alt.Chart | alt.LayerChart:
    """Horizontal bars, one per ``(label, value)``, in the given order, each labelled with its value."""
    data = alt.Data(values=[{"label": k, "value": float(v), "order": i} for i, (k, v) in enumerate(items)])
    y = alt.Y("label", type="nominal", sort=alt.EncodingSortField(field="order"), title=None)
    x = alt.X("value", type="quantitative", title=value_title)
    base = alt.Chart(data).encode(y=y, x=x, tooltip=[alt.Tooltip("label", type="nominal"), "value:Q"])
    layers: list[Any] = [
        base.mark_bar(color=REFERENCE),
        base.mark_text(align="left", dx=3, fontSize=11).encode(text=alt.Text("value", type="quantitative", format=fmt)),
    ]
    if threshold is not None:
        rule = alt.Chart(alt.Data(values=[{"threshold": threshold}])).mark_rule(color=THRESHOLD, strokeDash=[4, 4])
        layers.append(rule.encode(x=alt.X("threshold", type="quantitative")))
    chart = alt.layer(*layers).properties(title=title, width=width, height=max(24 * len(items), 24))
    return _config(chart)


def paired_bars(
    labels: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    value_title: str = "share",
    width: int = 420,
    height: int = 160,
) -> alt.Chart | alt.LayerChart:
    """Grouped vertical bars: for each bin label, one bar per series (e.g. reference vs production shares)."""
    names = list(series)
    rows = [
        {"bin": lab, "order": i, "series": name, "value": float(vals[i])}
        for name, vals in series.items()
        for i, lab in enumerate(labels)
        if i < len(vals)
    ]
    palette = [REFERENCE, PRODUCTION, "#54a24b", "#b279a2"][: len(names)]
    chart = (
        alt.Chart(alt.Data(values=rows))
        .mark_bar()
        .encode(
            x=alt.X("bin", type="nominal", sort=alt.EncodingSortField(field="order"), title=None),
            xOffset=alt.XOffset("series", type="nominal", sort=names),
            y=alt.Y("value", type="quantitative", title=value_title),
            color=alt.Color("series", type="nominal", sort=names, scale=alt.Scale(domain=names, range=palette)),
            tooltip=[alt.Tooltip("bin", type="nominal"), alt.Tooltip("series", type="nominal"), "value:Q"],
        )
        .properties(title=title, width=width, height=height)
    )
    return _config(chart)


def svg(chart: alt.Chart | alt.LayerChart, label: str | None = None) -> str:
    """The chart as standalone SVG text (vl-convert: no JavaScript, no network), with ``role="img"`` and an
    ``aria-label`` (``label``, else the chart's title)."""
    import vl_convert

    spec = chart.to_dict()
    text: str = vl_convert.vegalite_to_svg(spec)
    name = label or _title(spec) or "chart"
    attrs = f' role="img" aria-label="{html.escape(name, quote=True)}"'
    return re.sub(r"<svg\b", "<svg" + attrs, text, count=1)


def _title(spec: Mapping[str, Any]) -> str | None:
    t = spec.get("title")
    if isinstance(t, Mapping):
        t = t.get("text")
    return str(t) if t else None
