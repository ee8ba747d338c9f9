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
  It prints one ``watching: ...`` line when it starts polling (what fires a cycle).
* SIGTERM and SIGINT (Ctrl-C) stop :func:`watch`. While it waits for a trigger
  the signal only ends the wait (never interrupting a database call half-way);
  during a cycle it interrupts the cycle as Ctrl-C always did (the running step
  is recorded ``failed`` and the cycle resumes on the next start). Either way it
  prints ``watch stopped (SIGTERM|SIGINT) after N cycle(s)`` and raises
  ``KeyboardInterrupt``: ``tuneloop loop --watch`` prints ``interrupted`` and
  exits 130. (Handlers are installed only when called from the main thread, and
  restored on return.)
* The triggers are plain SQL on ``drift_reports`` and ``feedback`` and the cycle
  bookkeeping is :mod:`tuneloop.store_deploy`'s, so a watcher runs the same on the
  DuckDB file and against a shared PostgreSQL that server replicas write to.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from tuneloop.db import Database, utcnow
from tuneloop.deploy.loop import CycleResult, LoopOptions, run_cycle
from tuneloop.store_deploy import last_started, unfinished_cycle

if TYPE_CHECKING:
    from tuneloop.settings import Settings


def trigger(
    db: Database, since: datetime | None, min_feedback: int, every_s: float | None, task: str = "chat"
) -> str | None:
    """Why a new cycle should run now (or None): drift of the production version of ``task``, new feedback, or the
    schedule."""
    from tuneloop.registry import version_by_stage
    from tuneloop.store_monitoring import feedback_since, latest_overall_drift

    since = since or datetime(1970, 1, 1)
    prod = version_by_stage(db, "production", task=task)
    if prod is not None:
        d = latest_overall_drift(db, prod.name, since=since, drifted_only=True)
        if d:
            return f"drift on {prod.name} (overall {d['value']:.3g} over {d['threshold']})"
    n = feedback_since(db, since)
    if min_feedback and n >= min_feedback:
        return f"{n} new feedback items"
    if every_s is not None and (utcnow() - since).total_seconds() >= every_s:
        return "schedule"
    return None


class _Stop:
    """Signal handler of :func:`watch`: records the signal and ends the current wait; raises
    ``KeyboardInterrupt`` at once only while a cycle runs."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.woken = threading.Event()
        self.in_cycle = False

    def __call__(self, signum: int, _frame: object) -> None:
        self.signal = signal.Signals(signum).name
        self.woken.set()
        if self.in_cycle:
            raise KeyboardInterrupt(self.signal)

    def cycle(self, fn: Callable[[], CycleResult]) -> CycleResult:
        if self.signal:
            raise KeyboardInterrupt(self.signal)
        self.in_cycle = True
        try:
            return fn()
        finally:
            self.in_cycle = False


def watch(
    db: Database,
    settings: Settings,
    opts: LoopOptions,
    min_feedback: int = 50,
    every: str | None = None,
    poll_s: float = 60.0,
    max_cycles: int | None = None,
    sleep: Callable[[float], None] | None = None,
) -> list[CycleResult]:
    """Run cycles whenever :func:`trigger` fires (resuming an unfinished cycle first).

    ``sleep`` replaces the wait between polls (tests); by default a wait that a stop signal ends."""
    from tuneloop.timeparse import duration_s

    every_s = duration_s(every) if every else None
    results: list[CycleResult] = []
    stop = _Stop()
    wait = sleep or stop.woken.wait
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        unfinished = unfinished_cycle(db)
        if unfinished:
            print(f"resuming unfinished cycle {unfinished}", flush=True)
            results.append(stop.cycle(lambda: run_cycle(db, settings, opts, cycle_id=unfinished)))
            print(results[-1].summary(), flush=True)
        fires = [
            "drift of the production version over threshold",
            *([f"{min_feedback} new feedback items"] if min_feedback else []),
            *([f"every {every}"] if every_s is not None else []),
        ]
        print(f"watching: a cycle runs on {', or '.join(fires)} (checked every {poll_s:g} s)", flush=True)
        while (max_cycles is None or len(results) < max_cycles) and not stop.signal:
            why = trigger(db, last_started(db), min_feedback, every_s, task=opts.task)
            if why and not stop.signal:
                print(f"trigger: {why}", flush=True)
                results.append(stop.cycle(lambda: run_cycle(db, settings, opts)))
                print(results[-1].summary(), flush=True)
            elif not stop.signal:
                wait(poll_s)
        if stop.signal:
            raise KeyboardInterrupt(stop.signal)
    except KeyboardInterrupt as e:
        print(f"watch stopped ({str(e) or 'SIGINT'}) after {len(results)} cycle(s)", flush=True)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    return results
