"""The ``api_keys`` table: every SQL statement on it, portable between the DuckDB file and PostgreSQL.

Contract
--------
* A row is a key's id, optional name, scope (:data:`SCOPES`), the sha256 hex of
  its secret (``key_hash``), a display prefix, ``created_at`` and
  ``revoked_at`` (NULL while live). The secret itself never reaches this
  module; :class:`ApiKey` (what callers get back) has no hash either.
  Secrets, hashing and request authentication are
  :mod:`tuneloop.server.auth`'s.
* :func:`insert_key` refuses a second *live* key with the same name
  (:class:`ApiKeyError`), also when two processes create one at the same
  moment: the check and the insert are one transaction, serialised on
  PostgreSQL by the transaction-scoped advisory lock
  ``pg_advisory_xact_lock(hashtext('api_keys'))`` and on DuckDB by its single
  writer (one ``connect()`` block per file at a time, in and across
  processes).
* :func:`revoke_key` is atomic and idempotent: the revocation is
  ``UPDATE ... SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL
  RETURNING revoked_at``, so of any number of concurrent revokes of one key
  (threads, replicas, CLI commands) exactly one records a time; every other
  one raises :class:`KeyAlreadyRevoked` carrying that same recorded time
  (PostgreSQL's READ COMMITTED re-checks the row after the winner commits, and
  the loser's next statement sees the winner's value).
* :func:`key_table` is what the server's auth cache reads on a connection
  (:class:`tuneloop.db.CachedRead`): every row, revoked ones included, as
  ``(key_hash, id, name, scope, revoked_at)``. Writes here end a ``connect()``
  block, which on PostgreSQL sends ``NOTIFY`` on commit, so another replica's
  cache re-reads within its refresh interval.
* Reads (:func:`list_keys`, :func:`find_keys`, :func:`has_admin_key`) are
  single statements in short blocks. Timestamps are naive
  UTC on both backends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from tuneloop.db import Database, utcnow
from tuneloop.errors import UserError
from tuneloop.ids import new_id

SCOPES = ("inference", "admin")
KEY_PREFIX = "tl-"

_COLS = "id, name, scope, prefix, created_at, revoked_at"
_PG_LOCK = "SELECT pg_advisory_xact_lock(hashtext('api_keys'))"


class ApiKeyError(UserError, ValueError):
    """A key-management mistake a user can fix (unknown key, bad scope, duplicate name, already revoked)."""


@dataclass(frozen=True)
class ApiKey:
    """One row of ``api_keys`` without its hash."""

    id: str
    name: str | None
    scope: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class KeyAlreadyRevoked(ApiKeyError):
    """The key was revoked before (by this caller or a concurrent one); ``key.revoked_at`` is the recorded time."""

    def __init__(self, key: ApiKey):
        self.key = key
        when = key.revoked_at
        super().__init__(
            f"key {key.id} was already revoked at {when:%Y-%m-%d %H:%M:%S} UTC"
            if when is not None
            else f"key {key.id} was already revoked"
        )


def _key(r: Sequence[Any]) -> ApiKey:
    return ApiKey(id=r[0], name=r[1], scope=r[2], prefix=r[3], created_at=r[4], revoked_at=r[5])


def insert_key(db: Database, *, scope: str, name: str | None, key_hash: str, prefix: str) -> ApiKey:
    """Store a new live key (see module doc: a duplicate live ``name`` is refused, also under concurrency)."""
    if scope not in SCOPES:
        raise ApiKeyError(f"unknown scope {scope!r}: use one of {', '.join(SCOPES)}")
    name = (name or "").strip() or None
    key = ApiKey(id=new_id(), name=name, scope=scope, prefix=prefix, created_at=utcnow())
    with db.connect() as con:
        if name is not None:
            if db.backend == "postgres":  # DuckDB's single writer already serialises this block
                con.execute(_PG_LOCK)
            dup = con.execute("SELECT id FROM api_keys WHERE name = ? AND revoked_at IS NULL", [name]).fetchall()
            if dup:
                raise ApiKeyError(
                    f"an active key named {name!r} already exists ({dup[0][0]}); pick another name or revoke it first"
                )
        con.execute(
            "INSERT INTO api_keys (id, name, scope, key_hash, prefix, created_at, revoked_at) "
            "VALUES (?, ?, ?, ?, ?, ?, NULL)",
            [key.id, key.name, key.scope, key_hash, key.prefix, key.created_at],
        )
    return key


def list_keys(db: Database, include_revoked: bool = True) -> list[ApiKey]:
    """Every key (or only live ones), oldest first."""
    where = "" if include_revoked else "WHERE revoked_at IS NULL"
    with db.connect(transaction=False) as con:
        rows = con.execute(f"SELECT {_COLS} FROM api_keys {where} ORDER BY created_at, id").fetchall()
    return [_key(r) for r in rows]


def _normalise_ref(ref: str) -> str:
    ref = ref.strip()
    if ref.startswith(KEY_PREFIX):
        ref = ref.rstrip(".")  # the prefix as `keys list` shows it ("tl-AbCdEfG...")
    return ref


def _find(con: Any, ref: str) -> list[ApiKey]:
    rows = con.execute(
        f"SELECT {_COLS} FROM api_keys WHERE id = ? OR prefix = ? OR (name = ? AND revoked_at IS NULL) "
        "ORDER BY created_at, id",
        [ref, ref, ref],
    ).fetchall()
    return [_key(r) for r in rows]


def find_keys(db: Database, ref: str) -> list[ApiKey]:
    """The keys whose id, display prefix (``tl-AbC...`` as listed) or live name is ``ref``."""
    with db.connect(transaction=False) as con:
        return _find(con, _normalise_ref(ref))


def revoke_key(db: Database, ref: str) -> ApiKey:
    """Revoke the one key ``ref`` names (see :func:`find_keys`); return it with the recorded ``revoked_at``.

    Raises :class:`ApiKeyError` when ``ref`` names no key or several, and :class:`KeyAlreadyRevoked` (with the
    time recorded by whoever revoked it) when it is revoked already: see module doc for concurrent revokes."""
    ref = _normalise_ref(ref)
    with db.connect() as con:
        keys = _find(con, ref)
        if not keys:
            raise ApiKeyError(f"no API key {ref!r}: see `tuneloop keys list` for ids")
        if len(keys) > 1:
            raise ApiKeyError(f"{ref!r} matches {len(keys)} keys: revoke by id ({', '.join(k.id for k in keys)})")
        key = keys[0]
        if key.revoked_at is not None:
            raise KeyAlreadyRevoked(key)
        done = con.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL RETURNING revoked_at",
            [utcnow(), key.id],
        ).fetchall()
        if not done:  # revoked by a concurrent caller since our read: report the time it recorded
            row = con.execute("SELECT revoked_at FROM api_keys WHERE id = ?", [key.id]).fetchall()
            raise KeyAlreadyRevoked(replace(key, revoked_at=row[0][0] if row else None))
    return replace(key, revoked_at=done[0][0])


def has_admin_key(db: Database) -> bool:
    """Whether a live (not revoked) key of scope ``admin`` exists."""
    with db.connect(transaction=False) as con:
        rows = con.execute("SELECT 1 FROM api_keys WHERE scope = 'admin' AND revoked_at IS NULL LIMIT 1").fetchall()
    return bool(rows)


def key_table(con: Any) -> list[tuple[str, str, str | None, str, datetime | None]]:
    """Every row as ``(key_hash, id, name, scope, revoked_at)`` on an open connection: the auth cache's read."""
    rows = con.execute("SELECT key_hash, id, name, scope, revoked_at FROM api_keys").fetchall()
    return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]
