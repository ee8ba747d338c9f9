"""The shared backend: a PostgreSQL server holds the system of record for every replica and CLI command.

Contract
--------
* :class:`PostgresDatabase` is a value (a ``postgresql://`` URL). Connections
  come from a small pool per process (``psycopg_pool``), checked before use, so
  a server restart costs a reconnect, not an error on a stale connection. When
  the server cannot be reached within ``lock_timeout_s``, :meth:`connect`
  raises :class:`~tuneloop.dbapi.DatabaseBusy` naming the URL (password masked).
* ``with db.connect() as con:`` is one transaction (``transaction=False`` too:
  PostgreSQL gives every statement a transaction anyway), committed at the end
  of the block, rolled back on error. ``con.execute(sql, params)`` takes the
  same ``?`` placeholders as DuckDB (rewritten to ``$n`` outside quotes and
  comments) and returns a cursor. JSON columns read back as text, as on DuckDB.
* Migrations (:mod:`tuneloop.migrations`, rendered for PostgreSQL) are applied
  once per process under a transaction-scoped advisory lock, so replicas that
  start together migrate once.
* Change notification: a block that wrote anything (and is not ``log_only``)
  sends ``NOTIFY tuneloop_changes`` in its transaction, so it is delivered on
  commit. :meth:`data_version` starts one listener thread per process on first
  use; it moves on every notification, and once a second while the listener is
  disconnected (pollers then re-read, which is always correct).
* Outage: while the listener cannot reach the server, :meth:`connect` fails at
  once with :class:`~tuneloop.dbapi.DatabaseBusy` instead of waiting out the
  pool timeout, so a serving process's per-request reads (API keys, deploy
  state) fall back to their cached values without stalling; it reconnects with
  back-off (at most 2 s between tries) and clears the flag.
* :meth:`analytics` copies the tables asked for into an in-memory DuckDB as
  Arrow (``adbc-driver-postgresql``), so statistics keep their one SQL dialect.
  ``where`` narrows what is copied (``{"requests": ("received_at >= ?", [t])}``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import psycopg
from psycopg import sql as pgsql

from tuneloop.dbapi import Backend, Database, DatabaseBusy, mask_url, utcnow
from tuneloop.migrations import MIGRATIONS, render

CHANNEL = "tuneloop_changes"
_MIGRATE_LOCK = 0x7475_6E65  # pg_advisory_xact_lock key ("tune")


def to_dollar(sql: str) -> str:
    """DuckDB-style ``?`` placeholders as PostgreSQL's ``$1, $2 ...``; quoted text and comments are left alone."""
    if "?" not in sql:
        return sql
    out: list[str] = []
    n = 0
    i, size = 0, len(sql)
    while i < size:
        c = sql[i]
        if c in ("'", '"'):
            j = i + 1
            while j < size:
                if sql[j] == c:
                    if j + 1 < size and sql[j + 1] == c:  # doubled quote inside the literal
                        j += 2
                        continue
                    break
                j += 1
            out.append(sql[i : j + 1])
            i = j + 1
        elif c == "-" and sql.startswith("--", i):
            j = sql.find("\n", i)
            j = size if j < 0 else j
            out.append(sql[i:j])
            i = j
        elif c == "?":
            n += 1
            out.append(f"${n}")
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


class PgConnection:
    """A pooled psycopg connection inside one transaction, with DuckDB's ``execute(sql, params)`` shape."""

    backend: Backend = "postgres"

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> psycopg.RawCursor:
        cur = psycopg.RawCursor(self.conn)
        cur.execute(to_dollar(sql), list(params) if params else None)
        return cur

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with psycopg.RawCursor(self.conn) as cur:
            cur.executemany(to_dollar(sql), rows)

    def copy_rows(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> int:
        """``COPY table (columns) FROM STDIN`` of ``rows``: the fastest way in (about 70k rows/s on 2 cores)."""
        stmt = pgsql.SQL("COPY {} ({}) FROM STDIN").format(
            pgsql.Identifier(table), pgsql.SQL(", ").join(pgsql.Identifier(c) for c in columns)
        )
        with self.conn.cursor() as cur, cur.copy(stmt) as cp:
            for r in rows:
                cp.write_row(r)
        return len(rows)


class _Pools:
    """This process's connection pools and change listener for one URL (a forked child makes its own)."""

    def __init__(self, url: str, size: int) -> None:
        from psycopg_pool import ConnectionPool

        self.pid = os.getpid()
        self.url = url
        self.migrated = False
        self.lock = threading.Lock()
        self.version = 0
        self.listening = False
        self.down = False  # the listener cannot reach the server: connect() fails fast until it can again
        self.unheard_at = 0.0  # when data_version last moved for want of a listener
        self.listener: threading.Thread | None = None
        self.stop = threading.Event()
        self.pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max(1, size),
            # keepalives and tcp_user_timeout: a connection hung by a network partition fails in seconds instead of
            # blocking its holder (the request-log writer mid-COPY) until the kernel gives up
            kwargs={
                "connect_timeout": 5,
                "application_name": "tuneloop",
                "keepalives": 1,
                "keepalives_idle": 5,
                "keepalives_interval": 2,
                "keepalives_count": 3,
                "tcp_user_timeout": 10_000,
            },
            # psycopg_pool backs off reconnect attempts up to its reconnect_timeout (default 300 s: 1, 2 ... 128 s
            # apart); 5 s keeps a server's return noticed within seconds (measured: 43 s -> 1 s after a 90 s outage)
            reconnect_timeout=5.0,
            configure=_configure,
            check=ConnectionPool.check_connection,
            open=False,
            name=f"tuneloop-{os.getpid()}",
        )
        self.pool.open(wait=False)

    def close(self) -> None:
        self.stop.set()
        self.pool.close(timeout=2.0)


def _configure(conn: psycopg.Connection) -> None:
    conn.adapters.register_loader("jsonb", psycopg.types.string.TextLoader)  # JSON as text, as DuckDB gives it
    conn.adapters.register_loader("json", psycopg.types.string.TextLoader)
    conn.execute("SET TIME ZONE 'UTC'")
    conn.commit()


class PostgresDatabase(Database):
    """Handle on a PostgreSQL database; see module doc."""

    backend: Backend = "postgres"

    def __init__(
        self,
        url: str,
        lock_timeout_s: float = 60.0,
        read_only: bool = False,
        pool_size: int = 4,
        _pools: dict[int, _Pools] | None = None,
    ) -> None:
        self._url = url
        self.lock_timeout_s = lock_timeout_s
        self.read_only = read_only
        self.pool_size = pool_size
        self._pools: dict[int, _Pools] = {} if _pools is None else _pools  # pid -> pools, shared by with_options

    def __repr__(self) -> str:
        return f"PostgresDatabase({mask_url(self._url)!r})"

    @property
    def url(self) -> str:
        return self._url

    def with_options(self, *, lock_timeout_s: float | None = None, read_only: bool | None = None) -> PostgresDatabase:
        return PostgresDatabase(
            self._url,
            lock_timeout_s=self.lock_timeout_s if lock_timeout_s is None else lock_timeout_s,
            read_only=self.read_only if read_only is None else read_only,
            pool_size=self.pool_size,
            _pools=self._pools,
        )

    def _state(self) -> _Pools:
        pid = os.getpid()
        st = self._pools.get(pid)
        if st is None:
            st = self._pools.setdefault(pid, _Pools(self._url, self.pool_size))
        return st

    def close(self) -> None:
        """Close this process's pools and listener (the server's shutdown; tests)."""
        st = self._pools.pop(os.getpid(), None)
        if st is not None:
            st.close()

    @contextlib.contextmanager
    def _conn(self) -> Iterator[psycopg.Connection]:
        from psycopg_pool import PoolTimeout

        st = self._state()
        if st.down:  # the listener found the server unreachable: fail now rather than wait out the timeout
            raise DatabaseBusy(f"PostgreSQL at {mask_url(self._url)} is unreachable (reconnecting)")
        try:
            cm = st.pool.connection(timeout=max(0.1, self.lock_timeout_s))
            conn = cm.__enter__()
        except PoolTimeout as e:
            raise DatabaseBusy(
                f"PostgreSQL at {mask_url(self._url)} did not answer within {self.lock_timeout_s:g} s: {e}"
            ) from None
        except psycopg.OperationalError as e:
            raise DatabaseBusy(f"cannot connect to PostgreSQL at {mask_url(self._url)}: {e}") from None
        try:
            yield conn
        except BaseException as e:
            cm.__exit__(type(e), e, e.__traceback__)
            raise
        else:
            cm.__exit__(None, None, None)

    @contextlib.contextmanager
    def connect(
        self, transaction: bool = True, log_only: bool = False, keep_open: bool = False
    ) -> Iterator[PgConnection]:
        with self._conn() as conn:
            if not self.read_only:
                self._migrate(conn)
            con = PgConnection(conn)
            try:
                if self.read_only:
                    conn.execute("SET TRANSACTION READ ONLY")
                yield con
                if not log_only and not self.read_only:
                    wrote = conn.execute("SELECT pg_current_xact_id_if_assigned() IS NOT NULL").fetchone()
                    if wrote and wrote[0]:
                        conn.execute(f"NOTIFY {CHANNEL}")
            except BaseException:
                with contextlib.suppress(psycopg.Error):
                    conn.rollback()
                raise
            conn.commit()

    def _migrate(self, conn: psycopg.Connection) -> None:
        st = self._state()
        if st.migrated:
            return
        with st.lock:
            if st.migrated:
                return
            migrate(conn)
            st.migrated = True

    def data_version(self) -> int:
        st = self._state()
        with st.lock:
            now = time.monotonic()
            if not st.listening and now - st.unheard_at >= 1.0:
                st.version += 1  # no listener (yet, or lost): a change every second at most, so pollers re-read
                st.unheard_at = now
                if st.listener is None or not st.listener.is_alive():
                    st.listener = threading.Thread(
                        target=self._listen, args=(st,), name="tuneloop-pg-listen", daemon=True
                    )
                    st.listener.start()
            return st.version

    def _listen(self, st: _Pools) -> None:
        delay = 0.1
        while not st.stop.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    with st.lock:
                        st.listening, st.down = True, False
                        st.version += 1  # anything written before LISTEN took effect is not missed
                    delay = 0.1
                    while not st.stop.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            with st.lock:
                                st.version += 1
            except psycopg.OperationalError:
                with st.lock:
                    st.down = True  # cannot connect, or the connection was cut
            except psycopg.Error:
                pass
            with st.lock:
                st.listening = False
            st.stop.wait(delay)
            delay = min(delay * 2, 2.0)

    @contextlib.contextmanager
    def analytics(
        self, tables: Sequence[str] = (), where: Mapping[str, tuple[str, Sequence[Any]]] | None = None
    ) -> Iterator[Any]:
        import duckdb

        con = duckdb.connect()
        try:
            for t in tables:
                pred, params = (where or {}).get(t, ("", ()))
                con.register(t, self.arrow(f"SELECT * FROM {t}" + (f" WHERE {pred}" if pred else ""), params))
            yield con
        finally:
            con.close()

    def arrow(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The rows of one query as a ``pyarrow.Table`` (ADBC's PostgreSQL driver, binary COPY underneath)."""
        with self.arrow_batches(sql, params) as reader:
            return reader.read_all()

    @contextlib.contextmanager
    def arrow_batches(self, sql: str, params: Sequence[Any] = ()) -> Iterator[Any]:
        """The rows of one query as a ``pyarrow.RecordBatchReader`` streamed from the server (ADBC), for results
        too large to hold at once (``export logs``). The schema is migrated first, as by :meth:`connect`."""
        import adbc_driver_postgresql.dbapi as adbc

        if not self.read_only:
            with self._conn() as conn:
                self._migrate(conn)
                conn.commit()
        with adbc.connect(self._url) as conn, conn.cursor() as cur:
            cur.execute(to_dollar(sql), list(params) if params else None)
            yield cur.fetch_record_batch()


def schema_version(conn: psycopg.Connection) -> int:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TIMESTAMP NOT NULL)"
    )
    row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    return int(row[0]) if row else 0


def migrate(conn: psycopg.Connection) -> int:
    """Apply pending migrations in one transaction under an advisory lock (concurrent starters wait, then see
    them applied); return the schema version."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", [_MIGRATE_LOCK])
    current = schema_version(conn)
    try:
        for i, stmt in enumerate(MIGRATIONS[current:], start=current + 1):
            conn.execute(render(stmt, "postgres"))
            conn.execute("INSERT INTO schema_migrations VALUES (%s, %s)", [i, utcnow()])
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return len(MIGRATIONS)
