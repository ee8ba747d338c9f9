"""Model registry: datasets, training runs, model versions, eval reports and the stage of each version.

Contract
--------
* Typed records (:class:`DatasetRecord`, :class:`RunRecord`,
  :class:`ModelVersion`) in and out of the tables of :mod:`tuneloop.migrations`:
  the storage functions for ``datasets``, ``runs``, ``model_versions`` and
  ``eval_reports`` (:func:`save_eval_report`, :func:`find_eval_report`); the
  compound deploy transitions built on :func:`set_stage` are
  :mod:`tuneloop.store_deploy`'s. All functions take a
  :class:`~tuneloop.db.Database` and open a short connection each (or join the
  caller's with ``con=``). The SQL is portable: it runs unchanged on the DuckDB
  file and on PostgreSQL.
* Versions are immutable (name + content hash). :func:`register_version` is one
  ``INSERT ... ON CONFLICT (name) DO NOTHING``: of two processes registering the
  same name at once exactly one inserts (and records the ``registered`` event);
  the other gets the stored version back when the hash is the same, else a
  :class:`RegistryError`. :func:`register_dataset` likewise.
* Only ``stage`` changes, and every stage change is recorded in
  ``deploy_events`` with who/when/why, in the transaction that makes it.
  :func:`set_stage` first takes the deploy lock (:func:`lock_deploy_state`:
  ``pg_advisory_xact_lock(hashtext('deploy_state'))`` on PostgreSQL, held to
  the end of the transaction; on DuckDB the single writer, one ``connect()``
  block per file at a time, already serialises every transition), so replicas
  and CLI commands change stages one at a time and ``production`` and
  ``canary`` each hold at most one version. Each stage update is also a guarded
  compare-and-set (``WHERE name = ? AND stage = <the stage just read>``): a
  change that finds the stage moved under it raises rather than overwrite it.
* **Stages are per task.** Every version has a ``task`` (:data:`TASKS`:
  ``chat`` for generative models, ``classification`` for classifiers, from the
  training config). ``production`` and ``canary`` hold at most one version *of
  each task*: promoting a classifier retires the previous production
  classifier and leaves the chat production alone, and
  :func:`version_by_stage` takes the task (``chat`` by default).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from tuneloop.db import Database, dumps, loads, rows_as_dicts, utcnow
from tuneloop.errors import UserError
from tuneloop.ids import new_id

Connection = Any  # a connection of either backend (``con.execute(sql, params)`` -> cursor)

STAGES = ("candidate", "canary", "production", "retired")
KINDS = ("adapter", "merged", "base", "gguf", "quantized")
"""``gguf``: a GGUF file exported for llama.cpp, Ollama or LM Studio (``tuneloop export model``), kept in the registry
for its lineage and measured quality; vLLM does not serve it (:func:`unservable_reason`). ``quantized``: an int8 / int4
model folder (``compressed-tensors``, ``tuneloop export model --format int8-w8a8|int4-w4a16``) that vLLM serves like a
merged version; its parent is the version it was quantized from."""
TASKS = ("chat", "classification")
"""What a version does: ``chat`` (generates; /v1/chat/completions ...) or ``classification`` (/v1/classify)."""


class RegistryError(UserError, ValueError):
    """A registry lookup or transition a user can fix (unknown name, duplicate ...)."""


@dataclass
class DatasetRecord:
    id: str
    name: str
    content_hash: str
    kind: str
    path: str
    rows_train: int
    rows_validation: int
    rows_test: int
    source: dict[str, Any] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)
    parent_ids: list[str] = field(default_factory=list)
    created_at: datetime | None = None


@dataclass
class RunRecord:
    id: str
    method: str
    base_model: str
    dataset_id: str | None
    config: dict[str, Any]
    status: str = "running"
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_s: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    output_path: str | None = None
    artifact_hash: str | None = None
    error: str | None = None
    tracking: dict[str, Any] | None = None
    """Where the run was also tracked (``{"tensorboard": dir, "mlflow": {...}}``); None = nowhere else."""


@dataclass
class ModelVersion:
    name: str
    kind: str
    base_model: str
    path: str
    content_hash: str
    parent_version: str | None = None
    dataset_id: str | None = None
    run_id: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    stage: str = "candidate"
    stage_changed_at: datetime | None = None
    task: str = "chat"
    """:data:`TASKS`: stages (production, canary) are held per task."""


def unservable_reason(kind: str, path: str) -> str | None:
    """Why vLLM cannot serve a version of this kind at this path, or None when nothing says it cannot.

    vLLM serves plain model folders and PEFT LoRA adapters (QLoRA, DPO and KTO train LoRA
    adapters too), but not DoRA (a LoRA with ``use_dora``). Other PEFT adapters it cannot
    load, so such a version must never be gated, canaried or promoted: every request would
    fail. Weight adapters (DoRA, AdaLoRA, IA3, LoHa, LoKr, OFT; ``tuneloop train`` merges
    those itself) can be merged with ``tuneloop merge`` and served as the merged version;
    prompt learning (PROMPT_TUNING, PREFIX_TUNING) cannot be merged: evaluate it offline or
    retrain with a served method (methods table: docs/training.md). An adapter folder that
    is missing or unreadable is not judged here: the server refuses to load it, naming the file.
    """
    if kind == "gguf":
        return (
            "it is a GGUF file for llama.cpp, Ollama or LM Studio, and tuneloop serves models with vLLM, whose CPU "
            "build does not load GGUF: serve its parent version, or the file with llama.cpp (`llama-server -m FILE`)"
        )
    if kind != "adapter":
        return None
    try:
        conf = json.loads((Path(path).expanduser() / "adapter_config.json").read_text())
        peft_type = str(conf.get("peft_type") or "").upper()
    except (OSError, ValueError, AttributeError):
        return None
    if peft_type == "LORA" and conf.get("use_dora"):
        return (
            "it is a DoRA adapter (LORA with use_dora), and vLLM does not serve DoRA; merge it into full weights "
            "with `tuneloop merge` and serve the merged version (method=dora runs register it merged)"
        )
    if peft_type in ("ADALORA", "IA3", "LOHA", "LOKR", "OFT"):
        return (
            f"it is a {peft_type} adapter, and vLLM serves only LoRA adapters; merge it into full weights with "
            f"`tuneloop merge` and serve the merged version (method={peft_type.lower()} runs register it merged)"
        )
    if peft_type != "LORA":
        return (
            f"it is a {peft_type or 'non-LoRA'} adapter, and vLLM serves only LoRA adapters (nor can "
            "`tuneloop merge` merge it: its virtual tokens are not weights); evaluate it with `tuneloop eval` "
            "(transformers generates for it), or retrain with method=lora (or dora, ia3, qlora ...: a method "
            "that is served, docs/training.md) to serve it"
        )
    return None


_JSON = {"source", "card", "parent_ids", "config", "metrics", "tracking"}
_Record = TypeVar("_Record", DatasetRecord, RunRecord, ModelVersion)


def _row_to(cls: type[_Record], row: dict[str, Any]) -> _Record:
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: (loads(v) if k in _JSON else v) for k, v in row.items() if k in names}
    for k in _JSON & names:
        if kw.get(k) is None:
            kw.pop(k, None)
    return cls(**kw)


def _insert(con: Connection, table: str, rec: DatasetRecord | RunRecord | ModelVersion, on_conflict: str = "") -> bool:
    """Insert ``rec``; with ``on_conflict`` (the key columns) a row already there is left alone. True if inserted."""
    d = dataclasses.asdict(rec)
    cols = list(d)
    vals = [dumps(d[c]) if c in _JSON else d[c] for c in cols]
    sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    if not on_conflict:
        con.execute(sql, vals)
        return True
    return bool(con.execute(f"{sql} ON CONFLICT ({on_conflict}) DO NOTHING RETURNING 1", vals).fetchall())


# ---- datasets ---------------------------------------------------------------


def register_dataset(db: Database, rec: DatasetRecord) -> DatasetRecord:
    """Insert a dataset; registering identical content under the same id is a no-op."""
    rec.created_at = rec.created_at or utcnow()
    with db.connect() as con:
        if not _insert(con, "datasets", rec, on_conflict="id"):
            return get_dataset(db, rec.id, con=con)
    return rec


def get_dataset(db: Database, ref: str, con: Connection | None = None) -> DatasetRecord:
    """By id (``name@hash``), by name (newest) or by hash prefix."""
    sql = """SELECT * FROM datasets WHERE id = ? OR name = ? OR content_hash LIKE ? || '%'
             ORDER BY (id = ?) DESC, created_at DESC LIMIT 1"""
    rows = _q(db, sql, [ref, ref, ref, ref], con)
    if not rows:
        raise RegistryError(f"unknown dataset {ref!r}; see `tuneloop data list`")
    return _row_to(DatasetRecord, rows[0])


def list_datasets(db: Database) -> list[DatasetRecord]:
    """Every registered dataset, oldest first."""
    return [_row_to(DatasetRecord, r) for r in db.query("SELECT * FROM datasets ORDER BY created_at")]


# ---- runs -------------------------------------------------------------------


def start_run(
    db: Database,
    method: str,
    base_model: str,
    dataset_id: str | None,
    config: dict[str, Any],
    run_id: str | None = None,
    tracking: dict[str, Any] | None = None,
) -> RunRecord:
    """Insert a ``running`` row (a resumed, unfinished run's row is replaced); ``tracking`` says where the
    run is also tracked (experiment trackers), None when nowhere else."""
    rec = RunRecord(
        id=run_id or new_id(),
        method=method,
        base_model=base_model,
        dataset_id=dataset_id,
        config=config,
        started_at=utcnow(),
        tracking=tracking or None,
    )
    with db.connect() as con:
        con.execute(
            "DELETE FROM runs WHERE id = ? AND status <> 'succeeded'", [rec.id]
        )  # a resumed run restarts its row
        _insert(con, "runs", rec)
    return rec


def finish_run(
    db: Database,
    run: RunRecord,
    status: str,
    metrics: dict[str, Any] | None = None,
    output_path: str | None = None,
    artifact_hash: str | None = None,
    error: str | None = None,
) -> RunRecord:
    run.status, run.finished_at = status, utcnow()
    run.duration_s = (run.finished_at - run.started_at).total_seconds() if run.started_at else None
    run.metrics = metrics or run.metrics
    run.output_path, run.artifact_hash, run.error = output_path, artifact_hash, error
    db.execute(
        "UPDATE runs SET status=?, finished_at=?, duration_s=?, metrics=?, output_path=?, artifact_hash=?, error=? WHERE id=?",
        [status, run.finished_at, run.duration_s, dumps(run.metrics), output_path, artifact_hash, error, run.id],
    )
    return run


def get_run(db: Database, run_id: str) -> RunRecord:
    rows = db.query(
        "SELECT * FROM runs WHERE id = ? OR id LIKE ? || '%' ORDER BY started_at DESC LIMIT 1", [run_id, run_id]
    )
    if not rows:
        raise RegistryError(f"unknown run {run_id!r}")
    return _row_to(RunRecord, rows[0])


# ---- model versions -----------------------------------------------------------


def register_version(db: Database, v: ModelVersion) -> ModelVersion:
    """Insert a version. Same name + same hash is idempotent; same name, other hash is an error."""
    if v.kind not in KINDS:
        raise RegistryError(f"kind must be one of {KINDS}, got {v.kind!r}")
    if v.task not in TASKS:
        raise RegistryError(f"task must be one of {TASKS}, got {v.task!r}")
    v.created_at = v.created_at or utcnow()
    with db.connect() as con:
        if _insert(con, "model_versions", v, on_conflict="name"):
            record_event(con, v.name, None, v.stage, "tuneloop", "registered", {"content_hash": v.content_hash})
            return v
        have = get_version(db, v.name, con=con)
    if have.content_hash == v.content_hash:
        return have
    raise RegistryError(f"version {v.name!r} exists with other content; versions are immutable, pick a new name")


def get_version(db: Database, name: str, con: Connection | None = None) -> ModelVersion:
    v = find_version(db, name, con=con)
    if v is None:
        raise RegistryError(f"unknown model version {name!r}; see `tuneloop models list`")
    return v


def find_version(db: Database, name: str, con: Connection | None = None) -> ModelVersion | None:
    """The version called ``name``, or None."""
    rows = _q(db, "SELECT * FROM model_versions WHERE name = ?", [name], con)
    return _row_to(ModelVersion, rows[0]) if rows else None


def version_names(db: Database) -> set[str]:
    """Every registered version name (to pick a new one)."""
    return {r["name"] for r in db.query("SELECT name FROM model_versions")}


def trained_version_run(db: Database, name: str) -> str | None:
    """The run id of version ``name`` when it is registered from a run that succeeded, else None."""
    rows = db.query(
        """SELECT v.run_id FROM model_versions v JOIN runs r ON r.id = v.run_id
           WHERE v.name = ? AND r.status = 'succeeded'""",
        [name],
    )
    return rows[0]["run_id"] if rows else None


def list_versions(db: Database, stage: str | None = None, task: str | None = None) -> list[ModelVersion]:
    """Versions (of ``stage`` and ``task`` when given), oldest first."""
    where = [c for c, v in (("stage = ?", stage), ("task = ?", task)) if v]
    sql = "SELECT * FROM model_versions" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY created_at"
    return [_row_to(ModelVersion, r) for r in db.query(sql, [v for v in (stage, task) if v])]


def version_by_stage(db: Database, stage: str, task: str = "chat") -> ModelVersion | None:
    """The version of ``task`` in ``stage`` (the latest moved there), or None."""
    rows = db.query(
        "SELECT * FROM model_versions WHERE stage = ? AND task = ? ORDER BY stage_changed_at DESC NULLS LAST LIMIT 1",
        [stage, task],
    )
    return _row_to(ModelVersion, rows[0]) if rows else None


def task_of(con: Connection, name: str) -> str | None:
    """The task of version ``name`` in the caller's transaction, or None when there is no such version."""
    row = con.execute("SELECT task FROM model_versions WHERE name = ?", [name]).fetchone()
    return str(row[0] or "chat") if row else None


def lock_deploy_state(db: Database, con: Connection) -> None:
    """Serialise deploy transitions: on PostgreSQL take the transaction-scoped advisory lock every stage
    change and canary transition takes first (re-entrant, released at commit or rollback); on DuckDB a
    no-op, as one ``connect()`` block at a time holds the file (see module doc)."""
    if db.backend == "postgres":
        con.execute(_PG_DEPLOY_LOCK)


_PG_DEPLOY_LOCK = "SELECT pg_advisory_xact_lock(hashtext('deploy_state'))"


def set_stage(
    db: Database,
    name: str,
    stage: str,
    actor: str = "tuneloop",
    reason: str = "",
    details: dict[str, Any] | None = None,
    con: Connection | None = None,
    retire_reason: str | None = None,
) -> str:
    """Move ``name`` to ``stage`` (recording the event); returns the stage it left. Promoting to production
    (or canary) retires the version of the same task that held that stage, with ``retire_reason`` (default
    "replaced by NAME").

    A version the server cannot serve (:func:`unservable_reason`) never reaches ``production`` or ``canary``.
    Takes the deploy lock and changes the stage only if it is still the one read (see module doc).
    """
    if stage not in STAGES:
        raise RegistryError(f"stage must be one of {STAGES}, got {stage!r}")

    def run(c: Connection) -> str:
        lock_deploy_state(db, c)
        row = c.execute("SELECT stage, kind, path, task FROM model_versions WHERE name = ?", [name]).fetchone()
        if not row:
            raise RegistryError(f"unknown model version {name!r}")
        why = unservable_reason(row[1], row[2]) if stage in ("production", "canary") else None
        if why:
            raise RegistryError(f"{name} cannot be served, so it cannot go to {stage}: {why}")
        now = utcnow()
        if stage in ("production", "canary"):
            retired = c.execute(
                """UPDATE model_versions SET stage = 'retired', stage_changed_at = ?
                   WHERE stage = ? AND name <> ? AND task = ? RETURNING name""",
                [now, stage, name, row[3] or "chat"],
            ).fetchall()
            for (other,) in sorted(retired):
                record_event(c, other, stage, "retired", actor, retire_reason or f"replaced by {name}", None)
        moved = c.execute(
            "UPDATE model_versions SET stage = ?, stage_changed_at = ? WHERE name = ? AND stage = ? RETURNING name",
            [stage, now, name, row[0]],
        ).fetchall()
        if not moved:
            raise RegistryError(f"{name} left stage {row[0]} while it was being moved to {stage}; try again")
        record_event(c, name, row[0], stage, actor, reason, details)
        return str(row[0])

    if con is not None:
        return run(con)
    with db.connect() as c:
        return run(c)


# ---- eval reports ---------------------------------------------------------------


def save_eval_report(
    db: Database,
    report_id: str,
    dataset_id: str | None,
    models: list[str],
    report: dict[str, Any],
    path: str | None,
    created_at: datetime | None = None,
) -> None:
    """Store an evaluation report (``trainer.evaluate``'s JSON) under ``report_id``."""
    db.execute(
        "INSERT INTO eval_reports (id, dataset_id, models, report, path, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        [report_id, dataset_id, dumps(models), dumps(report), path, created_at or utcnow()],
    )


def find_eval_report(db: Database, ref: str) -> dict[str, Any] | None:
    """The newest eval report whose id is ``ref`` or starts with it, as ``{"id", "report"}`` (parsed), or None."""
    rows = db.query(
        "SELECT id, report FROM eval_reports WHERE id = ? OR id LIKE ? || '%' ORDER BY created_at DESC LIMIT 1",
        [ref, ref],
    )
    if not rows:
        return None
    return {"id": rows[0]["id"], "report": loads(rows[0]["report"])}


def record_event(
    con: Connection,
    version: str,
    from_stage: str | None,
    to_stage: str,
    actor: str,
    reason: str,
    details: dict[str, Any] | None,
) -> None:
    """Append one ``deploy_events`` row in the caller's transaction."""
    con.execute(
        "INSERT INTO deploy_events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [new_id(), version, from_stage, to_stage, actor, reason, dumps(details), utcnow()],
    )


def _q(db: Database, sql: str, params: list[Any], con: Connection | None = None) -> list[dict[str, Any]]:
    if con is None:
        return db.query(sql, params)
    return rows_as_dicts(con.execute(sql, params))
