"""API keys and feedback in the storage layer (tuneloop.store_keys, tuneloop.store_feedback) on both backends.

Every test that takes ``any_db`` runs on the DuckDB file and on a real PostgreSQL server (tests/fixtures_postgres.py).
"Separate handles" are separate :class:`~tuneloop.db.Database` objects on one URL: for PostgreSQL each has its own
connection pool and change listener, as two replicas (or a replica and a CLI command) do. The PostgreSQL-only tests
pause one transaction at the exact point a race is decided (another handle blocked on its lock, seen in
``pg_stat_activity``) and check what the blocked one does once it commits.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest

from tuneloop import store_feedback, store_keys
from tuneloop.db import Database, open_database, utcnow
from tuneloop.server.auth import Auth, AuthError, create_key, hash_key, revoke_key
from tuneloop.settings import AuthSettings
from tuneloop.store_feedback import RequestNotFound, save_feedback
from tuneloop.store_keys import ApiKeyError, KeyAlreadyRevoked

THREADS = 8


@contextmanager
def handles(db: Database, n: int) -> Iterator[list[Database]]:
    """``n`` separate handles on ``db``'s database (own pools on PostgreSQL), closed afterwards."""
    hs = [open_database(db.url, lock_timeout_s=30.0) for _ in range(n)]
    try:
        yield hs
    finally:
        for h in hs:
            h.close()


def race(fns: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls in threads released together; each one's result, or the exception it raised."""
    gate = threading.Barrier(len(fns))

    def run(fn: Callable[[], Any]) -> Any:
        gate.wait()
        try:
            return fn()
        except Exception as e:  # the outcome under test
            return e

    with ThreadPoolExecutor(len(fns)) as pool:
        return list(pool.map(run, fns))


def log_request(db: Database, request_id: str, model_version: str | None = "v1") -> None:
    db.execute(
        "INSERT INTO requests (id, received_at, route, model_version, status) VALUES (?, ?, 'chat.completions', ?, 200)",
        [request_id, utcnow(), model_version],
    )


def req(secret: str) -> SimpleNamespace:
    return SimpleNamespace(headers={"authorization": f"Bearer {secret}"})


def accepts(auth: Auth, secret: str) -> bool:
    try:
        asyncio.run(auth.authenticate(req(secret)))
    except AuthError:
        return False
    return True


def poll(cond: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until ``cond()`` held (checked every 5 ms); fails after ``timeout_s``."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout_s, f"{what}: not within {timeout_s} s"
        time.sleep(0.005)
    return time.monotonic() - t0


# -- API keys ----------------------------------------------------------------------------------------------------


def test_keys_create_list_find_and_revoke(any_db):
    app, app_secret = create_key(any_db, "inference", "  app  ")
    ops, _ = create_key(any_db, "admin", "ops")
    anon, _ = create_key(any_db, "inference")
    assert (app.name, app.scope, app.active) == ("app", "inference", True) and anon.name is None
    assert app_secret.startswith(app.prefix)
    row = any_db.query("SELECT key_hash, revoked_at FROM api_keys WHERE id = ?", [app.id])[0]
    assert row == {"key_hash": hash_key(app_secret), "revoked_at": None}

    assert [k.id for k in store_keys.list_keys(any_db)] == [app.id, ops.id, anon.id]
    assert store_keys.list_keys(any_db)[0] == app  # the stored record, timestamps included
    assert store_keys.has_admin_key(any_db)
    assert [k.id for k in store_keys.find_keys(any_db, app.id)] == [app.id]
    assert [k.id for k in store_keys.find_keys(any_db, app.prefix + "...")] == [app.id]  # as `keys list` shows it
    assert [k.id for k in store_keys.find_keys(any_db, "ops")] == [ops.id]
    assert store_keys.find_keys(any_db, "nobody") == []

    revoked = revoke_key(any_db, "ops")
    assert revoked.id == ops.id and revoked.revoked_at is not None and not revoked.active
    assert store_keys.list_keys(any_db)[1].revoked_at == revoked.revoked_at  # the time that was recorded
    assert not store_keys.has_admin_key(any_db)
    assert [k.id for k in store_keys.list_keys(any_db, include_revoked=False)] == [app.id, anon.id]
    assert store_keys.find_keys(any_db, "ops") == []  # a revoked key's name no longer finds it; its id does
    with pytest.raises(KeyAlreadyRevoked) as again:
        revoke_key(any_db, ops.id)
    assert again.value.key.revoked_at == revoked.revoked_at and "already revoked" in str(again.value)
    with pytest.raises(ApiKeyError, match="no API key"):
        revoke_key(any_db, "nobody")
    with pytest.raises(ApiKeyError, match="unknown scope"):
        create_key(any_db, "root")
    with any_db.connect(transaction=False) as con:  # what the auth cache reads
        table = store_keys.key_table(con)
    assert sorted((r[1], r[3], r[4] is not None) for r in table) == sorted(
        [(app.id, "inference", False), (ops.id, "admin", True), (anon.id, "inference", False)]
    )
    assert {r[0] for r in table} >= {hash_key(app_secret)}


def test_a_live_name_is_unique_and_free_again_once_revoked(any_db):
    first, _ = create_key(any_db, "inference", "web")
    with pytest.raises(ApiKeyError, match="already exists"):
        create_key(any_db, "admin", "web")
    revoke_key(any_db, "web")
    second, _ = create_key(any_db, "inference", "web")
    assert second.id != first.id
    assert [k.id for k in store_keys.find_keys(any_db, "web")] == [second.id]


def test_concurrent_creates_of_one_name_leave_exactly_one_live_key(any_db):
    with handles(any_db, THREADS) as hs:
        outcomes = race([lambda h=h: create_key(h, "inference", "shared") for h in hs])
    made = [o for o in outcomes if not isinstance(o, Exception)]
    refused = [o for o in outcomes if isinstance(o, Exception)]
    assert len(made) == 1, outcomes
    assert all(isinstance(e, ApiKeyError) and "already exists" in str(e) for e in refused), refused
    assert [k.id for k in store_keys.list_keys(any_db)] == [made[0][0].id]


def test_concurrent_revokes_record_one_revocation_and_all_report_it(any_db):
    key, _ = create_key(any_db, "inference", "doomed")
    with handles(any_db, THREADS) as hs:
        outcomes = race([lambda h=h: revoke_key(h, key.id) for h in hs])
    won = [o for o in outcomes if not isinstance(o, Exception)]
    lost = [o for o in outcomes if isinstance(o, Exception)]
    assert len(won) == 1 and len(lost) == THREADS - 1, outcomes
    recorded = any_db.query("SELECT revoked_at FROM api_keys WHERE id = ?", [key.id])[0]["revoked_at"]
    assert won[0].revoked_at == recorded
    assert all(isinstance(e, KeyAlreadyRevoked) and e.key.revoked_at == recorded for e in lost), lost


# -- feedback ----------------------------------------------------------------------------------------------------


def test_feedback_second_save_by_a_source_merges_and_another_source_adds_a_record(any_db):
    log_request(any_db, "chatcmpl-1", "v7")
    first = save_feedback(any_db, "chatcmpl-1", "api", {"rating": -1, "rating_kind": "thumbs", "labels": ["x", "y"]})
    assert first.created and first.previous is None
    fb = first.feedback
    assert (fb.rating, fb.rating_kind, fb.labels, fb.correction, fb.comment) == (-1, "thumbs", ["x", "y"], None, None)
    assert fb.model_version == "v7" and fb.request_id == "chatcmpl-1" and fb.source == "api"

    second = save_feedback(any_db, "chatcmpl-1", "api", {"correction": "better"})
    assert not second.created and second.previous == (-1, "thumbs")
    merged = second.feedback
    assert (merged.id, merged.created_at, merged.model_version) == (fb.id, fb.created_at, "v7")
    assert (merged.rating, merged.labels, merged.correction) == (-1, ["x", "y"], "better")  # omitted fields kept

    third = save_feedback(
        any_db, "chatcmpl-1", "api", {"rating": 4, "rating_kind": "stars", "correction": None, "labels": []}
    )
    assert third.previous == (-1, "thumbs")
    assert (third.feedback.rating, third.feedback.correction, third.feedback.labels) == (4, None, [])  # None clears

    other = save_feedback(any_db, "chatcmpl-1", "reviewer", {"comment": "fine"})
    assert other.created and other.feedback.id != fb.id
    listed = store_feedback.list_feedback(any_db, "chatcmpl-1")
    assert [(f.source, f.rating, f.comment) for f in listed] == [("api", 4, None), ("reviewer", None, "fine")]
    assert listed[0] == third.feedback
    assert any_db.query("SELECT count(*) AS n FROM feedback")[0]["n"] == 2


def test_feedback_for_an_unknown_request_is_refused_and_writes_nothing(any_db):
    with pytest.raises(RequestNotFound) as e:
        save_feedback(any_db, "chatcmpl-nope", "api", {"rating": 1, "rating_kind": "thumbs"})
    assert e.value.request_id == "chatcmpl-nope"
    assert store_feedback.request_model_version(any_db, "chatcmpl-nope") == (False, None)
    assert any_db.query("SELECT count(*) AS n FROM feedback")[0]["n"] == 0
    # a request the caller knows from elsewhere (the server's unflushed log queue) is taken on its word
    saved = save_feedback(any_db, "chatcmpl-queued", "api", {"comment": "hi"}, model_version="v2")
    assert saved.created and saved.feedback.model_version == "v2"
    log_request(any_db, "chatcmpl-2", None)
    assert store_feedback.request_model_version(any_db, "chatcmpl-2") == (True, None)


def test_concurrent_feedback_for_one_pair_from_two_handles_ends_in_one_record(any_db):
    pairs = [f"chatcmpl-{i}" for i in range(10)]
    for rid in pairs:
        log_request(any_db, rid)
    ratings = [(1, "thumbs"), (-1, "thumbs")]
    with handles(any_db, 2) as hs:
        for rid in pairs:
            a, b = race(
                [
                    lambda h=h, r=r, rid=rid: save_feedback(h, rid, "web", {"rating": r[0], "rating_kind": r[1]})
                    for h, r in zip(hs, ratings, strict=True)
                ]
            )
            assert not isinstance(a, Exception) and not isinstance(b, Exception), (a, b)
            assert sorted([a.created, b.created]) == [False, True]
            creator, updater = (a, b) if a.created else (b, a)
            assert updater.previous == (creator.feedback.rating, "thumbs")  # the update saw the create
            assert updater.feedback.id == creator.feedback.id
            (row,) = any_db.query("SELECT id, rating FROM feedback WHERE request_id = ?", [rid])
            assert row == {"id": creator.feedback.id, "rating": updater.feedback.rating}


# -- PostgreSQL: the races decided at the blocking point -------------------------------------------------------


def wait_until_blocked(url: str, n: int = 1) -> None:
    """Until ``n`` sessions on the database wait for a lock (``pg_stat_activity``)."""
    with psycopg.connect(url, autocommit=True) as con:

        def blocked() -> bool:
            row = con.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ).fetchone()
            return bool(row and row[0] >= n)

        poll(blocked, 10.0, "the other handle waiting on a lock")


@pytest.fixture
def two_pg(pg_url) -> Iterator[tuple[Database, Database]]:
    a, b = open_database(pg_url, lock_timeout_s=10.0), open_database(pg_url, lock_timeout_s=10.0)
    try:
        a.query("SELECT 1")  # migrated, pools warm
        b.query("SELECT 1")
        yield a, b
    finally:
        a.close()
        b.close()


def test_postgres_a_save_blocked_by_an_uncommitted_create_updates_it(two_pg, pg_url):
    a, b = two_pg
    log_request(a, "chatcmpl-1")
    with ThreadPoolExecutor(1) as pool:
        with a.connect() as con:  # replica A created the record and has not committed yet
            con.execute(
                "INSERT INTO feedback (id, request_id, source, rating, rating_kind, labels, created_at) "
                "VALUES ('fb-a', 'chatcmpl-1', 'web', 1, 'thumbs', '[]', ?)",
                [utcnow()],
            )
            later = pool.submit(save_feedback, b, "chatcmpl-1", "web", {"rating": -1, "rating_kind": "thumbs"})
            wait_until_blocked(pg_url)  # B's insert waits on A's row
            assert not later.done()
        saved = later.result(timeout=10)
    assert not saved.created and saved.previous == (1, "thumbs") and saved.feedback.id == "fb-a"
    assert a.query("SELECT id, rating FROM feedback") == [{"id": "fb-a", "rating": -1}]


def test_postgres_a_revoke_blocked_by_an_uncommitted_revoke_reports_its_time(two_pg, pg_url):
    a, b = two_pg
    key, _ = create_key(a, "inference", "k")
    with ThreadPoolExecutor(1) as pool:
        with a.connect() as con:
            (first,) = con.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL RETURNING revoked_at",
                [utcnow(), key.id],
            ).fetchall()
            later = pool.submit(revoke_key, b, key.id)
            wait_until_blocked(pg_url)  # B read the key as live and waits on A's row lock
            assert not later.done()
        with pytest.raises(KeyAlreadyRevoked) as e:
            later.result(timeout=10)
    assert e.value.key.revoked_at == first[0]
    assert a.query("SELECT revoked_at FROM api_keys")[0]["revoked_at"] == first[0]


def test_postgres_a_create_waits_for_an_uncommitted_create_of_the_same_name(two_pg, pg_url):
    a, b = two_pg
    with ThreadPoolExecutor(1) as pool:
        with a.connect() as con:  # A is creating "web" (under the store's lock) and has not committed yet
            con.execute("SELECT pg_advisory_xact_lock(hashtext('api_keys'))")
            con.execute(
                "INSERT INTO api_keys (id, name, scope, key_hash, prefix, created_at) "
                "VALUES ('k-a', 'web', 'inference', 'h', 'tl-x', ?)",
                [utcnow()],
            )
            later = pool.submit(create_key, b, "inference", "web")
            wait_until_blocked(pg_url)
            assert not later.done()
        with pytest.raises(ApiKeyError, match="already exists"):
            later.result(timeout=10)
    assert [k.id for k in store_keys.list_keys(a)] == ["k-a"]


# -- PostgreSQL: another replica's key changes reach this one's auth cache ------------------------------------


def test_postgres_keys_created_or_revoked_on_another_replica_reach_auth_within_2s(pg_url):
    a = open_database(pg_url, lock_timeout_s=10.0)  # replica A (or a CLI on another machine)
    b = open_database(pg_url, lock_timeout_s=10.0)  # replica B: its own pool and listener
    try:
        _, boot = create_key(a, "admin", "boot")
        auth = Auth(b, AuthSettings(), refresh_s=0.5, miss_refresh_s=0.5)
        assert accepts(auth, boot)  # B's key table is cached now

        def listening() -> bool:  # the version moves on every call until B's LISTEN is up
            return b.data_version() == b.data_version()

        poll(listening, 10.0, "replica B's change listener")
        version = b.data_version()

        t0 = time.monotonic()
        _, secret = create_key(a, "inference", "late")
        notified = poll(lambda: b.data_version() != version, 2.0, "B's data_version after A's create")
        seen = poll(lambda: accepts(auth, secret), 2.0 - (time.monotonic() - t0), "B's auth accepting the new key")
        created_s = time.monotonic() - t0

        t0 = time.monotonic()
        revoke_key(a, "late")
        revoked_s = poll(lambda: not accepts(auth, secret), 2.0, "B's auth refusing the revoked key")
        print(
            f"\nPostgreSQL replica B: NOTIFY after {notified * 1e3:.1f} ms; new key accepted after "
            f"{created_s * 1e3:.0f} ms (poll {seen * 1e3:.0f} ms), revoked key refused after {revoked_s * 1e3:.0f} ms "
            f"(auth refresh_s=0.5, miss_refresh_s=0.5)"
        )
        assert accepts(auth, boot)
    finally:
        a.close()
        b.close()
