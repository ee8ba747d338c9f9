"""What every storage backend promises: the :class:`Database` interface and the helpers shared by both.

Contract
--------
* A :class:`Database` is a value (a file path or a server URL), not an open
  connection. ``with db.connect() as con:`` yields a connection whose
  ``execute(sql, params)`` returns a cursor (``fetchone``, ``fetchall``,
  ``description``), applies pending migrations first (once per process), and
  is one transaction: committed when the block ends, rolled back on error.
  SQL uses ``?`` placeholders on both backends.
* Two backends implement it (:func:`tuneloop.db.open_database` picks one from
  ``database.url``): the embedded DuckDB file (:mod:`tuneloop.db_duckdb`) and
  a shared PostgreSQL server (:mod:`tuneloop.db_postgres`). ``backend`` names
  which. JSON columns read back as text on both (:func:`loads` parses them);
  timestamps are naive UTC (:func:`utcnow`).
* :meth:`Database.data_version` is a number that moves when another process
  may have changed the data: a ``stat`` of the file for DuckDB, a
  ``LISTEN``/``NOTIFY`` channel for PostgreSQL. :class:`CachedRead` re-runs a
  read only when it moved (or after ``max_stale_s``): the server's deploy-state
  and API-key pollers.
* :meth:`Database.analytics` is a DuckDB connection on which the tables named
  can be queried with DuckDB SQL: the file itself for DuckDB, the rows copied
  from PostgreSQL as Arrow for the shared backend. Drift, sampling and canary
  statistics run there, in one SQL dialect.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from tuneloop.errors import UserError

Backend = Literal["duckdb", "postgres"]


class DatabaseBusy(UserError, RuntimeError):
    """The database could not be reached in time: another process held the DuckDB file for longer than the
    lock timeout, or the PostgreSQL server did not answer (down, restarting, out of connections)."""


def utcnow() -> datetime:
    """Naive UTC timestamp (``TIMESTAMP`` on both backends)."""
    return datetime.now(UTC).replace(tzinfo=None)


def _finite(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    return v


def dumps(v: Any) -> str | None:
    """JSON text for a JSON column (``None`` stays NULL). NaN and infinities become ``null``: they are not JSON, and
    PostgreSQL's ``json`` type refuses them (a diverged run's metrics must still be recorded)."""
    if v is None:
        return None
    try:
        return json.dumps(v, default=str, allow_nan=False)
    except ValueError:  # a NaN or an infinity somewhere
        return json.dumps(_finite(v), default=str)


def loads(v: Any) -> Any:
    """Python value of a JSON column."""
    if v is None or not isinstance(v, str):
        return v
    return json.loads(v)


def rows_as_dicts(cur: Any) -> list[dict[str, Any]]:
    """The remaining rows of a cursor as dicts keyed by column name (``[]`` for a statement with no result)."""
    if cur.description is None:
        return []
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


class Database(ABC):
    """A handle on tuneloop's system of record (see module doc)."""

    backend: Backend
    lock_timeout_s: float
    read_only: bool

    @property
    @abstractmethod
    def url(self) -> str:
        """Where the data lives: the DuckDB file's path, or the ``postgresql://`` URL (password masked in ``str``)."""

    @abstractmethod
    def with_options(self, *, lock_timeout_s: float | None = None, read_only: bool | None = None) -> Database:
        """The same database with another lock timeout or read-only flag (sharing connection pools)."""

    @abstractmethod
    def connect(
        self, transaction: bool = True, log_only: bool = False, keep_open: bool = False
    ) -> contextlib.AbstractContextManager[Any]:
        """A connection for one unit of work (see module doc). ``log_only``: the block only appends request-log
        rows (not a change for :meth:`data_version`); ``keep_open``: a hint that the same process will come back
        soon (the DuckDB file stays attached; PostgreSQL connections are pooled anyway)."""

    @abstractmethod
    def data_version(self) -> int:
        """A number that changes whenever another process may have changed the data (see module doc)."""

    @abstractmethod
    def analytics(
        self, tables: Sequence[str] = (), where: Mapping[str, tuple[str, Sequence[Any]]] | None = None
    ) -> contextlib.AbstractContextManager[Any]:
        """A DuckDB connection on which ``tables`` (and, for DuckDB, every table) can be read with DuckDB SQL.
        ``where`` narrows what a backend that copies rows copies (``{"requests": ("received_at >= ?", [t])}``);
        callers still filter in their SQL (the DuckDB file is read in place and ignores it)."""

    def release(self) -> None:  # noqa: B027 - a no-op unless the backend keeps something open
        """Let go of anything kept open between blocks (no-op unless the backend keeps something)."""

    def close(self) -> None:  # noqa: B027 - a no-op unless the backend keeps something open
        """Close this process's pooled connections and background listeners (a server's shutdown)."""

    def knocked(self) -> bool:
        """Whether another process asked this one to let go of the database since the last call."""
        return False

    @property
    def held(self) -> bool:
        """Whether this process keeps the database open between blocks right now."""
        return False

    def query(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        """Run one statement and return rows as dicts (JSON columns as text)."""
        with self.connect(transaction=False) as con:
            return rows_as_dicts(con.execute(sql, list(params or [])))

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> None:
        """Run one statement in its own transaction."""
        with self.connect() as con:
            con.execute(sql, list(params or []))


class CachedRead:
    """``read(con)``'s last result, run again only when :meth:`Database.data_version` moved (or
    ``max_stale_s`` passed): what the server's pollers (deploy state, API keys) call every few
    seconds, at the price of a ``stat`` (DuckDB) or nothing (PostgreSQL notifications) instead of a
    read. Errors (e.g. :class:`DatabaseBusy`) propagate and leave the cached value in place."""

    def __init__(self, db: Database, read: Callable[[Any], Any], max_stale_s: float = 30.0):
        self.db, self.read, self.max_stale_s = db, read, max_stale_s
        self._version: int | None = None
        self._at = 0.0
        self._value: Any = None

    def get(self, force: bool = False) -> Any:
        """The cached value, read again when the data may have changed, when it is older than ``max_stale_s``, or
        when ``force`` (a caller that knows it changed: the file's signature can miss two writes of the same size
        within one coarse mtime tick, a few ms)."""
        version = self.db.data_version()  # before the read: a change during it is caught next time
        if not force and version == self._version and time.monotonic() - self._at < self.max_stale_s:
            return self._value
        with self.db.connect(transaction=False) as con:
            self._value = self.read(con)
        self._version, self._at = version, time.monotonic()
        return self._value


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages and logs)."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    if ":" in creds:
        creds = creds.split(":", 1)[0] + ":***"
    return f"{scheme}://{creds}@{host}"
