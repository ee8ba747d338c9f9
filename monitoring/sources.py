"""Where request-log and feedback rows are read from: one DuckDB database, or Parquet exports of many.

Contract
--------
* :func:`open_requests` makes the relations ``requests`` and ``feedback`` on an
  open DuckDB connection come from ``source``:

  - ``source=None``: nothing changes; the connection's own tables are used
    (one box, one database).
  - ``source`` = a folder (or an object-store URL DuckDB's httpfs reaches)
    holding exports written by :mod:`monitoring.export`: TEMP views named
    ``requests`` and ``feedback`` are created over
    ``read_parquet('<source>/<table>/**/*.parquet', hive_partitioning=true)``.
    TEMP views shadow the database tables of the same name for this
    connection only (the file is not modified, read-only connections work),
    so every other table (``model_versions``, ``reference_profiles`` ...)
    still comes from the database.

  The views expose exactly the columns of the tables in
  :mod:`tuneloop.migrations`, with the same names and types (hive partition
  values are decoded and cast back, JSON stays JSON), plus one extra column
  ``replica`` naming the replica that exported the row. A source without any
  file for a table gives an empty relation with the right columns; a column
  that no file has (exports written before a migration added it, e.g.
  ``requests.tool_calls``) reads as NULL. A folder
  that does not exist raises :class:`~tuneloop.errors.UserError`.
* :class:`LogSource` bundles a database with an optional Parquet source, with
  ``connect()`` (a DuckDB connection whose ``requests``/``feedback`` come from
  the source) and ``query(sql, params)`` (rows as dicts, like
  :meth:`tuneloop.db.Database.query`). Commands that take ``--from-parquet DIR``
  build one with :func:`log_source` and run their SQL unchanged. The SQL is
  DuckDB SQL whatever the backend:

  - DuckDB file: the connection is the file itself (``Database.analytics``),
    every table is there; a Parquet source shadows the two log tables.
  - PostgreSQL: the connection is an in-memory DuckDB onto which the rows are
    copied as Arrow (``PostgresDatabase.analytics``). Only the tables asked
    for are there: ``requests`` and ``feedback`` (unless a Parquet source
    replaces them) plus ``tables=(...)`` (e.g. ``model_versions``,
    ``reference_profiles``), copied whole. ``since``/``until``/
    ``model_version`` narrow what is copied of ``requests`` (``received_at``
    in ``[since, until]``, that version) and of ``feedback`` (the feedback on
    those requests), so a drift pass copies its window, not the log. They are
    a promise by the caller that its SQL reads nothing outside them; on a
    DuckDB file or Parquet they copy nothing and change nothing.
  - ``query(..., portable=True)``: the statement is portable SQL (plain
    SELECT, see :mod:`tuneloop.dbapi`); without a Parquet source it runs on
    the database itself, so PostgreSQL reads only what it needs instead of
    copying tables (e.g. the versions with traffic, a window's first request).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import duckdb

from tuneloop.db import Database, rows_as_dicts
from tuneloop.errors import UserError

TABLES = ("requests", "feedback")
# the column that dates a row of each table (partitioning and export windows)
TIME_COLUMN = {"requests": "received_at", "feedback": "created_at"}


@functools.cache
def table_columns(table: str) -> tuple[tuple[str, str], ...]:
    """``((name, duckdb_type), ...)`` of ``table`` as the migrations define it."""
    from tuneloop.db import migrate

    con = duckdb.connect()
    try:
        migrate(con)
        rows = con.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
            [table],
        ).fetchall()
    finally:
        con.close()
    if not rows:
        raise ValueError(f"no table {table!r} in the schema")
    return tuple((str(n), str(t)) for n, t in rows)


def is_url(source: str) -> bool:
    return "://" in source


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _has_files(source: str, table: str) -> bool:
    if is_url(source):
        return True  # let DuckDB list the object store; an empty prefix raises there
    root = os.path.join(source, table)
    return any(any(f.endswith(".parquet") for f in files) for _dirpath, _dirs, files in os.walk(root))


def parquet_relation_sql(source: str, table: str, con: duckdb.DuckDBPyConnection | None = None) -> str:
    """A SELECT giving ``table``'s columns (and ``replica``) from the Parquet exports under ``source``.

    With ``con`` (able to read ``source``), columns that no export file has are NULL of their type."""
    cols = tuple((n, t) for n, t in table_columns(table) if n != "replica")  # every export file has `replica`
    if not _has_files(source, table):
        body = ", ".join(f"CAST(NULL AS {t}) AS {n}" for n, t in cols)
        return f"SELECT {body}, CAST(NULL AS VARCHAR) AS replica WHERE false"
    glob = _sql_str(source.rstrip("/") + f"/{table}/**/*.parquet")
    scan = (
        f"read_parquet({glob}, hive_partitioning = true, union_by_name = true, "
        f"hive_types = {{'date': DATE, 'model_version': VARCHAR}})"
    )
    have = {str(r[0]) for r in con.execute(f"DESCRIBE SELECT * FROM {scan}").fetchall()} if con else None
    body = ", ".join(
        f"CAST({n} AS {t}) AS {n}" if have is None or n in have else f"CAST(NULL AS {t}) AS {n}" for n, t in cols
    )
    return f"SELECT {body}, CAST(replica AS VARCHAR) AS replica FROM {scan}"


def open_requests(con: duckdb.DuckDBPyConnection, source: str | os.PathLike | None) -> None:
    """Make ``requests`` and ``feedback`` on ``con`` come from ``source`` (see module doc)."""
    if source is None:
        return
    source = str(source)
    if not is_url(source) and not os.path.isdir(source):
        raise UserError(
            f"--from-parquet: {source} is not a folder of exported logs (see `tuneloop export logs --help`)"
        )
    if not is_url(source):
        for table in TABLES:
            con.execute(f"CREATE OR REPLACE TEMP VIEW {table} AS {parquet_relation_sql(source, table, con)}")
        return
    try:
        con.execute("INSTALL httpfs; LOAD httpfs")
        for table in TABLES:
            con.execute(f"CREATE OR REPLACE TEMP VIEW {table} AS {parquet_relation_sql(source, table, con)}")
    except duckdb.Error as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"--from-parquet {source}: {first}. Object-store folders need DuckDB's httpfs extension (downloaded on "
            "first use: network access, or `INSTALL httpfs` ahead of time), a reachable endpoint and credentials"
        ) from None


@dataclass(frozen=True)
class LogSource:
    """A database plus, optionally, a folder of Parquet exports that replaces its request log and feedback."""

    db: Database | None
    parquet: str | None = None

    @property
    def copies(self) -> bool:
        """Whether :meth:`connect` copies the log rows (PostgreSQL without Parquet): narrowing pays off then."""
        return self.parquet is None and self.db is not None and self.db.backend == "postgres"

    @contextlib.contextmanager
    def connect(
        self,
        tables: Sequence[str] = (),
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        model_version: str | None = None,
    ) -> Iterator[duckdb.DuckDBPyConnection]:
        """A DuckDB connection whose ``requests``/``feedback`` come from the source; other tables from the
        database (on PostgreSQL only those named in ``tables``); see module doc for the narrowing arguments."""
        if self.db is None:
            con = duckdb.connect()
            try:
                open_requests(con, self.parquet)
                yield con
            finally:
                con.close()
            return
        if self.db.backend != "postgres":
            with self.db.analytics() as con:
                open_requests(con, self.parquet)
                yield con
            return
        from tuneloop.db_postgres import PostgresDatabase

        pg = self.db
        assert isinstance(pg, PostgresDatabase)
        wanted = list(dict.fromkeys(([] if self.parquet is not None else list(TABLES)) + list(tables)))
        where = log_window_filter(since, until, model_version) if self.parquet is None else {}
        with pg.analytics(wanted, where=where) as con:
            open_requests(con, self.parquet)
            yield con

    def query(
        self,
        sql: str,
        params: Sequence[Any] | None = None,
        *,
        tables: Sequence[str] = (),
        since: datetime | None = None,
        until: datetime | None = None,
        model_version: str | None = None,
        portable: bool = False,
    ) -> list[dict[str, Any]]:
        """Rows of one statement as dicts (JSON columns as text), like ``Database.query``; see module doc for
        ``portable`` and the narrowing arguments."""
        if portable and self.parquet is None and self.db is not None:
            return self.db.query(sql, list(params or []))
        with self.connect(tables, since=since, until=until, model_version=model_version) as con:
            return rows_as_dicts(con.execute(sql, list(params or [])))


def log_window_filter(
    since: datetime | None, until: datetime | None, model_version: str | None = None
) -> dict[str, tuple[str, list[Any]]]:
    """What to copy of ``requests`` and ``feedback`` for one window (``PostgresDatabase.analytics``'s ``where``):
    requests with ``received_at`` in ``[since, until]`` (and of ``model_version``), and the feedback on them.
    Portable SQL; ``{}`` when nothing narrows."""
    preds: list[str] = []
    params: list[Any] = []
    for pred, value in (
        ("received_at >= ?", since),
        ("received_at <= ?", until),
        ("model_version = ?", model_version),
    ):
        if value is not None:
            preds.append(pred)
            params.append(value)
    if not preds:
        return {}
    req = " AND ".join(preds)
    return {
        "requests": (req, params),
        "feedback": (f"request_id IN (SELECT id FROM requests WHERE {req})", list(params)),
    }


def log_source(db: Database | None, from_parquet: str | os.PathLike | None = None) -> LogSource:
    """The source a command reads: ``db`` alone, or ``db`` with its logs replaced by Parquet exports."""
    if from_parquet is not None:
        p = str(from_parquet)
        if not is_url(p):
            if not os.path.isdir(p):
                raise UserError(
                    f"--from-parquet: {p} is not a folder of exported logs (see `tuneloop export logs --help`)"
                )
            p = os.path.abspath(p)
        return LogSource(db, p)
    if db is None:
        raise UserError("no database and no --from-parquet folder to read logs from")
    return LogSource(db, None)
