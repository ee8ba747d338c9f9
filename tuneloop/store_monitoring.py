"""The monitoring tables outside the request log: drift reports and reference profiles, plus the small counts
commands show. Every statement is portable between the DuckDB file and PostgreSQL.

Contract
--------
* :func:`save_drift_reports` appends the rows of one drift computation (one row per
  feature, the ``drift_reports`` columns in table order) in one transaction.
* :func:`latest_overall_drift` is the newest ``overall`` row of a version (optionally
  only drifted ones, only after a time); :func:`overall_drift_history` every
  ``overall`` row, oldest first (the HTML report's time series).
* :func:`replace_profile` stores a version's reference profile, replacing the older one,
  in one transaction; :func:`profile_row` reads it back as ``(dataset_id, profile JSON
  text, embeddings bytes, embedding_dim)`` from a database or from any connection whose
  ``execute`` takes ``?`` placeholders (either backend's, or a DuckDB analytics
  connection the table was copied onto).
* :func:`log_counts` is the number of logged requests and of feedback rows (with a
  correction); :func:`feedback_since` the feedback rows created after a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from tuneloop.db import Database, utcnow


def save_drift_reports(db: Database, rows: Sequence[Sequence[Any]]) -> None:
    with db.connect() as con:
        con.executemany("INSERT INTO drift_reports VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)


def latest_overall_drift(
    db: Database, version: str, since: datetime | None = None, drifted_only: bool = False
) -> dict[str, Any] | None:
    """The newest ``overall`` drift row of ``version`` (``value``, ``threshold``, ``drifted``, ``created_at``)."""
    sql = "SELECT value, threshold, drifted, created_at FROM drift_reports WHERE model_version = ? AND feature = 'overall'"
    params: list[Any] = [version]
    if since is not None:
        sql += " AND created_at > ?"
        params.append(since)
    if drifted_only:
        sql += " AND drifted"
    rows = db.query(sql + " ORDER BY created_at DESC LIMIT 1", params)
    return rows[0] if rows else None


def overall_drift_history(db: Database) -> list[dict[str, Any]]:
    """Every ``overall`` drift row (``model_version``, ``created_at``, ``value``), oldest first."""
    return db.query(
        "SELECT model_version, created_at, value FROM drift_reports WHERE feature = 'overall' ORDER BY created_at"
    )


def replace_profile(
    db: Database,
    version: str,
    dataset_id: str | None,
    profile_json: str | None,
    embeddings: bytes | None,
    embedding_dim: int | None,
) -> None:
    with db.connect() as con:
        con.execute("DELETE FROM reference_profiles WHERE model_version = ?", [version])
        con.execute(
            """INSERT INTO reference_profiles (model_version, dataset_id, profile, embeddings, embedding_dim, created_at)
               VALUES (?, ?, ?, ?, ?, ?)""",
            [version, dataset_id, profile_json, embeddings, embedding_dim, utcnow()],
        )


def profile_row(db: Database, version: str, con: Any | None = None) -> tuple[Any, ...] | None:
    sql = "SELECT dataset_id, profile, embeddings, embedding_dim FROM reference_profiles WHERE model_version = ?"
    if con is not None:
        rows = con.execute(sql, [version]).fetchall()
        return tuple(rows[0]) if rows else None
    found = db.query(sql, [version])
    return tuple(found[0].values()) if found else None


def log_counts(db: Database) -> dict[str, int]:
    """``requests``: logged requests; ``feedback``: feedback rows; ``corrections``: those with a correction."""
    n = db.query("SELECT count(*) AS n FROM requests")[0]["n"]
    f = db.query("SELECT count(*) AS n, count(correction) AS c FROM feedback")[0]
    return {"requests": int(n), "feedback": int(f["n"]), "corrections": int(f["c"])}


def feedback_since(db: Database, since: datetime) -> int:
    """How many feedback rows were created after ``since``."""
    return int(db.query("SELECT count(*) AS n FROM feedback WHERE created_at > ?", [since])[0]["n"])
