"""Continuous mode of the loop (``tuneloop loop --watch``): run a cycle whenever a trigger fires.

Contract
--------
* :func:`trigger` says why a new cycle should run now, or None. Checked in this
  order, counting from ``since`` (the epoch when None; :func:`watch` passes the
  start of the newest loop step): a drift report of the production version whose
  overall drift is over its threshold, at least ``min_feedback`` new feedback
  items (0 turns this off), or ``every_s`` seconds elapsed (the schedule; None
  turns it off).
* :func:`watch` first resumes the most recently started unfinished cycle (one
  without a ``decide`` step), then polls :func:`trigger` every ``poll_s`` seconds
  and runs a new cycle (:func:`tuneloop.deploy.loop.run_cycle`) each time it
  fires, printing the trigger and the cycle summary; it returns the cycles' results
  after ``max_cycles`` of them (never, by default). An error in a cycle propagates.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from tuneloop.db import Database, utcnow
from tuneloop.deploy.loop import CycleResult, LoopOptions, run_cycle
from tuneloop.deploy.loop_runs import last_started, unfinished_cycle

if TYPE_CHECKING:
    from tuneloop.settings import Settings


def trigger(db: Database, since: datetime | None, min_feedback: int, every_s: float | None) -> str | None:
    """Why a new cycle should run now (or None): drift of the production version, new feedback, or the schedule."""
    from tuneloop.registry import version_by_stage

    since = since or datetime(1970, 1, 1)
    prod = version_by_stage(db, "production")
    if prod is not None:
        d = db.query(
            """SELECT value, threshold FROM drift_reports WHERE model_version = ? AND feature = 'overall'
                        AND drifted AND created_at > ? ORDER BY created_at DESC LIMIT 1""",
            [prod.name, since],
        )
        if d:
            return f"drift on {prod.name} (overall {d[0]['value']:.3g} over {d[0]['threshold']})"
    n = db.query("SELECT count(*) AS n FROM feedback WHERE created_at > ?", [since])[0]["n"]
    if min_feedback and n >= min_feedback:
        return f"{n} new feedback items"
    if every_s is not None and (utcnow() - since).total_seconds() >= every_s:
        return "schedule"
    return None


def watch(
    db: Database,
    settings: Settings,
    opts: LoopOptions,
    min_feedback: int = 50,
    every: str | None = None,
    poll_s: float = 60.0,
    max_cycles: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[CycleResult]:
    """Run cycles whenever :func:`trigger` fires (resuming an unfinished cycle first)."""
    from tuneloop.timeparse import duration_s

    every_s = duration_s(every) if every else None
    results: list[CycleResult] = []
    unfinished = unfinished_cycle(db)
    if unfinished:
        print(f"resuming unfinished cycle {unfinished}", flush=True)
        results.append(run_cycle(db, settings, opts, cycle_id=unfinished))
    while max_cycles is None or len(results) < max_cycles:
        last = last_started(db)
        why = trigger(db, last, min_feedback, every_s)
        if why:
            print(f"trigger: {why}", flush=True)
            results.append(run_cycle(db, settings, opts))
            print(results[-1].summary(), flush=True)
        else:
            sleep(poll_s)
    return results
