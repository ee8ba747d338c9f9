"""The web console's sessions and signing secret, kept in the database so every replica shares them.

Contract
--------
* :class:`DatabaseSessionStore` is a Litestar :class:`~litestar.stores.base.Store` over ``console_sessions``, for
  the console's server-side sessions. A session signed in on one replica is valid on every replica of the same
  database (no sticky sessions), survives a server restart, and a sign-out anywhere ends it everywhere.
* The cookie's value (the session id) is never stored: rows are keyed by its SHA-256, so a copy of the database
  holds no usable session.
* Writes are cheap for serving: an empty session (an anonymous visitor, a static file) is never stored; a session
  whose data did not change is written only when its expiry would move by more than ``renew_slack_s`` (so a
  reader clicking through pages costs one read per page and about one write a minute). Writes are ``log_only``
  blocks: they do not count as a change of the deploy state, so pollers (deploy state, API keys) and other
  replicas are not woken by them.
* Expired rows are removed when a new session is stored, and never returned.
* :func:`console_secret` — the secret that signs the console's CSRF tokens: created once per database (random,
  32 bytes) and read by every replica, so a form opened on one replica posts to another.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections import OrderedDict
from datetime import datetime, timedelta

from litestar.stores.base import Store

from tuneloop.db import Database, utcnow

_EMPTY = (b"{}", b"")


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _seconds(v: int | timedelta | None) -> float | None:
    if v is None:
        return None
    return v.total_seconds() if isinstance(v, timedelta) else float(v)


class DatabaseSessionStore(Store):
    """Litestar session store on ``console_sessions`` (see module doc)."""

    def __init__(self, db: Database, renew_slack_s: float = 60.0, cache_size: int = 1024):
        self.db = db
        self.renew_slack_s = renew_slack_s
        self.cache_size = cache_size
        # what this process last read or wrote per id hash: (data, expires_at); only used to skip redundant writes
        self._seen: OrderedDict[str, tuple[bytes, datetime | None]] = OrderedDict()

    def _remember(self, h: str, data: bytes, expires_at: datetime | None) -> None:
        self._seen[h] = (data, expires_at)
        self._seen.move_to_end(h)
        while len(self._seen) > self.cache_size:
            self._seen.popitem(last=False)

    # -- the Store interface --------------------------------------------------------------------------------------
    async def set(self, key: str, value: str | bytes, expires_in: int | timedelta | None = None) -> None:
        data = value.encode() if isinstance(value, str) else bytes(value)
        h = _hash(key)
        if data in _EMPTY:  # the middleware stores every request's session: an anonymous one costs nothing
            if h in self._seen:  # a session this request loaded and emptied
                await self.delete(key)
            return
        seconds = _seconds(expires_in)
        now = utcnow()
        expires_at = now + timedelta(seconds=seconds) if seconds is not None else None
        seen = self._seen.get(h)
        if seen is not None and seen[0] == data:
            old = seen[1]
            if old is None and expires_at is None:
                return
            if old is not None and expires_at is not None and (expires_at - old).total_seconds() < self.renew_slack_s:
                return
        await asyncio.to_thread(self._upsert, h, data, expires_at, seen is None)
        self._remember(h, data, expires_at)

    def _upsert(self, h: str, data: bytes, expires_at: datetime | None, new: bool) -> None:
        with self.db.connect(log_only=True) as con:
            if new:
                con.execute("DELETE FROM console_sessions WHERE expires_at < ?", [utcnow()])
            con.execute(
                "INSERT INTO console_sessions (id_hash, data, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (id_hash) DO UPDATE SET data = excluded.data, expires_at = excluded.expires_at",
                [h, data, expires_at],
            )

    async def get(self, key: str, renew_for: int | timedelta | None = None) -> bytes | None:
        """The session's data, or None (unknown or expired). ``renew_for`` is applied by the :meth:`set` that
        follows every request with a session (the middleware stores it on each response)."""
        h = _hash(key)
        rows = await asyncio.to_thread(
            self.db.query, "SELECT data, expires_at FROM console_sessions WHERE id_hash = ?", [h]
        )
        if not rows:
            self._seen.pop(h, None)
            return None
        data, expires_at = bytes(rows[0]["data"]), rows[0]["expires_at"]
        if expires_at is not None and expires_at <= utcnow():
            self._seen.pop(h, None)
            return None
        self._remember(h, data, expires_at)
        return data

    async def delete(self, key: str) -> None:
        h = _hash(key)
        self._seen.pop(h, None)
        await asyncio.to_thread(self._delete, h)

    def _delete(self, h: str) -> None:
        with self.db.connect(log_only=True) as con:
            con.execute("DELETE FROM console_sessions WHERE id_hash = ?", [h])

    async def delete_all(self) -> None:
        self._seen.clear()
        await asyncio.to_thread(self._delete_all)

    def _delete_all(self) -> None:
        with self.db.connect(log_only=True) as con:
            con.execute("DELETE FROM console_sessions")

    async def exists(self, key: str) -> bool:
        return await self.expires_in(key) != -1

    async def expires_in(self, key: str) -> int | None:
        """Seconds until the session expires; None if it never does; -1 if there is no such (live) session."""
        rows = await asyncio.to_thread(
            self.db.query, "SELECT expires_at FROM console_sessions WHERE id_hash = ?", [_hash(key)]
        )
        if not rows:
            return -1
        expires_at = rows[0]["expires_at"]
        if expires_at is None:
            return None
        left = int((expires_at - utcnow()).total_seconds())
        return left if left > 0 else -1


def console_secret(db: Database) -> str:
    """The database's console signing secret, created on first use (see module doc)."""
    q = "SELECT value FROM console_secrets WHERE name = 'csrf'"
    rows = db.query(q)
    if rows:
        return str(rows[0]["value"])
    with db.connect() as con:
        con.execute(
            "INSERT INTO console_secrets (name, value, created_at) VALUES ('csrf', ?, ?) ON CONFLICT (name) DO NOTHING",
            [secrets.token_hex(32), utcnow()],
        )
        return str(con.execute(q).fetchone()[0])
