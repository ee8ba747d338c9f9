"""The web console's sessions in the database: what lets replicas share a sign-in without sticky sessions.

Every test runs on both backends (an embedded DuckDB file and a real PostgreSQL server). Two
:class:`DatabaseSessionStore` objects over two handles of one database stand for two replicas; the cross-replica
behaviour through real servers and a load balancer is in ``tests/test_replicas.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Iterator
from datetime import timedelta

from tuneloop.db import Database, open_database, utcnow
from tuneloop.store_sessions import DatabaseSessionStore, console_secret

COOKIE = "f" * 64  # what the browser holds: a random session id
DATA = b'{"key_id":"k-1"}'


@contextlib.contextmanager
def _other(db: Database) -> Iterator[Database]:
    """A second handle on the same database, as another replica has."""
    other = open_database(db.url if db.backend == "postgres" else db.path)  # type: ignore[attr-defined]
    try:
        yield other
    finally:
        other.close()


def rows(db: Database) -> list[dict]:
    return db.query("SELECT id_hash, data, expires_at FROM console_sessions")


def test_a_session_stored_by_one_replica_is_read_and_ended_by_another(any_db):
    async def go(b: DatabaseSessionStore):
        a = DatabaseSessionStore(any_db)
        await a.set(COOKIE, DATA, expires_in=3600)
        assert await b.get(COOKIE, renew_for=3600) == DATA
        assert 3590 <= await b.expires_in(COOKIE) <= 3600
        await b.delete(COOKIE)  # a sign-out on the other replica
        assert await a.get(COOKIE) is None and not await a.exists(COOKIE)

    with _other(any_db) as other:
        asyncio.run(go(DatabaseSessionStore(other)))


def test_the_cookie_itself_is_never_stored_only_its_sha256(any_db):
    asyncio.run(DatabaseSessionStore(any_db).set(COOKIE, DATA, expires_in=60))
    (row,) = rows(any_db)
    assert row["id_hash"] == hashlib.sha256(COOKIE.encode()).hexdigest()
    assert bytes(row["data"]) == DATA
    assert not any_db.query("SELECT 1 FROM console_sessions WHERE id_hash = ?", [COOKIE])


def test_an_empty_session_is_never_stored(any_db):
    store = DatabaseSessionStore(any_db)
    asyncio.run(store.set(COOKIE, b"{}", expires_in=60))  # an anonymous visitor, a static file
    assert rows(any_db) == []


def test_an_expired_session_is_not_returned_and_is_removed_when_a_new_one_is_stored(any_db):
    store = DatabaseSessionStore(any_db)

    async def go():
        await store.set("old", DATA, expires_in=60)
        with any_db.connect() as con:  # an hour later
            con.execute("UPDATE console_sessions SET expires_at = ?", [utcnow() - timedelta(hours=1)])
        assert await DatabaseSessionStore(any_db).get("old") is None
        assert await store.expires_in("old") == -1
        await store.set("new", DATA, expires_in=60)
        assert [r["id_hash"] for r in rows(any_db)] == [hashlib.sha256(b"new").hexdigest()]

    asyncio.run(go())


def test_an_unchanged_session_is_rewritten_only_when_its_expiry_moves_past_the_slack(any_db):
    store = DatabaseSessionStore(any_db, renew_slack_s=60)

    async def go():
        await store.set(COOKIE, DATA, expires_in=3600)
        first = rows(any_db)[0]["expires_at"]
        await store.set(COOKIE, DATA, expires_in=3600)  # the next click: same data, expiry moved by < 60 s
        assert rows(any_db)[0]["expires_at"] == first
        await store.set(COOKIE, DATA, expires_in=3600 + 120)  # the expiry moves by more than the slack
        assert rows(any_db)[0]["expires_at"] > first + timedelta(seconds=60)
        await store.set(COOKIE, b'{"key_id":"k-2"}', expires_in=3600 + 120)  # new data is always written
        assert bytes(rows(any_db)[0]["data"]) == b'{"key_id":"k-2"}'

    asyncio.run(go())


def test_session_writes_do_not_wake_the_deploy_state_pollers(any_db):
    """Only a change of control data moves ``data_version`` (PostgreSQL: a ``NOTIFY``); a console click must not."""
    store = DatabaseSessionStore(any_db)
    if any_db.backend == "postgres":
        import psycopg

        from tuneloop.db_postgres import CHANNEL

        with psycopg.connect(any_db.url, autocommit=True) as listener:  # type: ignore[attr-defined]
            listener.execute(f"LISTEN {CHANNEL}")
            _session_writes_then_a_control_write(any_db, store)
            got = list(listener.notifies(timeout=30, stop_after=1))  # the control write's notification
            assert len(got) == 1
            assert list(listener.notifies(timeout=0.5)) == [], "a session write sent a NOTIFY"
    else:
        v0 = any_db.data_version()
        _session_writes_then_a_control_write(any_db, store, check=lambda: any_db.data_version() == v0)
        assert any_db.data_version() != v0


def _session_writes_then_a_control_write(db: Database, store: DatabaseSessionStore, check=lambda: True) -> None:
    async def go():
        await store.set(COOKIE, DATA, expires_in=60)
        await store.set(COOKIE, b'{"key_id":"k-2"}', expires_in=60)
        await store.delete(COOKIE)
        assert check(), "a session write moved data_version"

    asyncio.run(go())
    console_secret(db)  # creates the secret: a control write


def test_the_console_secret_is_made_once_per_database_and_shared(any_db):
    first = console_secret(any_db)
    assert len(first) == 64
    with _other(any_db) as other:
        assert console_secret(other) == first
    assert any_db.query("SELECT count(*) AS n FROM console_secrets")[0]["n"] == 1
