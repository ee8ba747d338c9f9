"""The embedded backend: one DuckDB file is tuneloop's system of record (the default, no server needed).

Contract
--------
* :class:`DuckDatabase` is a value (a path), not an open connection.
  ``with db.connect() as con:`` opens the file, applies any pending migrations
  and closes it on exit. Opening is an ATTACH onto an in-memory DuckDB
  instance the process keeps (:class:`_Host`), ~2.5 ms of CPU instead of the
  ~13 ms a new instance costs. The only process-wide state here mirrors what
  DuckDB and the OS already keep per process (those instances, and per file a
  lock and a change counter); no file stays open between blocks unless a
  block asks for it (``keep_open``, below).
* DuckDB lets one process hold the file at a time. Every tuneloop process
  (server log writer, CLI, trainer) therefore keeps its connections short and
  :meth:`Database.connect` retries on the lock error with back-off for up to
  ``lock_timeout_s`` before raising :class:`DatabaseBusy`. This is the
  "open per flush" design: open + 1,000 inserts + close measures ~19 ms;
  see docs/ARCHITECTURE.md.
* :meth:`Database.data_version` tells pollers, for the price of a ``stat``,
  whether anything but this process's own request-log appends changed the
  file since they last read it (cheaper than any open).
* ``connect(keep_open=True)`` leaves the file attached for this process's
  next block (the request-log writer under steady traffic) until
  :meth:`Database.release`. A process that finds the file locked touches
  ``<db>.knock`` while it waits; :meth:`Database.knocked` tells the holder,
  which lets go.
* Each ``connect()`` block is one transaction when ``transaction=True``
  (default): committed on success, rolled back on error, so a crash never
  leaves half a write. DuckDB's WAL makes a SIGKILL mid-write safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from tuneloop.dbapi import Backend, Database, DatabaseBusy, utcnow
from tuneloop.errors import UserError
from tuneloop.migrations import MIGRATIONS, render

_LOCK_MARKERS = ("Could not set lock", "Conflicting lock", "lock on file")


@dataclass
class _FileState:
    """What this process knows of one database file (shared by every :class:`Database` on that path).

    Like the OS file lock DuckDB takes, this is per file and per process, so it lives in one
    registry keyed by path rather than on a handle."""

    lock: threading.RLock = field(default_factory=threading.RLock)  # serialises connect blocks in this process
    seen: tuple | None = None  # file signature after this process last touched the file
    version: int = 0  # bumped on any change except this process's log-only writes
    depth: int = 0  # nested connect blocks (same thread) sharing the current attachment
    host: duckdb.DuckDBPyConnection | None = None  # the host instance the file is attached to (depth > 0 or held)
    held: bool = False  # attached with no block open, kept for the next block (connect(keep_open=True))
    knock: tuple | bool | None = (
        False  # the knock file's state when :meth:`Database.knocked` last looked (False: never)
    )


_FILES: dict[str, _FileState] = {}
_FILES_GUARD = threading.Lock()


def _file_state(path: Path) -> _FileState:
    with _FILES_GUARD:
        return _FILES.setdefault(str(path), _FileState())


@dataclass
class _Host:
    """This process's in-memory DuckDB instances, onto which each ``connect()`` block ATTACHes the
    file and DETACHes it after. Creating a DuckDB instance costs ~13 ms of CPU (DuckDB 2.0, even
    for ``:memory:``); ATTACH + DETACH of a file on a live one costs ~2.5 ms and releases the
    file lock just the same, so other processes can take it between blocks. A host holds no
    data and no file between blocks. Two of them: ``full`` (DuckDB's default threads, for
    analytical reads such as drift) and ``light`` (one thread, for the request-log writer's
    small appends, where a second DuckDB thread only adds hand-over cost). Like DuckDB's own
    instance cache they are per process (a child made by ``fork`` makes its own)."""

    pid: int
    full: duckdb.DuckDBPyConnection
    light: duckdb.DuckDBPyConnection


_HOST: list[_Host] = []


def _host(light: bool = False) -> duckdb.DuckDBPyConnection:
    with _FILES_GUARD:
        if not _HOST or _HOST[0].pid != os.getpid():
            if _HOST and _HOST[0].pid != os.getpid():  # forked: the parent's locks and instances are not ours
                _FILES.clear()
            # spills (if a big query ever needs them) go to the system temp dir, not the cwd
            spill = str(Path(tempfile.gettempdir()) / f"tuneloop-duckdb-{os.getpid()}")
            _HOST[:] = [
                _Host(
                    os.getpid(),
                    duckdb.connect(":memory:", config={"temp_directory": spill}),
                    duckdb.connect(":memory:", config={"temp_directory": spill, "threads": 1}),
                )
            ]
        return _HOST[0].light if light else _HOST[0].full


def _knock_path(path: Path) -> Path:
    return path.with_name(path.name + ".knock")


def _knock(path: Path) -> None:
    """Tell the process holding ``path`` that another one waits for it: touch ``<db>.knock``.
    A server that keeps the file open between log flushes (:meth:`Database.knocked`) lets go
    within one flush interval."""
    try:
        _knock_path(path).touch()
    except OSError:
        pass


def _signature_of(p: Path) -> tuple | None:
    try:
        st = p.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _alias(path: Path) -> str:
    """The catalog name a file is attached under (unique per path, a valid identifier)."""
    return "tl_" + hashlib.sha1(str(path).encode()).hexdigest()[:16]


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _signature(path: Path) -> tuple:
    """(mtime_ns, size, inode) of the file and of its write-ahead log: changes whenever either is written."""
    return (_signature_of(path), _signature_of(path.with_name(path.name + ".wal")))


class DuckDatabase(Database):
    """Handle on a DuckDB file; see module doc."""

    backend: Backend = "duckdb"

    def __init__(self, path: str | Path, lock_timeout_s: float = 60.0, read_only: bool = False):
        self.path = Path(path).expanduser().resolve()
        self.lock_timeout_s = lock_timeout_s
        self.read_only = read_only

    def __repr__(self) -> str:
        return f"DuckDatabase({str(self.path)!r})"

    @property
    def url(self) -> str:
        return str(self.path)

    def with_options(self, *, lock_timeout_s: float | None = None, read_only: bool | None = None) -> DuckDatabase:
        return DuckDatabase(
            self.path,
            lock_timeout_s=self.lock_timeout_s if lock_timeout_s is None else lock_timeout_s,
            read_only=self.read_only if read_only is None else read_only,
        )

    @contextlib.contextmanager
    def analytics(
        self, tables: Sequence[str] = (), where: Mapping[str, tuple[str, Sequence[Any]]] | None = None
    ) -> Iterator[duckdb.DuckDBPyConnection]:
        """The file itself (every table is there; ``where`` is not needed): a read connection outside any
        transaction."""
        with self.connect(transaction=False) as con:
            yield con

    def _open(self, fs: _FileState, light: bool) -> duckdb.DuckDBPyConnection:
        """A fresh cursor on a host instance whose default catalog is the file, attached now
        unless an enclosing block (``fs.depth`` > 0) already holds it."""
        alias = _alias(self.path)
        if fs.depth == 0:
            host = _host(light)
            if fs.held and fs.host is not host:  # held by the other instance: one instance per file at a time
                self._detach(fs)
            if fs.held:
                fs.held = False  # reuse the attachment kept by the last block
            else:
                host.execute(f"DETACH DATABASE IF EXISTS {alias}")  # left over only if a DETACH ever failed
                self._attach(host, alias)
                fs.host = host
        attached = fs.host
        if attached is None:  # attached just above, or by the enclosing block that is still open
            raise RuntimeError(f"{self.path} is not attached to any DuckDB instance")
        cur = attached.cursor()
        try:
            cur.execute(f"USE {alias}")
        except BaseException:
            cur.close()
            if fs.depth == 0:
                self._detach(fs)
            raise
        return cur

    def _detach(self, fs: _FileState) -> None:
        """Close the file (DuckDB checkpoints on DETACH) and free its lock."""
        host, fs.host, fs.held = fs.host, None, False
        if host is not None:
            host.execute(f"DETACH {_alias(self.path)}")

    def _attach(self, host: duckdb.DuckDBPyConnection, alias: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.005
        while True:
            ro = " (READ_ONLY)" if self.read_only and self.path.exists() else ""
            try:
                host.execute(f"ATTACH {_sql_str(str(self.path))} AS {alias}{ro}")
                return
            except duckdb.IOException as e:
                if not any(m in str(e) for m in _LOCK_MARKERS):
                    raise UserError(
                        f"cannot open the database {self.path}: {str(e).removeprefix('IO Error: ')} "
                        "(set paths.db to a tuneloop DuckDB file, or to a new path to create one)"
                    ) from None
                _knock(self.path)  # ask a server that keeps the file open between flushes to let go
                if time.monotonic() >= deadline:
                    raise DatabaseBusy(
                        f"database {self.path} is held by another process for over {self.lock_timeout_s:.0f} s: {e}"
                    ) from None
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.25)

    @contextlib.contextmanager
    def connect(
        self, transaction: bool = True, log_only: bool = False, keep_open: bool = False
    ) -> Iterator[duckdb.DuckDBPyConnection]:
        """Open, migrate if needed, yield a connection, commit/rollback, close.

        ``log_only=True`` declares that the block only appends log rows (the request-log
        writer): it does not count as a change for :meth:`data_version`.
        ``keep_open=True`` leaves the file attached (and locked) after the block, for the next
        block of this process to reuse, until :meth:`release` (or a block that needs the other
        host instance). Only for a writer that releases it when :meth:`knocked` says another
        process is waiting, and when it goes idle: the request-log writer under steady traffic.
        """
        fs = _file_state(self.path)
        with fs.lock:
            if not log_only:  # a file held for log appends is closed first: its checkpoint is no change of data
                self.release()
            before = _signature(self.path)
            if before != fs.seen:  # written by another process since we last looked
                fs.version += 1
            try:
                with self._connect(transaction, light=log_only, keep_open=keep_open) as con:
                    yield con
            finally:
                after = _signature(self.path)
                if after != before and not log_only:
                    fs.version += 1
                fs.seen = after

    def data_version(self) -> int:
        """A number that changes whenever the data may have changed, by any process, except for this
        process's own log-only writes (:meth:`connect`). Costs a ``stat``, not an open: pollers
        (deploy state, API keys) re-read only when it moved. Based on the file's and WAL's
        mtime/size/inode, so callers should still re-read now and then (a write inside the same
        mtime tick that keeps the WAL's size is not seen)."""
        fs = _file_state(self.path)
        with fs.lock:
            sig = _signature(self.path)
            if sig != fs.seen:
                fs.version += 1
                fs.seen = sig
            return fs.version

    @contextlib.contextmanager
    def _connect(
        self, transaction: bool, light: bool = False, keep_open: bool = False
    ) -> Iterator[duckdb.DuckDBPyConnection]:
        fs = _file_state(self.path)
        con = self._open(fs, light)
        fs.depth += 1
        try:
            if not self.read_only:
                migrate(con)  # ~1 ms when the schema is current
            if transaction:
                con.begin()
            try:
                yield con
            except BaseException:
                if transaction:
                    con.rollback()
                raise
            else:
                if transaction:
                    con.commit()
        finally:
            con.close()
            fs.depth -= 1
            if fs.depth == 0:  # last block out closes the file (checkpointing as a close does) and frees the lock
                if keep_open and fs.host is not None:
                    fs.held = True
                else:
                    self._detach(fs)

    def release(self) -> None:
        """Close the file if a ``keep_open`` block left it attached; no-op otherwise."""
        fs = _file_state(self.path)
        with fs.lock:
            if fs.held and fs.depth == 0:
                self._detach(fs)
                fs.seen = _signature(self.path)

    @property
    def held(self) -> bool:
        """Whether this process keeps the file attached between blocks right now."""
        return _file_state(self.path).held

    def knocked(self) -> bool:
        """True once per knock: another process found the file locked since the last call (see
        :func:`_knock`). Costs a ``stat``."""
        fs = _file_state(self.path)
        k = _signature_of(_knock_path(self.path))
        with fs.lock:
            moved = fs.knock is not False and k != fs.knock
            fs.knock = k
            return moved


def schema_version(con: duckdb.DuckDBPyConnection) -> int:
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TIMESTAMP NOT NULL)"
    )
    row = con.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchall()[0]
    return int(row[0])


def migrate(con: duckdb.DuckDBPyConnection) -> int:
    """Apply pending migrations, each in its own transaction; return the schema version."""
    current = schema_version(con)
    for i, sql in enumerate(MIGRATIONS[current:], start=current + 1):
        con.begin()
        try:
            con.execute(render(sql, "duckdb"))
            con.execute("INSERT INTO schema_migrations VALUES (?, ?)", [i, utcnow()])
            con.commit()
        except BaseException:
            con.rollback()
            raise
    return len(MIGRATIONS)
