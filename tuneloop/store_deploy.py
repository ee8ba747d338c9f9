"""Deploy state in the system of record: canaries, stage transitions, deploy events, gate verdicts, loop runs.

Contract
--------
* Every SQL statement on ``canaries``, ``deploy_events`` (reads and gate
  verdicts; stage events are written by :func:`tuneloop.registry.set_stage`)
  and ``loop_runs`` is here, portable: the same text runs on the DuckDB file
  and on PostgreSQL (no ``arg_max``, no JSON paths). Callers (the canary
  judge, the CLI, the loop, the server's router) call functions.
* **Transitions are atomic and race-free** with any number of replicas and
  CLI commands: :func:`start_canary`, :func:`finish_canary` (promote or roll
  back), :func:`promote_version` and :func:`rollback_production` are each one
  transaction that first takes the deploy lock
  (:func:`tuneloop.registry.lock_deploy_state`: a transaction-scoped advisory
  lock on PostgreSQL; DuckDB's single writer on the file), then reads and
  changes what it needs, so:

  - at most one canary per task is ``running`` (a second :func:`start_canary`
    for a candidate of the same task sees the first and raises
    :class:`CanaryError`; a classifier's canary and a chat model's canary can
    run side by side, as their ``production`` versions are separate, see
    :mod:`tuneloop.registry`);
  - a canary is decided once: :func:`finish_canary` is a compare-and-set
    (``UPDATE canaries SET status = ? ... WHERE id = ? AND status = 'running'
    RETURNING id``); only the winner changes stages and writes deploy events,
    in the same transaction; every other caller (another replica's judge, a
    CLI) raises :class:`CanaryDecided` naming the recorded status and
    changes nothing;
  - stage updates are guarded by the stage just read (``WHERE name = ? AND
    stage = ?``), so ``production`` and ``canary`` never hold two versions.

  A failure anywhere rolls the whole transition back. On DuckDB a
  write-write conflict (``duckdb.TransactionException``, possible only when
  something outside tuneloop's one-block-at-a-time writes the file) is retried
  once, and the retry then sees the winner's result.
* :func:`read_deploy_state` is what the server's router reads through
  :class:`tuneloop.db.CachedRead`: every version and the running canaries (at
  most one per task; :meth:`DeploySnapshot.canary_for`) in **one** statement, so a snapshot never mixes the before and after of a
  transition. Writes here end a ``connect()`` block, which on PostgreSQL sends
  ``NOTIFY`` on commit: another replica's ``data_version`` moves and its next
  refresh re-reads (``server.state_refresh_s``).
* Loop runs: one row per (cycle id, step). :func:`begin_step` upserts a
  ``running`` row (``INSERT ... ON CONFLICT (id, step) DO UPDATE``, so two
  writers of one step never hit the key), :func:`end_step` sets its final
  status; :func:`record_decide` writes a finished ``decide`` step in one
  statement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

import duckdb

from tuneloop.db import Database, dumps, loads, rows_as_dicts, utcnow
from tuneloop.errors import UserError
from tuneloop.ids import new_id
from tuneloop.registry import (
    Connection,
    ModelVersion,
    RegistryError,
    _row_to,
    lock_deploy_state,
    record_event,
    set_stage,
    task_of,
    unservable_reason,
)

T = TypeVar("T")


class CanaryError(UserError, RuntimeError):
    """A canary operation a user can fix (none running, one already running, no production ...)."""


class CanaryDecided(CanaryError):
    """The canary was already decided (by another replica's judge, a CLI, ...): nothing was changed."""

    def __init__(self, canary_id: str, status: str):
        super().__init__(f"canary {canary_id} is already {status}")
        self.canary_id, self.status = canary_id, status


@dataclass
class Canary:
    id: str
    candidate: str
    production: str | None
    share: float
    status: str
    started_at: datetime
    decided_at: datetime | None = None
    decision: dict[str, Any] | None = None


_CANARY_COLS = "id, candidate, production, share, status, started_at, decided_at, decision"


def _canary(r: dict[str, Any]) -> Canary:
    return Canary(
        id=r["id"],
        candidate=r["candidate"],
        production=r["production"],
        share=float(r["share"]),
        status=r["status"],
        started_at=r["started_at"],
        decided_at=r["decided_at"],
        decision=loads(r["decision"]),
    )


def _transition(db: Database, fn: Callable[[Connection], T]) -> T:
    """``fn(con)`` in one transaction holding the deploy lock; a DuckDB write-write conflict is retried once."""
    for attempt in (1, 2):
        try:
            with db.connect() as con:
                lock_deploy_state(db, con)
                return fn(con)
        except duckdb.TransactionException:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


# ---- canaries: reads -------------------------------------------------------------------------------


def get_canary(db: Database, ref: str) -> Canary | None:
    """The canary whose id is ``ref`` or starts with it (the newest such), or None."""
    rows = db.query(
        f"SELECT {_CANARY_COLS} FROM canaries WHERE id = ? OR id LIKE ? || '%' ORDER BY started_at DESC LIMIT 1",
        [ref, ref],
    )
    return _canary(rows[0]) if rows else None


_RUNNING_OF_TASK = """SELECT c.id, c.candidate FROM canaries c JOIN model_versions v ON v.name = c.candidate
                       WHERE c.status = 'running' AND v.task = ?"""
_PRODUCTION_OF_TASK = "SELECT name FROM model_versions WHERE stage = 'production' AND task = ?"


def _task_word(task: str) -> str:
    """``task`` as a word of a message (nothing for chat, the default): "no classification version is ..."."""
    return "" if task == "chat" else f"{task} "


def running_canary(db: Database, task: str | None = None) -> Canary | None:
    """The running canary (of a candidate of ``task`` when given; the newest of any task otherwise), or None."""
    cols = ", ".join(f"c.{c}" for c in _CANARY_COLS.split(", "))
    sql = f"SELECT {cols} FROM canaries c JOIN model_versions v ON v.name = c.candidate WHERE c.status = 'running'"
    rows = db.query(
        sql + (" AND v.task = ?" if task else "") + " ORDER BY c.started_at DESC LIMIT 1", [task] if task else []
    )
    return _canary(rows[0]) if rows else None


def last_canary_of(db: Database, candidate: str) -> Canary | None:
    """The newest canary of version ``candidate`` (any status), or None."""
    rows = db.query(
        f"SELECT {_CANARY_COLS} FROM canaries WHERE candidate = ? ORDER BY started_at DESC LIMIT 1", [candidate]
    )
    return _canary(rows[0]) if rows else None


# ---- canaries: transitions -------------------------------------------------------------------------


def start_canary(db: Database, candidate: str, share: float, actor: str = "tuneloop", reason: str = "") -> Canary:
    """Start a canary for ``candidate`` taking ``share`` of the production traffic of its task: one transaction
    that refuses when a canary of that task is running or nothing of that task is in production, moves the
    candidate to ``canary`` and inserts the ``running`` row (see module doc)."""
    if not 0 < share < 1:
        raise CanaryError(f"share must be between 0 and 1 (exclusive), got {share}")

    def run(con: Connection) -> Canary:
        row = con.execute("SELECT stage, kind, path, task FROM model_versions WHERE name = ?", [candidate]).fetchone()
        if not row:
            raise CanaryError(f"unknown model version {candidate!r}; see `tuneloop models list`")
        task = row[3] or "chat"
        busy = con.execute(_RUNNING_OF_TASK, [task]).fetchone()
        if busy:
            raise CanaryError(f"canary {busy[0]} for {busy[1]} is still running: promote or roll it back first")
        why = unservable_reason(row[1], row[2])
        if why:
            raise CanaryError(f"{candidate} cannot be served, so it cannot take traffic: {why}")
        if row[0] == "production":
            raise CanaryError(f"{candidate} is already in production")
        prod = con.execute(_PRODUCTION_OF_TASK + " ORDER BY stage_changed_at DESC LIMIT 1", [task]).fetchone()
        if not prod:
            raise CanaryError(
                f"no {_task_word(task)}version is in production yet, so there is no traffic to split: promote the first one "
                f"directly with `tuneloop deploy promote {candidate}`"
            )
        c = Canary(new_id(), candidate, prod[0], float(share), "running", utcnow())
        set_stage(
            db,
            candidate,
            "canary",
            actor=actor,
            reason=reason or f"canary at {share:.0%} of production traffic",
            details={"canary_id": c.id, "production": prod[0], "share": share},
            con=con,
        )
        con.execute(
            "INSERT INTO canaries (id, candidate, production, share, status, started_at) VALUES (?, ?, ?, ?, 'running', ?)",
            [c.id, c.candidate, c.production, c.share, c.started_at],
        )
        return c

    return _transition(db, run)


def finish_canary(
    db: Database,
    canary_id: str,
    status: str,
    actor: str = "tuneloop",
    reason: str = "",
    decision: dict[str, Any] | None = None,
) -> Canary:
    """Decide canary ``canary_id`` (full id): ``promoted`` (candidate -> production, the old production retires)
    or ``rolled_back`` (candidate -> retired; production restored if it moved meanwhile). One transaction whose
    first write is the compare-and-set on ``status = 'running'``: the loser of a race raises
    :class:`CanaryDecided` and changes nothing (see module doc). Returns the decided canary."""
    if status not in ("promoted", "rolled_back"):
        raise ValueError(f"a canary is finished as 'promoted' or 'rolled_back', not {status!r}")

    def run(con: Connection) -> Canary:
        now = utcnow()
        record = dumps({"action": status, "actor": actor, "reason": reason, **(decision or {})})
        won = con.execute(
            f"""UPDATE canaries SET status = ?, decided_at = ?, decision = ? WHERE id = ? AND status = 'running'
                RETURNING {_CANARY_COLS}""",
            [status, now, record, canary_id],
        )
        rows = rows_as_dicts(won)
        if not rows:
            st = con.execute("SELECT status FROM canaries WHERE id = ?", [canary_id]).fetchone()
            if st is None:
                raise CanaryError(f"unknown canary {canary_id!r}")
            raise CanaryDecided(canary_id, st[0])
        c = _canary(rows[0])
        details = {"canary_id": c.id, "decision": decision} if decision else {"canary_id": c.id}
        if status == "promoted":
            set_stage(db, c.candidate, "production", actor=actor, reason=reason, details=details, con=con)
            return c
        set_stage(db, c.candidate, "retired", actor=actor, reason=f"rolled back: {reason}", details=details, con=con)
        if c.production:
            cur = con.execute("SELECT stage FROM model_versions WHERE name = ?", [c.production]).fetchone()
            if cur and cur[0] != "production":  # production was changed meanwhile: restore it
                set_stage(
                    db,
                    c.production,
                    "production",
                    actor=actor,
                    reason="restored by canary rollback",
                    details=details,
                    con=con,
                )
        return c

    return _transition(db, run)


def promote_version(
    db: Database,
    name: str,
    actor: str = "tuneloop",
    reason: str = "",
    details: dict[str, Any] | None = None,
) -> str | None:
    """Put ``name`` in production directly (no canary): refused while a canary of its task is running (decide it
    first); the previous production version of that task retires in the same transaction. Returns that version
    (None if none)."""

    def run(con: Connection) -> str | None:
        task = task_of(con, name)
        if task is None:
            raise RegistryError(f"unknown model version {name!r}")
        busy = con.execute(_RUNNING_OF_TASK, [task]).fetchone()
        if busy:
            raise CanaryError(f"canary {busy[1]} is running: promote or roll it back before promoting {name}")
        prev = con.execute(
            _PRODUCTION_OF_TASK + " AND name <> ? ORDER BY stage_changed_at DESC LIMIT 1", [task, name]
        ).fetchone()
        set_stage(db, name, "production", actor=actor, reason=reason, details=details, con=con)
        return prev[0] if prev else None

    return _transition(db, run)


def rollback_production(
    db: Database, actor: str = "tuneloop", reason: str = "manual rollback", to: str | None = None, task: str = "chat"
) -> tuple[str, str]:
    """With no canary of ``task`` running: put back the version of ``task`` that was in production before the
    current one (the latest retired from production whose own last event is not a rollback), or ``to`` (whose
    task is then the one rolled back); the current one retires with reason ``rolled back: <reason>``. One
    transaction; returns (retired, restored)."""

    def run(con: Connection) -> tuple[str, str]:
        t = task
        if to is not None:
            t = task_of(con, to) or task
        if con.execute(_RUNNING_OF_TASK, [t]).fetchone():
            raise CanaryError("a canary is running: `tuneloop deploy rollback` rolls the canary back first")
        cur = con.execute(_PRODUCTION_OF_TASK + " ORDER BY stage_changed_at DESC LIMIT 1", [t]).fetchone()
        if not cur:
            raise CanaryError(f"no {_task_word(t)}version is in production: nothing to roll back")
        target = to
        if target is None:
            prev = con.execute(
                """SELECT e.model_version FROM deploy_events e
                   JOIN model_versions mv ON mv.name = e.model_version AND mv.task = ?
                   WHERE e.from_stage = 'production' AND e.to_stage = 'retired' AND e.model_version <> ?
                     AND coalesce((SELECT l.reason FROM deploy_events l WHERE l.model_version = e.model_version
                                   ORDER BY l.occurred_at DESC, l.id DESC LIMIT 1), '') NOT LIKE 'rolled back:%'
                   ORDER BY e.occurred_at DESC, e.id DESC LIMIT 1""",
                [t, cur[0]],
            ).fetchone()
            if not prev:
                raise CanaryError(
                    f"no previous production version to restore before {cur[0]} "
                    "(versions that were rolled back are not restored; use --to VERSION)"
                )
            target = str(prev[0])
        elif not con.execute("SELECT 1 FROM model_versions WHERE name = ?", [target]).fetchone():
            raise RegistryError(f"unknown model version {target!r}")
        set_stage(
            db,
            target,
            "production",
            actor=actor,
            reason=f"rollback of {cur[0]}: {reason}",
            con=con,
            retire_reason=f"rolled back: {reason}",
        )
        return str(cur[0]), target

    return _transition(db, run)


# ---- the router's snapshot ---------------------------------------------------------------------------


class DeploySnapshot(NamedTuple):
    """Every registered version by name, and the running canaries by the task of their candidate."""

    versions: dict[str, ModelVersion]
    canaries: dict[str, Canary]

    def canary_for(self, task: str = "chat") -> Canary | None:
        """The running canary of ``task``, or None."""
        return self.canaries.get(task)


def read_deploy_state(con: Connection) -> DeploySnapshot:
    """Versions and the running canaries in one statement (one snapshot on both backends; see module doc): a
    running canary is joined onto its candidate's row (a version is the candidate of at most one)."""
    cur = con.execute(
        """SELECT v.*, c.id AS c_id, c.candidate AS c_candidate, c.production AS c_production, c.share AS c_share,
                  c.started_at AS c_started_at
           FROM model_versions v
           LEFT JOIN canaries c ON c.candidate = v.name AND c.status = 'running'"""
    )
    versions: dict[str, ModelVersion] = {}
    canaries: dict[str, Canary] = {}
    for r in rows_as_dicts(cur):
        v = versions[r["name"]] = _row_to(ModelVersion, r)
        if r["c_id"] is not None:
            c = Canary(
                r["c_id"], r["c_candidate"], r["c_production"], float(r["c_share"]), "running", r["c_started_at"]
            )
            if v.task not in canaries or c.started_at > canaries[v.task].started_at:
                canaries[v.task] = c
    return DeploySnapshot(versions, canaries)


# ---- deploy events and gate verdicts -----------------------------------------------------------------


def recent_events(db: Database, limit: int = 10, version: str | None = None) -> list[dict[str, Any]]:
    """Deploy events, newest first (``limit`` of them; all of ``version``'s when it is given, oldest first)."""
    cols = "occurred_at, model_version, from_stage, to_stage, actor, reason"
    if version is not None:
        return db.query(f"SELECT {cols} FROM deploy_events WHERE model_version = ? ORDER BY occurred_at, id", [version])
    return db.query(f"SELECT {cols} FROM deploy_events ORDER BY occurred_at DESC, id DESC LIMIT ?", [limit])


def record_gate_verdict(
    db: Database, version: str, passed: bool, baseline: str, details: dict[str, Any], actor: str = "gate"
) -> None:
    """A gate verdict as a ``deploy_events`` row with the stage unchanged (reason ``gate passed|failed vs X``)."""
    with db.connect() as con:
        row = con.execute("SELECT stage FROM model_versions WHERE name = ?", [version]).fetchone()
        stage = row[0] if row else "candidate"
        record_event(
            con, version, stage, stage, actor, f"gate {'passed' if passed else 'failed'} vs {baseline}", details
        )


def last_gate_details(db: Database, version: str) -> dict[str, Any] | None:
    """The ``details`` of ``version``'s latest gate verdict, or None."""
    rows = db.query(
        """SELECT details FROM deploy_events WHERE model_version = ? AND reason LIKE 'gate %'
           ORDER BY occurred_at DESC, id DESC LIMIT 1""",
        [version],
    )
    return (loads(rows[0]["details"]) or {}) if rows else None


# ---- loop runs ---------------------------------------------------------------------------------------


def steps_of(db: Database, cycle_id: str) -> dict[str, dict[str, Any]]:
    """A cycle as ``{step: row}`` with ``details`` decoded (an empty dict when none)."""
    rows = db.query(
        "SELECT step, status, started_at, finished_at, details, error FROM loop_runs WHERE id = ?", [cycle_id]
    )
    return {r["step"]: {**r, "details": loads(r["details"]) or {}} for r in rows}


def cycle_exists(db: Database, cycle_id: str) -> bool:
    return bool(db.query("SELECT 1 FROM loop_runs WHERE id = ? LIMIT 1", [cycle_id]))


_UPSERT_STEP = """INSERT INTO loop_runs (id, step, status, started_at, finished_at, details, error)
                  VALUES (?, ?, ?, ?, ?, ?, NULL)
                  ON CONFLICT (id, step) DO UPDATE SET status = excluded.status, started_at = excluded.started_at,
                      finished_at = excluded.finished_at, details = excluded.details, error = NULL"""


def begin_step(db: Database, cycle_id: str, step: str, details: dict[str, Any]) -> None:
    """Replace any earlier row of this step with a ``running`` one holding the step's inputs."""
    db.execute(_UPSERT_STEP, [cycle_id, step, "running", utcnow(), None, dumps(details)])


def end_step(
    db: Database, cycle_id: str, step: str, status: str, details: dict[str, Any], error: str | None = None
) -> None:
    """Set the step's final status (``done``, ``skipped``, ``failed`` with the error), finish time and details."""
    db.execute(
        "UPDATE loop_runs SET status = ?, finished_at = ?, details = ?, error = ? WHERE id = ? AND step = ?",
        [status, utcnow(), dumps(details), error, cycle_id, step],
    )


def record_decide(db: Database, cycle_id: str, outcome: str, reason: str, extra: dict[str, Any] | None = None) -> None:
    """The cycle's finished ``decide`` step (a cycle without one is unfinished)."""
    now = utcnow()
    details = {"outcome": outcome, "reason": reason, **(extra or {})}
    db.execute(_UPSERT_STEP, [cycle_id, "decide", "done", now, now, dumps(details)])


def last_sample_until(db: Database, exclude: str, task: str = "chat") -> datetime | None:
    """The ``until`` of the newest finished ``sample`` step of a cycle of ``task`` other than ``exclude``, or None
    (a sample step without a ``task`` in its details is a chat cycle's)."""
    rows = db.query(
        """SELECT details FROM loop_runs WHERE step = 'sample' AND status = 'done' AND id <> ?
           ORDER BY finished_at DESC LIMIT 200""",
        [exclude],
    )
    for r in rows:
        d = loads(r["details"]) or {}
        if d.get("task", "chat") == task:
            u = d.get("until")
            return datetime.fromisoformat(u) if u else None
    return None


def unfinished_cycle(db: Database) -> str | None:
    """The most recently started cycle without a ``decide`` step, or None."""
    rows = db.query("""SELECT id FROM loop_runs GROUP BY id HAVING count(*) FILTER (WHERE step = 'decide') = 0
                       ORDER BY min(started_at) DESC LIMIT 1""")
    return rows[0]["id"] if rows else None


def last_started(db: Database) -> datetime | None:
    """When the newest step of any cycle started, or None."""
    t: datetime | None = db.query("SELECT max(started_at) AS t FROM loop_runs")[0]["t"]
    return t
