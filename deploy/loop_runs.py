"""The ``loop_runs`` table: what each cycle of the continuous loop has done, step by step.

Contract
--------
* One row per (cycle id, step). :func:`begin_step` replaces any earlier row of
  that step with a ``running`` row holding the step's inputs; :func:`end_step`
  sets its final status (``done``, ``skipped`` or ``failed``, with the error),
  its finish time and its ``details`` (inputs + outputs).
* :func:`steps_of` reads a cycle back as ``{step: row}`` with ``details``
  decoded (an empty dict when none); :func:`cycle_exists` says whether a cycle id
  has any row.
* :func:`record_decide` writes the ``decide`` step (``done``, with the outcome
  and the reason): a cycle without one is unfinished.
* :func:`last_sample_until` is the ``until`` of the newest finished ``sample``
  step of another cycle (where the next sampling window starts), or None.
* :func:`unfinished_cycle` is the most recently started cycle without a
  ``decide`` step, or None; :func:`last_started` is when the newest step of
  any cycle started, or None.

This module is the only one that reads or writes ``loop_runs``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from tuneloop.db import Database, dumps, loads, utcnow


def steps_of(db: Database, cycle_id: str) -> dict[str, dict[str, Any]]:
    rows = db.query(
        "SELECT step, status, started_at, finished_at, details, error FROM loop_runs WHERE id = ?", [cycle_id]
    )
    return {r["step"]: {**r, "details": loads(r["details"]) or {}} for r in rows}


def cycle_exists(db: Database, cycle_id: str) -> bool:
    return bool(db.query("SELECT 1 FROM loop_runs WHERE id = ? LIMIT 1", [cycle_id]))


def begin_step(db: Database, cycle_id: str, step: str, details: dict[str, Any]) -> None:
    with db.connect() as con:
        con.execute("DELETE FROM loop_runs WHERE id = ? AND step = ?", [cycle_id, step])
        con.execute(
            "INSERT INTO loop_runs (id, step, status, started_at, details) VALUES (?, ?, 'running', ?, ?)",
            [cycle_id, step, utcnow(), dumps(details)],
        )


def end_step(
    db: Database, cycle_id: str, step: str, status: str, details: dict[str, Any], error: str | None = None
) -> None:
    db.execute(
        "UPDATE loop_runs SET status = ?, finished_at = ?, details = ?, error = ? WHERE id = ? AND step = ?",
        [status, utcnow(), dumps(details), error, cycle_id, step],
    )


def record_decide(db: Database, cycle_id: str, outcome: str, reason: str, extra: dict[str, Any] | None = None) -> None:
    begin_step(db, cycle_id, "decide", {})
    end_step(db, cycle_id, "decide", "done", {"outcome": outcome, "reason": reason, **(extra or {})})


def last_sample_until(db: Database, exclude: str) -> datetime | None:
    rows = db.query(
        """SELECT details FROM loop_runs WHERE step = 'sample' AND status = 'done' AND id <> ?
                       ORDER BY finished_at DESC LIMIT 1""",
        [exclude],
    )
    if not rows:
        return None
    u = (loads(rows[0]["details"]) or {}).get("until")
    return datetime.fromisoformat(u) if u else None


def unfinished_cycle(db: Database) -> str | None:
    rows = db.query("""SELECT id FROM loop_runs GROUP BY id HAVING count(*) FILTER (WHERE step = 'decide') = 0
                             ORDER BY min(started_at) DESC LIMIT 1""")
    return rows[0]["id"] if rows else None


def last_started(db: Database) -> datetime | None:
    t: datetime | None = db.query("SELECT max(started_at) AS t FROM loop_runs")[0]["t"]
    return t
