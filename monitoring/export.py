"""Export one replica's closed windows of request log and feedback as hive-partitioned Parquet.

Contract
--------
* :func:`export_logs` copies the rows of ``requests`` (dated by
  ``received_at``) and ``feedback`` (dated by ``created_at``) of one database
  into ``<out>/<table>/date=YYYY-MM-DD/model_version=<v>/<replica>-<start>-<i>.parquet``
  with DuckDB ``COPY ... TO ... (FORMAT parquet, PARTITION_BY (date,
  model_version))``. Rows carry a ``replica`` column; the replica name
  prefixes every file name, so any number of replicas export into one folder
  (or object-store prefix) without overwriting each other. Partition values
  are URL-escaped by DuckDB (a NULL version is ``__HIVE_DEFAULT_PARTITION__``);
  :mod:`monitoring.sources` reads them back with the table's exact types.
* Only **closed windows** are exported: windows are ``window_s`` long, aligned
  to the UTC epoch, and a window is closed once it ended ``grace_s`` ago (the
  request-log writer may still hold its last rows for one flush interval).
  Each run exports ``[start, end)`` with ``start`` = the end of the last
  exported window of this replica (else ``since``, else the oldest row's
  window) and ``end`` = the last closed window's end (or ``until``).
* **Idempotent.** The last exported window end per table is remembered in
  ``<out>/_manifests/<replica>.json`` (written atomically after the data): a
  repeated run exports nothing new. File names are derived from the range's
  start, so a run interrupted between the data and the manifest is redone by
  the next run, overwriting the same files with the same (or more) rows.
* Bad input (a replica name that is not a plain file-name token, ``until``
  before ``since``, a non-positive window) raises
  :class:`~tuneloop.errors.UserError` before anything is written.
* Both backends write the same files with the same rows and types. From a
  DuckDB file, DuckDB's COPY reads the table. From PostgreSQL, the range's
  rows are streamed as Arrow record batches (ADBC, binary COPY underneath)
  into the same DuckDB COPY (an in-memory DuckDB holds a few batches at a
  time, never the whole range); the boundary queries are portable SQL on the
  server. A shared database holds every replica's rows, so it is exported by
  one name: the default is ``pg-<database name>`` (:func:`default_replica`),
  the same from any host, so the manifest continues whichever host (a cron
  job's pod) runs it; each row keeps the replica that served it
  (``requests.replica``) in its ``replica`` column.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.db import Database, utcnow
from tuneloop.errors import UserError
from tuneloop.monitoring.sources import TABLES, TIME_COLUMN, _sql_str, is_url, table_columns

if TYPE_CHECKING:
    import duckdb

_REPLICA_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
EPOCH = datetime(1970, 1, 1)


@dataclass
class TableExport:
    """What one run exported for one table."""

    table: str
    start: datetime | None
    end: datetime | None
    rows: int = 0
    skipped: str | None = None  # why nothing was exported


@dataclass
class ExportResult:
    replica: str
    out: str
    tables: list[TableExport] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)

    def as_dict(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "out": self.out,
            "rows": self.rows,
            "tables": [
                {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in asdict(t).items()}
                for t in self.tables
            ],
        }


def default_replica(db: Database | None = None) -> str:
    """The exporter's name when none is given: for a shared PostgreSQL database ``pg-<database name>`` (the same
    from every host, so whichever runs the export continues the same manifest); else ``$TUNELOOP_REPLICA``, else
    the host name (the pod name on Kubernetes)."""
    if db is not None and db.backend == "postgres":
        from urllib.parse import urlsplit

        name = "pg-" + (urlsplit(db.url).path.strip("/") or "postgres")
    else:
        name = os.environ.get("TUNELOOP_REPLICA") or socket.gethostname() or "replica"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)[:128]


def floor_window(t: datetime, window_s: float) -> datetime:
    """The start of the ``window_s`` window (aligned to the epoch) holding ``t``."""
    secs = (t - EPOCH).total_seconds()
    return EPOCH + timedelta(seconds=(secs // window_s) * window_s)


def _naive_utc(t: datetime | None) -> datetime | None:
    if t is None or t.tzinfo is None:
        return t
    return t.astimezone(UTC).replace(tzinfo=None)


def manifest_path(out: str, replica: str) -> str:
    return out.rstrip("/") + f"/_manifests/{replica}.json"


def read_manifest(out: str, replica: str) -> dict[str, Any]:
    """The replica's export state (``{}`` before its first export)."""
    p = manifest_path(out, replica)
    if is_url(out):
        import duckdb

        con = duckdb.connect()
        try:
            con.execute("INSTALL httpfs; LOAD httpfs")
            try:
                row = con.execute(f"SELECT content FROM read_text({_sql_str(p)})").fetchone()
            except duckdb.Error:
                return {}
        finally:
            con.close()
        return {} if row is None else json.loads(row[0])
    if not os.path.exists(p):
        return {}
    try:
        return json.loads(Path(p).read_text())
    except ValueError as e:
        raise UserError(f"{p}: unreadable export manifest ({e}); delete it to re-export everything") from None


def _write_manifest(out: str, replica: str, state: dict[str, Any]) -> None:
    p = manifest_path(out, replica)
    text = json.dumps(state, indent=2, default=str)
    if is_url(out):
        import duckdb

        con = duckdb.connect()
        try:
            con.execute("INSTALL httpfs; LOAD httpfs")
            con.execute(
                f"COPY (SELECT {_sql_str(text)} AS content) TO {_sql_str(p)} (FORMAT csv, HEADER false, QUOTE '')"
            )
        finally:
            con.close()
        return
    os.makedirs(os.path.dirname(p), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(p), prefix=f".{replica}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, p)


def export_logs(
    db: Database,
    out: str | os.PathLike,
    replica: str | None = None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    window_s: float = 3600.0,
    grace_s: float = 60.0,
    now: datetime | None = None,
) -> ExportResult:
    """Export this replica's closed windows of ``requests`` and ``feedback`` to ``out`` (see module doc)."""
    replica = replica or default_replica(db)
    if not _REPLICA_RE.match(replica):
        raise UserError(f"replica name {replica!r} must be letters, digits, '.', '_' or '-' (at most 128)")
    if window_s <= 0:
        raise UserError(f"window must be positive, got {window_s:g} s")
    since, until = _naive_utc(since), _naive_utc(until)
    if since and until and until <= since:
        raise UserError(f"--until ({until}) must be after --since ({since})")
    out = str(out)
    if not is_url(out):
        out = os.path.abspath(out)
        if os.path.exists(out) and not os.path.isdir(out):
            raise UserError(f"--out {out} exists and is not a folder")
        os.makedirs(out, exist_ok=True)
    now = _naive_utc(now) or utcnow()
    closed_end = floor_window(now - timedelta(seconds=grace_s), window_s)
    end_cap = min(until, closed_end) if until else closed_end
    if not is_url(out):
        return _export(db, out, replica, since, end_cap, window_s)
    import duckdb

    try:
        return _export(db, out, replica, since, end_cap, window_s)
    except duckdb.Error as e:  # httpfs not installable offline, no credentials, endpoint unreachable ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot export to {out}: {first}. Object-store exports need DuckDB's httpfs extension (downloaded on "
            "first use: network access, or `INSTALL httpfs` ahead of time), a reachable endpoint and credentials "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_REGION, or a DuckDB secret). Nothing was marked as "
            "exported: rerun when it is reachable"
        ) from None


def _export(
    db: Database, out: str, replica: str, since: datetime | None, end_cap: datetime, window_s: float
) -> ExportResult:
    state = read_manifest(out, replica)
    result = ExportResult(replica, out)
    with _reader(db) as rd:
        if is_url(out):
            rd.duck.execute("INSTALL httpfs; LOAD httpfs")
        for table in TABLES:
            tcol = TIME_COLUMN[table]
            done = state.get(table, {}).get("until")
            start = datetime.fromisoformat(done) if done else None
            if since and (start is None or since > start):
                start = since
            if start is None:
                oldest = rd.scalar(f"SELECT min({tcol}) FROM {table}")
                if oldest is None:
                    result.tables.append(TableExport(table, None, None, skipped="no rows"))
                    continue
                start = floor_window(oldest, window_s)
            if end_cap <= start:
                result.tables.append(
                    TableExport(table, start, end_cap, skipped="no closed window after the last export")
                )
                continue
            n = rd.copy(table, out, replica, start, end_cap)
            result.tables.append(TableExport(table, start, end_cap, rows=n))
            entry = state.setdefault(table, {"rows": 0, "runs": 0})
            entry.update(
                until=end_cap.isoformat(),
                rows=int(entry.get("rows", 0)) + n,
                runs=int(entry.get("runs", 0)) + 1,
                last_export_at=utcnow().isoformat(),
            )
    if any(t.skipped is None for t in result.tables):
        state.update(replica=replica, window_s=window_s, format=1)
        _write_manifest(out, replica, state)
    return result


@contextlib.contextmanager
def _reader(db: Database) -> Iterator[_Reader]:
    """Where an export reads: the DuckDB file itself, or PostgreSQL streamed into an in-memory DuckDB."""
    if db.backend != "postgres":
        with db.analytics() as con:
            yield _DuckReader(con)
        return
    import duckdb

    con = duckdb.connect()
    try:
        yield _PostgresReader(con, db)
    finally:
        con.close()


def _copy_sql(source: str, table: str, out: str, replica: str, start: datetime) -> str:
    """``COPY`` of ``source``'s rows (``table``'s columns) into ``out/table`` as partitioned Parquet."""
    tcol = TIME_COLUMN[table]
    names = [n for n, _ in table_columns(table)]
    cols = ", ".join(n for n in names if n != "replica")
    # the replica that served a row (requests.replica, shared backend) wins over the exporting one's name
    who = f"coalesce(replica, {_sql_str(replica)})" if "replica" in names else _sql_str(replica)
    target = _sql_str(out.rstrip("/") + f"/{table}")
    pattern = _sql_str(f"{replica}-{start:%Y%m%dT%H%M%S}-{{i}}")
    if not is_url(out):
        os.makedirs(os.path.join(out, table), exist_ok=True)
    return f"""COPY (SELECT {cols}, {who} AS replica, CAST({tcol} AS DATE) AS date
                  FROM {source}
                  ORDER BY {tcol}, id)
            TO {target} (FORMAT parquet, PARTITION_BY (date, model_version), FILENAME_PATTERN {pattern},
                         OVERWRITE_OR_IGNORE true, COMPRESSION zstd)"""


class _Reader:
    """The rows of one database an export reads, and the DuckDB connection (``duck``) that writes the Parquet."""

    duck: duckdb.DuckDBPyConnection

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        raise NotImplementedError

    def copy(self, table: str, out: str, replica: str, start: datetime, end: datetime) -> int:
        """``COPY`` the rows of ``table`` in ``[start, end)`` into partitioned Parquet; returns the row count."""
        raise NotImplementedError


class _DuckReader(_Reader):
    """The DuckDB file: DuckDB's COPY reads the table directly."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.duck = con

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self.duck.execute(sql, list(params)).fetchone()
        return None if row is None else row[0]

    def copy(self, table: str, out: str, replica: str, start: datetime, end: datetime) -> int:
        tcol = TIME_COLUMN[table]
        n = self.scalar(f"SELECT count(*) FROM {table} WHERE {tcol} >= ? AND {tcol} < ?", [start, end])
        if not n:
            return 0
        # literals, not parameters: DuckDB does not bind parameters inside COPY (query) TO
        source = f"""(SELECT * FROM {table}
                      WHERE {tcol} >= TIMESTAMP {_sql_str(start.isoformat(sep=" "))}
                        AND {tcol} < TIMESTAMP {_sql_str(end.isoformat(sep=" "))})"""
        self.duck.execute(_copy_sql(source, table, out, replica, start))
        return int(n)


class _PostgresReader(_Reader):
    """PostgreSQL: the window's rows are streamed as Arrow record batches (ADBC, binary COPY underneath) into
    DuckDB's COPY, so an export of any size holds a few batches in memory, never the whole window."""

    def __init__(self, duck: duckdb.DuckDBPyConnection, db: Database) -> None:
        self.duck, self.db = duck, db

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        with self.db.connect(transaction=False) as con:
            row = con.execute(sql, list(params)).fetchone()
        return None if row is None else row[0]

    def copy(self, table: str, out: str, replica: str, start: datetime, end: datetime) -> int:
        from tuneloop.db_postgres import PostgresDatabase

        assert isinstance(self.db, PostgresDatabase)
        tcol = TIME_COLUMN[table]
        cols = ", ".join(n for n, _ in table_columns(table))
        sql = f"SELECT {cols} FROM {table} WHERE {tcol} >= ? AND {tcol} < ?"
        with self.db.arrow_batches(sql, [start, end]) as reader:
            self.duck.register("_tl_export_rows", reader)
            try:
                row = self.duck.execute(_copy_sql("_tl_export_rows", table, out, replica, start)).fetchone()
            finally:
                self.duck.unregister("_tl_export_rows")
        return 0 if row is None else int(row[0])
