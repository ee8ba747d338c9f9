"""Durations and points in time as users type them: one grammar for every command.

Contract
--------
* A **duration** is a positive number and a unit: ``90s``, ``30m``, ``1.5h``, ``2d``,
  ``1w``. :func:`parse_duration` returns a :class:`~datetime.timedelta`,
  :func:`duration_s` seconds.
* A **time** is an ISO-8601 date or date-time (UTC unless it carries an offset,
  ``Z`` allowed) or a duration ago, written ``2d`` or ``-2d``. :func:`parse_time`
  returns a naive UTC :class:`~datetime.datetime`, the form the storage layer keeps.
* Bad text raises :class:`~tuneloop.errors.UserError` naming the accepted forms, so a
  CLI prints ``error: ...`` and exits 2.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from tuneloop.errors import UserError

UNITS_S: dict[str, float] = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_duration(text: str) -> timedelta:
    """``'90s'``, ``'30m'``, ``'1h'``, ``'2d'``, ``'1w'`` -> timedelta (a positive amount)."""
    m = DURATION_RE.match(str(text or "").lower())
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"bad duration {text!r}: use a positive number and a unit s/m/h/d/w, e.g. 90s, 30m, 1h or 2d")
    return timedelta(seconds=float(m.group(1)) * UNITS_S[m.group(2)])


def duration_s(text: str) -> float:
    """:func:`parse_duration` in seconds."""
    return parse_duration(text).total_seconds()


def utcnow() -> datetime:
    """Now, as a naive UTC datetime."""
    return datetime.now(UTC).replace(tzinfo=None)


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An ISO-8601 time (UTC unless it has an offset) or a duration ago (``2d``, ``-1h``) -> naive UTC."""
    t = str(text or "").strip()
    ago = t[1:] if t.startswith("-") else t
    if DURATION_RE.match(ago.lower()):
        return (now or utcnow()) - parse_duration(ago)
    try:
        d = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise UserError(
            f"bad time {text!r}: use ISO-8601 (2026-01-31, 2026-01-31T12:00) or a duration ago (2d, -1h)"
        ) from None
    return d.astimezone(UTC).replace(tzinfo=None) if d.tzinfo is not None else d
