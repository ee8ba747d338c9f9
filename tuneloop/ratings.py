"""Ratings on served responses: one encoding, read the same way everywhere.

Contract
--------
A rating is stored as ``(rating, rating_kind)``: thumbs are ``-1``/``+1`` with kind
``thumbs``; stars are ``1``..``5`` with kind ``stars``. Everything that reads a
rating goes through this module:

* :data:`THUMBS` maps the API's ``"up"``/``"down"`` to the stored value;
* :func:`api_value` is what the feedback API returns (``"up"``/``"down"`` or the stars);
* :func:`metric_label` is the Prometheus label value (one of :data:`METRIC_LABELS`);
* :func:`sentiment` says whether a rating is ``positive``, ``negative`` or ``neutral``:
  thumbs by sign, stars 4-5 positive, 1-2 negative, 3 neutral. Sampling, drift and
  the canary judge count "thumbs-down" with it;
* :func:`negative_sql` is the same "negative" rule as a SQL expression, for code
  that counts in DuckDB (drift windows, canary arms).
"""

from __future__ import annotations

from typing import Literal

THUMBS: dict[str, int] = {"up": 1, "down": -1}
METRIC_LABELS: tuple[str, ...] = ("up", "down", "1", "2", "3", "4", "5", "none")
Sentiment = Literal["positive", "negative", "neutral"]


def _is_thumbs(rating: float, kind: str | None) -> bool:
    k = (kind or "").lower()
    return k == "thumbs" or (k != "stars" and -1 <= rating <= 1)


def api_value(rating: float | None, kind: str | None) -> int | str | None:
    """The rating as the feedback API shows it: ``"up"``/``"down"``, 1..5, or None."""
    if rating is None:
        return None
    if _is_thumbs(rating, kind):
        return "up" if rating > 0 else "down"
    return int(rating)


def metric_label(rating: float | None, kind: str | None) -> str:
    """The ``rating`` label value of ``tuneloop_feedback_total``."""
    v = api_value(rating, kind)
    return "none" if v is None else str(v)


def negative_sql(rating: str, kind: str) -> str:
    """A SQL boolean: the rating in column ``rating`` (kind in ``kind``) is negative, as :func:`sentiment` says.

    NULL ratings are not negative. ``rating`` and ``kind`` are SQL expressions (``f.rating``).
    """
    k = f"lower(coalesce({kind}, ''))"
    thumbs = f"({k} = 'thumbs' OR ({k} <> 'stars' AND {rating} BETWEEN -1 AND 1))"
    return f"coalesce(CASE WHEN {thumbs} THEN {rating} < 0 ELSE {rating} <= 2 END, false)"


def sentiment(rating: float | None, kind: str | None) -> Sentiment | None:
    """``positive``/``negative``/``neutral`` for a rating, None without one."""
    if rating is None:
        return None
    if _is_thumbs(rating, kind):
        return "positive" if rating > 0 else ("negative" if rating < 0 else "neutral")
    return "positive" if rating >= 4 else ("negative" if rating <= 2 else "neutral")
