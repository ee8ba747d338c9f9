"""The request log on the shared PostgreSQL backend: rows land as on DuckDB, with the replica that served them,
and an outage of the server loses nothing the queue can hold.

Real PostgreSQL servers only: ``pg_url`` (a fresh database on the session's server, tests/fixtures_postgres.py)
for the data tests and for faults made from inside the server (a table lock, a terminated backend); a server of
this module's own (``own_pg``) for the outage tests, which stop and start it.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from test_requestlog import record, sample, wait_for

from tuneloop.db import Database, open_database
from tuneloop.monitoring.metrics import ServingMetrics
from tuneloop.monitoring.requestlog import COLUMNS, RequestLogWriter
from tuneloop.settings import LogSettings


@pytest.fixture
def metrics() -> ServingMetrics:
    return ServingMetrics(CollectorRegistry())


@pytest.fixture
def pg(pg_url) -> Iterator[Database]:
    db = open_database(pg_url, lock_timeout_s=10.0)
    try:
        yield db
    finally:
        db.close()


@pytest.fixture(scope="module")
def own_server(postgres_server):  # postgres_server: only for its skip/fail when the binaries are missing
    from tuneloop.deploy.postgres_server import LocalPostgres

    root = Path(tempfile.mkdtemp(prefix="tuneloop-test-pg-log-"))
    root.chmod(0o755)  # the server runs as another user when the tests run as root
    server = LocalPostgres(root).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def own_pg(own_server) -> Iterator[tuple[object, Database]]:
    """This module's server, running, and a fresh database on it; (server, database handle)."""
    if not (own_server.data / "postmaster.pid").exists():  # a test that failed while it was stopped
        own_server.start()
    name = "t_" + uuid.uuid4().hex[:12]
    admin = own_server.url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]
    db = open_database(own_server.url.rsplit("/", 1)[0] + "/" + name, lock_timeout_s=10.0)
    try:
        yield own_server, db
    finally:
        db.close()
        if not (own_server.data / "postmaster.pid").exists():
            own_server.start()


def ids(db: Database) -> list[str]:
    return [r["id"] for r in db.query("SELECT id FROM requests")]


def count(db: Database) -> int:
    return db.query("SELECT count(*) AS n FROM requests")[0]["n"]


# -- the rows --------------------------------------------------------------------------------------------------
CALLS = [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}]


def varied_records() -> list:
    return [
        record(0),
        record(1, stream=True, status=499, error="client went away", completion_tokens=None, response=None),
        record(2, prompt="a plain completion prompt", route="completions", stream=None, ttft_s=None),
        record(3, tool_calls=CALLS, finish_reason="tool_calls", params={"tools": [{"type": "function"}], "n": 1}),
        record(4, received_at=datetime.now(UTC) - timedelta(hours=3), user_id=None, key_id="k1", arm="canary"),
        record(5, replica="named-by-the-record", prompt=[{"role": "user", "content": "é ü 漢字 🙂 'quoted' \\ tab\t"}]),
    ]


def test_rows_land_in_postgres_column_for_column_as_on_duckdb(pg, tmp_path, metrics):
    recs = varied_records()
    duck = open_database(tmp_path / "tuneloop.duckdb")
    for db in (duck, pg):
        w = RequestLogWriter(db, LogSettings(flush_interval_s=60), metrics, replica="replica-a")
        for r in recs:
            assert w.submit(r)
        assert w.flush() == len(recs)
        assert w.close() == 0
    sql = f"SELECT {', '.join(COLUMNS)} FROM requests ORDER BY id"
    on_pg, on_duck = pg.query(sql), duck.query(sql)
    assert on_pg == on_duck
    # and both are what was submitted: JSON columns as JSON text, timestamps naive UTC, the writer's replica
    for rec, row in zip(sorted(recs, key=lambda r: r.id), on_pg, strict=True):
        for c in COLUMNS:
            want = getattr(rec, c)
            if c in ("prompt", "params", "tool_calls"):
                assert (None if row[c] is None else json.loads(row[c])) == want, c
            elif c == "received_at":
                assert row[c] == want.astimezone(UTC).replace(tzinfo=None) and row[c].tzinfo is None
            elif c == "replica":
                assert row[c] == (want or "replica-a")
            else:
                assert row[c] == want, c
    assert sample(metrics, "tuneloop_log_rows_written_total") == 2 * len(recs)


def test_each_row_records_the_replica_that_served_it(pg, metrics):
    named = RequestLogWriter(pg, LogSettings(), metrics, replica="pod-7")
    a, b = record(1), record(2, replica="pod-other")
    named.submit(a)
    named.submit(b)
    assert named.close() == 0
    unnamed = RequestLogWriter(pg, LogSettings(), metrics)  # no replica name: NULL, as for rows logged before
    c = record(3)
    unnamed.submit(c)
    assert unnamed.close() == 0
    got = {r["id"]: r["replica"] for r in pg.query("SELECT id, replica FROM requests")}
    assert got == {a.id: "pod-7", b.id: "pod-other", c.id: None}


def test_a_retried_batch_whose_rows_are_already_logged_writes_each_row_once(pg, metrics):
    first = [record(i) for i in range(3)]
    w = RequestLogWriter(pg, LogSettings(), metrics)
    for r in first:
        w.submit(r)
    assert w.flush() == 3
    # the same rows again (a flush retried after a commit whose acknowledgement was lost) plus new ones
    more = [record(i) for i in range(3, 5)]
    for r in first + more:
        w.submit(r)
    assert w.flush() == 5
    assert w.queue_depth == 0 and w.flush_errors == 0 and w.rows_dropped == 0
    stored = ids(pg)
    assert sorted(stored) == sorted(r.id for r in first + more)
    assert w.close() == 0


def test_a_row_postgres_rejects_is_dropped_alone_and_counted(pg, metrics):
    w = RequestLogWriter(pg, LogSettings(), metrics)
    good = [record(i) for i in range(3)]
    bad = record(99, status=None)  # NOT NULL column: the COPY of the whole batch fails
    for r in good[:2] + [bad] + good[2:]:
        w.submit(r)
    assert w.flush() == 3
    assert set(ids(pg)) == {r.id for r in good}
    assert w.rows_dropped == 1 == sample(metrics, "tuneloop_log_rows_dropped_total")
    assert w.queue_depth == 0 and w.flush_errors == 0
    assert w.close() == 0


def test_nul_characters_become_u_fffd_in_text_and_stay_escaped_in_json(pg, metrics):
    w = RequestLogWriter(pg, LogSettings(), metrics)
    rec = record(1, prompt=[{"role": "user", "content": "a\x00b"}], response="x\x00y", error="e\x00")
    w.submit(rec)
    assert w.close() == 0 and w.rows_dropped == 0
    row = pg.query("SELECT prompt, response, error FROM requests")[0]
    assert (row["response"], row["error"]) == ("x\ufffdy", "e\ufffd")
    assert json.loads(row["prompt"]) == rec.prompt  # JSON text holds it as \u0000


def test_close_drains_every_queued_row_to_postgres(pg, metrics):
    w = RequestLogWriter(pg, LogSettings(flush_interval_s=3600, flush_rows=10**6), metrics).start()
    recs = [record(i) for i in range(2000)]
    for r in recs:
        assert w.submit(r)
    assert w.rows_written == 0  # 1 h interval, no size trigger: only close() writes them
    assert w.close(timeout_s=30) == 0
    assert count(pg) == 2000
    assert sample(metrics, "tuneloop_log_rows_written_total") == 2000
    assert sample(metrics, "tuneloop_log_queue_depth") == 0


# -- faults made inside the server ----------------------------------------------------------------------------
def _locker(url: str) -> psycopg.Connection:
    """A connection holding an exclusive lock on ``requests`` until it commits."""
    con = psycopg.connect(url)
    con.execute("LOCK TABLE requests IN ACCESS EXCLUSIVE MODE")
    return con


def _waiting_copy_pid(url: str) -> int | None:
    with psycopg.connect(url, autocommit=True) as con:
        row = con.execute(
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'COPY%'"
        ).fetchone()
    return None if row is None else int(row[0])


def test_a_connection_cut_mid_copy_keeps_the_batch_and_the_next_flush_writes_it(pg, pg_url, metrics):
    w = RequestLogWriter(pg, LogSettings(flush_interval_s=60), metrics, lock_timeout_s=60)
    first = record(0)
    w.submit(first)
    assert w.flush() == 1  # schema in place
    locker = _locker(pg_url)
    recs = [record(i) for i in range(1, 501)]
    for r in recs:
        w.submit(r)
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(w.flush()))
    t.start()
    try:
        assert wait_for(lambda: _waiting_copy_pid(pg_url) is not None, timeout=30)  # the COPY is under way
        pid = _waiting_copy_pid(pg_url)
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", [pid])  # the connection is cut mid-statement
        t.join(timeout=30)
        assert result == [0]
        assert w.queue_depth == 500 and w.rows_dropped == 0 and w.flush_errors == 1
    finally:
        locker.rollback()
        locker.close()
        t.join(timeout=30)
    assert w.flush() == 500  # the pool replaces the dead connection: no restart
    stored = ids(pg)
    assert sorted(stored) == sorted([first.id] + [r.id for r in recs])  # each once
    assert sample(metrics, "tuneloop_log_flush_errors_total") == 1
    assert w.close() == 0


def test_a_table_lock_held_past_the_lock_timeout_fails_the_flush_in_time_and_keeps_the_rows(pg, pg_url, metrics):
    w = RequestLogWriter(pg, LogSettings(flush_interval_s=60), metrics, lock_timeout_s=0.5)
    w.submit(record(0))
    assert w.flush() == 1
    locker = _locker(pg_url)
    try:
        for i in range(1, 11):
            w.submit(record(i))
        t0 = time.monotonic()
        assert w.flush() == 0
        took = time.monotonic() - t0
        assert took < 3.0, f"a flush behind a lock waited {took:.1f} s with a 0.5 s lock timeout"
        assert w.queue_depth == 10 and w.flush_errors == 1
    finally:
        locker.rollback()
        locker.close()
    assert w.flush() == 10
    assert count(pg) == 11 and w.close() == 0


def test_failed_flushes_back_off_and_the_writer_resumes_when_the_lock_goes(pg, pg_url, metrics, caplog):
    interval = 0.05
    w = RequestLogWriter(pg, LogSettings(flush_interval_s=interval), metrics, lock_timeout_s=0.01).start()
    w.submit(record(0))
    assert wait_for(lambda: w.rows_written == 1)
    caplog.set_level(logging.WARNING, logger="tuneloop.monitoring.requestlog")
    locker = _locker(pg_url)
    try:
        for i in range(1, 11):
            w.submit(record(i))

        def failures() -> list[float]:
            return [r.created for r in caplog.records if "flush failed" in r.getMessage()]

        assert wait_for(lambda: len(failures()) >= 6, timeout=30)
        times = failures()[:6]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # retry n waits interval * 2**(n-1) after the failure (plus the attempt itself): 0.05, 0.1, 0.2, 0.4, 0.8 s
        for n, gap in enumerate(gaps):
            assert gap >= 0.95 * interval * 2**n, gaps
        assert w.queue_depth == 10 and w.rows_dropped == 0
    finally:
        locker.rollback()
        locker.close()
    # the longest wait is capped (5 s here), and a success ends the back-off
    assert wait_for(lambda: w.rows_written == 11, timeout=15)
    assert w.close() == 0 and count(pg) == 11


# -- outages: this module's own server, stopped and started ---------------------------------------------------
def test_rows_submitted_while_postgres_restarts_are_all_written_once(own_pg, metrics):
    server, db = own_pg
    w = RequestLogWriter(db, LogSettings(flush_interval_s=0.05), metrics, replica="r1").start()
    sent: list[str] = []
    stop = threading.Event()

    def traffic() -> None:  # a steady stream of served requests, before, during and after the outage
        while not stop.is_set():
            rec = record(len(sent))
            assert w.submit(rec)
            sent.append(rec.id)
            time.sleep(0.001)

    t = threading.Thread(target=traffic)
    t.start()
    try:
        assert wait_for(lambda: w.rows_written >= 100, timeout=30)
        server.stop()  # fast shutdown: open connections are cut, perhaps mid-COPY
        assert wait_for(lambda: w.flush_errors >= 2, timeout=30)
        during = len(sent)
        server.start()
        after = w.rows_written
        # recovers by itself: the rows queued during the outage and those sent since are written
        assert wait_for(lambda: w.rows_written >= during and w.rows_written > after, timeout=60)
    finally:
        stop.set()
        t.join()
        left = w.close(timeout_s=30)
    assert left == 0
    stored = ids(db)
    assert len(stored) == len(set(stored)) == len(sent)
    assert set(stored) == set(sent)
    assert w.rows_dropped == 0 == sample(metrics, "tuneloop_log_rows_dropped_total")
    assert sample(metrics, "tuneloop_log_flush_errors_total") >= 2
    assert {r["replica"] for r in db.query("SELECT DISTINCT replica FROM requests")} == {"r1"}


def test_a_full_queue_during_an_outage_drops_and_counts_the_overflow(own_pg, metrics):
    server, db = own_pg
    w = RequestLogWriter(db, LogSettings(flush_interval_s=0.05, queue_max=50), metrics).start()
    first = record(0)
    w.submit(first)
    assert wait_for(lambda: w.rows_written == 1)
    server.stop()
    recs = [record(i) for i in range(1, 201)]
    accepted = [w.submit(r) for r in recs]
    assert accepted == [True] * 50 + [False] * 150  # nothing can be written while the server is down
    server.start()
    assert wait_for(lambda: w.queue_depth == 0, timeout=60)
    assert w.close() == 0
    in_table = count(db) - 1
    assert in_table + w.rows_dropped == len(recs)
    assert w.rows_dropped == 150 == sample(metrics, "tuneloop_log_rows_dropped_total")
    assert sorted(ids(db)) == sorted([first.id] + [r.id for r in recs[:50]])  # the rows queued first are kept


def test_a_flush_while_postgres_is_down_returns_within_the_lock_timeout(own_pg, metrics):
    server, db = own_pg
    w = RequestLogWriter(db, LogSettings(flush_interval_s=0.5), metrics)  # lock timeout max(2 s, 2 x interval)
    assert w.db.lock_timeout_s == 2.0
    w.submit(record(0))
    assert w.flush() == 1  # the pool holds a connection, which the stop will cut
    server.stop()
    for i in range(1, 6):
        w.submit(record(i))
    for _ in range(2):  # the cut pooled connection, then no connection at all
        t0 = time.monotonic()
        assert w.flush() == 0
        took = time.monotonic() - t0
        assert took < w.db.lock_timeout_s + 1.0, f"a flush during the outage blocked {took:.1f} s"
    assert w.queue_depth == 5 and w.flush_errors == 2
    server.start()
    assert wait_for(lambda: (w.flush(), w.queue_depth)[1] == 0, timeout=60)  # no restart of the writer
    assert count(db) == 6 and w.close() == 0


def test_close_during_an_outage_gives_up_at_its_timeout_and_counts_the_rows_as_dropped(own_pg, metrics):
    server, db = own_pg
    w = RequestLogWriter(db, LogSettings(flush_interval_s=0.05), metrics).start()
    w.submit(record(0))
    assert wait_for(lambda: w.rows_written == 1)
    server.stop()
    for i in range(1, 21):
        w.submit(record(i))
    t0 = time.monotonic()
    left = w.close(timeout_s=1.0)
    assert time.monotonic() - t0 < 1.5
    assert left == 20 == w.rows_dropped == sample(metrics, "tuneloop_log_rows_dropped_total")
