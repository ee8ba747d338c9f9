"""Storage entry point: :func:`open_database` picks the backend for ``database.url``; the interface and helpers.

Contract
--------
* ``open_database(url)``: a ``postgresql://`` (or ``postgres://``) URL is the
  shared PostgreSQL backend (:class:`~tuneloop.db_postgres.PostgresDatabase`);
  anything else is the path of the embedded DuckDB file
  (:class:`~tuneloop.db_duckdb.DuckDatabase`; ``duckdb:///abs/path`` also works).
* Everything a caller needs is importable from here: :class:`Database` (the
  interface, :mod:`tuneloop.dbapi`), :class:`DatabaseBusy`, :class:`CachedRead`
  and the column helpers :func:`utcnow`, :func:`dumps`, :func:`loads`.
"""

from __future__ import annotations

from pathlib import Path

from tuneloop.db_duckdb import DuckDatabase, migrate
from tuneloop.dbapi import CachedRead, Database, DatabaseBusy, dumps, loads, mask_url, rows_as_dicts, utcnow

__all__ = [
    "CachedRead",
    "Database",
    "DatabaseBusy",
    "DuckDatabase",
    "dumps",
    "is_postgres_url",
    "loads",
    "mask_url",
    "migrate",
    "open_database",
    "rows_as_dicts",
    "utcnow",
]


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def open_database(
    url: str | Path, lock_timeout_s: float = 60.0, read_only: bool = False, pool_size: int = 4
) -> Database:
    """The database at ``url``: PostgreSQL for a ``postgresql://`` URL, else a DuckDB file path (see module doc)."""
    s = str(url)
    if is_postgres_url(s):
        from tuneloop.db_postgres import PostgresDatabase

        return PostgresDatabase(s, lock_timeout_s=lock_timeout_s, read_only=read_only, pool_size=pool_size)
    s = s.removeprefix("duckdb://")
    return DuckDatabase(s, lock_timeout_s=lock_timeout_s, read_only=read_only)
