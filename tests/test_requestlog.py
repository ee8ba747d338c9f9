"""The request log writer: what an operator relies on when every request must land in DuckDB.

Real DuckDB files in tmp, a real Prometheus registry, real subprocesses for
SIGTERM / SIGKILL and for a second process writing the same file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tuneloop.db import Database, utcnow
from tuneloop.ids import new_id
from tuneloop.monitoring.metrics import ServingMetrics
from tuneloop.monitoring.records import RequestRecord
from tuneloop.monitoring.requestlog import COLUMNS, RequestLogWriter
from tuneloop.settings import LogSettings

ROOT = Path(__file__).resolve().parent.parent


def record(i: int = 0, **kw) -> RequestRecord:
    base = dict(
        id=new_id("chatcmpl-"),
        received_at=utcnow(),
        route="chat.completions",
        status=200,
        model="production",
        model_version="v1",
        arm="production",
        prompt=[{"role": "user", "content": f"question {i}"}],
        response=f"answer {i}",
        finish_reason="stop",
        prompt_tokens=5,
        completion_tokens=3,
        ttft_s=0.05,
        latency_s=0.2,
        stream=False,
        params={"temperature": 0.7, "max_tokens": 16},
        user_id="u1",
        key_id=None,
    )
    base.update(kw)
    return RequestRecord(**base)


def count(db: Database) -> int:
    return db.query("SELECT count(*) AS n FROM requests")[0]["n"]


def wait_for(pred, timeout: float = 10.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


@pytest.fixture
def metrics() -> ServingMetrics:
    return ServingMetrics(CollectorRegistry())


def sample(metrics: ServingMetrics, name: str, **labels) -> float:
    v = metrics.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def test_record_has_exactly_the_columns_of_the_requests_table(db):
    cols = [
        r["column_name"]
        for r in db.query(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'requests' ORDER BY ordinal_position"
        )
    ]
    assert list(COLUMNS) == cols
    assert set(RequestRecord.__struct_fields__) == set(cols)


def test_rows_round_trip_with_json_prompt_and_params(db, metrics):
    rec = record(
        1, received_at=datetime.now(UTC) + timedelta(hours=0), stream=True, status=499, error="client went away"
    )
    w = RequestLogWriter(db, LogSettings(flush_interval_s=60), metrics)
    assert w.submit(rec)
    assert w.flush() == 1
    row = db.query("SELECT *, prompt->>'$[0].content' AS q, params->>'$.max_tokens' AS mt FROM requests")[0]
    assert row["id"] == rec.id and row["status"] == 499 and row["stream"] is True and row["error"] == "client went away"
    assert row["q"] == "question 1" and row["mt"] == "16"
    # aware timestamps are stored as naive UTC
    assert abs((row["received_at"] - rec.received_at.replace(tzinfo=None)).total_seconds()) < 1e-3
    assert w.close() == 0


def test_size_trigger_flushes_without_waiting_for_the_interval(db, metrics):
    w = RequestLogWriter(db, LogSettings(flush_interval_s=60, flush_rows=10), metrics).start()
    try:
        for i in range(25):
            assert w.submit(record(i))
        # 60 s interval: only the size trigger can write these within half of it (the bound leaves room for a
        # first database open on a machine whose cores are busy with engines; 10 s was missed once in CI)
        assert wait_for(lambda: w.rows_written >= 20, timeout=30)
        assert w.flushes <= 3, "rows are written in batches, not one by one"
    finally:
        assert w.close(timeout_s=10) == 0
    assert count(db) == 25
    assert sample(metrics, "tuneloop_log_rows_written_total") == 25
    assert sample(metrics, "tuneloop_log_queue_depth") == 0


def test_interval_trigger_writes_a_few_rows_in_one_batch(db, metrics):
    w = RequestLogWriter(db, LogSettings(flush_interval_s=0.3, flush_rows=1000), metrics).start()
    try:
        for i in range(3):
            w.submit(record(i))
        assert wait_for(lambda: w.rows_written == 3, timeout=5)
        assert w.flushes == 1
        assert count(db) == 3
    finally:
        w.close()


def test_steady_traffic_is_written_once_per_interval(db, metrics):
    w = RequestLogWriter(db, LogSettings(flush_interval_s=0.25, flush_rows=10_000), metrics).start()
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < 1.5:
        w.submit(record(n))
        n += 1
        time.sleep(0.002)
    assert w.close() == 0
    assert count(db) == n
    # ~6 intervals (+ the final drain): the file is not held continuously while traffic flows
    assert w.flushes <= 9, w.stats()


def test_full_queue_drops_the_new_rows_and_counts_them(db, metrics):
    w = RequestLogWriter(db, LogSettings(flush_interval_s=60, queue_max=5), metrics)  # not started: nothing drains
    recs = [record(i) for i in range(8)]
    accepted = [w.submit(r) for r in recs]
    assert accepted == [True] * 5 + [False] * 3
    assert sample(metrics, "tuneloop_log_rows_dropped_total") == 3
    assert sample(metrics, "tuneloop_log_queue_depth") == 5
    # the requests still count in the request metrics: they were served
    assert sample(metrics, "tuneloop_requests_total", route="chat.completions", model_version="v1", status="200") == 8
    assert w.close() == 0
    stored = {r["id"] for r in db.query("SELECT id FROM requests")}
    assert stored == {r.id for r in recs[:5]}


def test_submit_after_close_is_dropped(db, metrics):
    w = RequestLogWriter(db, LogSettings(), metrics).start()
    w.close()
    assert w.submit(record()) is False
    assert sample(metrics, "tuneloop_log_rows_dropped_total") == 1


def test_disabled_log_keeps_metrics_but_writes_nothing(db, metrics):
    w = RequestLogWriter(db, LogSettings(enabled=False), metrics).start()
    assert w.submit(record()) is False
    w.close()
    assert count(db) == 0
    assert sample(metrics, "tuneloop_requests_total", route="chat.completions", model_version="v1", status="200") == 1
    assert sample(metrics, "tuneloop_log_rows_dropped_total") == 0


def test_redaction_stores_sizes_and_timings_but_no_text(db, metrics):
    w = RequestLogWriter(db, LogSettings(redact_prompts=True), metrics)
    w.submit(record(1, prompt_tokens=11, completion_tokens=7))
    w.close()
    row = db.query("SELECT * FROM requests")[0]
    assert row["prompt"] is None and row["response"] is None
    assert (row["prompt_tokens"], row["completion_tokens"], row["latency_s"]) == (11, 7, 0.2)


def test_pii_scrub_at_write_time(db, metrics):
    w = RequestLogWriter(db, LogSettings(scrub_pii=True), metrics)
    prompt = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "mail me at jane.doe@example.com from 10.0.0.12"}]},
    ]
    w.submit(record(prompt=prompt, response="Sure jane.doe@example.com, card 4111 1111 1111 1111 noted"))
    w.close()
    row = db.query("SELECT prompt, response FROM requests")[0]
    assert "jane.doe@example.com" not in row["prompt"] and "10.0.0.12" not in row["prompt"]
    assert "<EMAIL>" in row["prompt"] and "<IP>" in row["prompt"] and '"role":"user"' in row["prompt"]
    assert "<EMAIL>" in row["response"] and "<CREDIT_CARD>" in row["response"]
    assert "4111" not in row["response"]


CALLS = [
    {
        "id": "call_1",
        "type": "function",
        "function": {"name": "send_mail", "arguments": '{"to": "jane.doe@example.com", "subject": "hi"}'},
    }
]


def test_tool_calls_are_logged_as_json_and_a_plain_request_logs_null(db, metrics):
    w = RequestLogWriter(db, LogSettings(flush_interval_s=60), metrics)
    called = record(1, tool_calls=CALLS, finish_reason="tool_calls", params={"tools": [{"type": "function"}]})
    plain = record(2)
    assert w.submit(called) and w.submit(plain)
    assert w.flush() == 2 and w.close() == 0
    rows = {
        r["id"]: r
        for r in db.query("SELECT id, tool_calls, tool_calls->>'$[0].function.name' AS fn, finish_reason FROM requests")
    }
    assert json.loads(rows[called.id]["tool_calls"]) == CALLS and rows[called.id]["fn"] == "send_mail"
    assert rows[called.id]["finish_reason"] == "tool_calls"
    assert rows[plain.id]["tool_calls"] is None


def test_redaction_drops_tool_calls_and_scrubbing_cleans_their_arguments(db, metrics):
    w = RequestLogWriter(db, LogSettings(redact_prompts=True), metrics)
    redacted = record(1, tool_calls=CALLS)
    w.submit(redacted)
    w.close()
    w = RequestLogWriter(db, LogSettings(scrub_pii=True), metrics)
    scrubbed = record(2, tool_calls=CALLS)
    w.submit(scrubbed)
    w.close()
    got = {r["id"]: r["tool_calls"] for r in db.query("SELECT id, tool_calls FROM requests")}
    assert got[redacted.id] is None
    calls = json.loads(got[scrubbed.id])
    assert calls[0]["function"]["name"] == "send_mail" and calls[0]["id"] == "call_1"
    assert json.loads(calls[0]["function"]["arguments"]) == {"to": "<EMAIL>", "subject": "hi"}


def test_a_row_the_database_rejects_is_dropped_alone(db, metrics):
    w = RequestLogWriter(db, LogSettings(), metrics)
    good = [record(i) for i in range(3)]
    bad = record(99, status=None)  # NOT NULL column: DuckDB rejects the batch
    for r in good[:2] + [bad] + good[2:]:
        w.submit(r)
    assert w.flush() == 3
    assert {r["id"] for r in db.query("SELECT id FROM requests")} == {r.id for r in good}
    assert sample(metrics, "tuneloop_log_rows_dropped_total") == 1
    assert w.queue_depth == 0
    w.close()


def test_rewriting_a_batch_is_harmless(db, metrics):
    rec = record()
    for _ in range(2):  # e.g. a retry after a commit whose acknowledgement was lost
        w = RequestLogWriter(db, LogSettings(), metrics)
        w.submit(rec)
        assert w.close() == 0
    assert count(db) == 1


def test_pending_rows_are_visible_before_they_are_written(db, metrics):
    w = RequestLogWriter(db, LogSettings(flush_interval_s=60), metrics)
    rec = record()
    w.submit(rec)
    assert w.pending(rec.id) is rec and w.pending("nope") is None
    w.flush()
    assert w.pending(rec.id) is None
    w.close()


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


CHILD_PRELUDE = """
import signal, sys, time
from tuneloop.monitoring.records import RequestRecord
from tuneloop.monitoring.requestlog import RequestLogWriter
from tuneloop.db import Database, open_database, utcnow
from tuneloop.ids import new_id
from tuneloop.settings import LogSettings
db = open_database(sys.argv[1])
def rec(i):
    return RequestRecord(id=new_id(), received_at=utcnow(), route="completions", status=200, model_version="v1",
                         prompt="p%d" % i, response="r", prompt_tokens=1, completion_tokens=1, latency_s=0.01)
"""


def test_sigterm_drains_every_queued_row(db):
    code = (
        CHILD_PRELUDE
        + """
w = RequestLogWriter(db, LogSettings(flush_interval_s=3600, flush_rows=10**6)).start()
def on_term(signum, frame):
    left = w.close(timeout_s=30)
    print("closed", left, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
for i in range(2000):
    w.submit(rec(i))
print("submitted", w.queue_depth, flush=True)
while True:
    time.sleep(1)
"""
    )
    p = _python(code, str(db.path))
    try:
        assert p.stdout.readline().split() == ["submitted", "2000"]  # nothing flushed yet (1 h interval)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert out.split() == ["closed", "0"]
    assert count(db) == 2000


def test_sigkill_loses_only_rows_queued_since_the_last_commit_and_the_database_opens(db):
    """After a SIGKILL every committed row is in the file and no row is lost out of order.

    The writer commits on its interval (``flush_rows`` is out of reach here, so every
    commit seen is a timed flush). What it had committed when it was killed is a prefix
    of what was submitted that covers at least the last ``rows_written`` the child
    reported; what is lost is only the tail still queued. This is checked on the
    writer's own counter, not on the parent's clock, so a loaded machine can slow the
    flushes down but cannot make the test lie either way.
    """
    interval = 0.2
    code = (
        CHILD_PRELUDE
        + """
w = RequestLogWriter(db, LogSettings(flush_interval_s=float(sys.argv[2]), flush_rows=10**6)).start()
i = 0
while True:
    recs = [rec(i + k) for k in range(20)]
    for r in recs:
        w.submit(r)
    i += 20
    print(w.rows_written, *[r.id for r in recs], flush=True)  # reported after submit: the rows are queued
    time.sleep(0.01)
"""
    )
    p = _python(code, str(db.path), str(interval))
    submitted: list[str] = []  # in submission order
    commits: list[int] = []  # each distinct rows_written the child reported, in order

    def read_line() -> int:
        line = p.stdout.readline()
        assert line, p.stderr.read()
        written, *ids = line.split()
        submitted.extend(ids)
        if not commits or int(written) != commits[-1]:
            commits.append(int(written))
        return int(written)

    try:
        written = 0
        while written < 300 or len([c for c in commits if c > 0]) < 3:
            written = read_line()
        p.send_signal(signal.SIGKILL)
        for line in p.stdout:  # lines still in the pipe: read after the kill
            submitted.extend(line.split()[1:])
        p.wait(timeout=30)
    finally:
        p.kill()
    assert p.returncode == -signal.SIGKILL
    stored = {r["id"] for r in db.query("SELECT id FROM requests")}  # the file opens (WAL replayed) after a SIGKILL
    assert len([c for c in commits if c > 0]) >= 3, "the writer never flushed on its interval"
    last_reported = commits[-1]
    assert last_reported >= 300
    kept = len(stored & set(submitted))
    assert kept >= last_reported, f"{last_reported - kept} committed rows were lost"
    assert set(submitted[:kept]) == stored & set(submitted), "a row was lost while a newer one was kept"
    assert len(stored - set(submitted)) <= 20  # at most one batch queued but not yet reported


def test_another_process_writes_between_flushes(db, metrics):
    with db.connect():
        pass  # create the file + schema first
    w = RequestLogWriter(db, LogSettings(flush_interval_s=0.05), metrics).start()
    other = """
import sys
from tuneloop.db import Database, open_database, utcnow
from tuneloop.ids import new_id
db = open_database(sys.argv[1])
for i in range(20):
    with db.connect() as con:
        con.execute("INSERT INTO api_keys VALUES (?, ?, 'inference', ?, 'tl-x', ?, NULL)",
                    [new_id(), f"k{i}", new_id(), utcnow()])
print("ok")
"""
    try:
        p = _python(other, str(db.path))
        n = 0
        while p.poll() is None:
            w.submit(record(n))
            n += 1
            time.sleep(0.005)
        out, err = p.communicate()
        assert p.returncode == 0 and out.strip() == "ok", err
    finally:
        assert w.close(timeout_s=30) == 0
    assert db.query("SELECT count(*) AS n FROM api_keys")[0]["n"] == 20
    assert count(db) == n > 0


def test_under_steady_traffic_the_file_stays_open_between_flushes_until_another_process_knocks(db, metrics):
    with db.connect():
        pass
    w = RequestLogWriter(db, LogSettings(flush_interval_s=0.1, hold_s=60), metrics).start()
    stop, sent = threading.Event(), []

    def traffic():
        while not stop.is_set():
            rec = record(len(sent))
            w.submit(rec)
            sent.append(rec.id)
            time.sleep(0.01)

    t = threading.Thread(target=traffic)
    t.start()
    # one write from another process, which gives up after 5 s: far less than the 60 s hold
    other = """
import sys
from tuneloop.db import Database, open_database, utcnow
from tuneloop.ids import new_id
with open_database(sys.argv[1], lock_timeout_s=5).connect() as con:
    con.execute("INSERT INTO api_keys VALUES (?, 'cli', 'inference', ?, 'tl-x', ?, NULL)", [new_id(), new_id(), utcnow()])
print("ok")
"""
    try:
        assert wait_for(lambda: w.flushes >= 3 and w.db.held)  # kept open across flushes
        before = w.flushes
        p = _python(other, str(db.path))
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == "ok", err
        assert wait_for(lambda: w.flushes >= before + 3)  # the writer carries on after letting go
    finally:
        stop.set()
        t.join()
        assert w.close(timeout_s=30) == 0
    assert not w.db.held  # closing lets go of the file
    assert db.query("SELECT count(*) AS n FROM api_keys")[0]["n"] == 1
    assert {r["id"] for r in db.query("SELECT id FROM requests")} == set(sent)


def test_an_idle_writer_does_not_keep_the_file_open(db, metrics):
    w = RequestLogWriter(db, LogSettings(flush_interval_s=0.05, hold_s=60), metrics).start()
    try:
        for i in range(5):
            w.submit(record(i))
        assert wait_for(lambda: w.rows_written == 5)
        assert wait_for(lambda: not w.db.held)  # the first flush with nothing to write lets go
        # so another process opens it at once: no knock, no waiting (a lock timeout of 10 ms)
        p = _python(
            "import sys; from tuneloop.db import Database, open_database; "
            "print(open_database(sys.argv[1], lock_timeout_s=0.01).query('SELECT count(*) AS n FROM requests')[0]['n'])",
            str(db.path),
        )
        out, err = p.communicate(timeout=120)
        assert out.strip() == "5", err
    finally:
        w.close()


def test_a_busy_database_keeps_rows_and_retries(db, metrics):
    with db.connect():
        pass
    holder = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
con.close()
print("released", flush=True)
"""
    w = RequestLogWriter(db, LogSettings(flush_interval_s=0.1), metrics, lock_timeout_s=0.2).start()
    p = _python(holder, str(db.path), "1.5")
    try:
        assert p.stdout.readline().strip() == "holding"
        recs = [record(i) for i in range(10)]
        for r in recs:
            w.submit(r)
        assert wait_for(lambda: w.flush_errors >= 1, timeout=10)
        assert w.queue_depth == 10 and w.rows_dropped == 0
        assert p.stdout.readline().strip() == "released"
        assert wait_for(lambda: w.rows_written == 10, timeout=10)
    finally:
        p.kill()
        p.wait()
        w.close()
    assert sample(metrics, "tuneloop_log_flush_errors_total") >= 1
    assert {r["id"] for r in db.query("SELECT id FROM requests")} == {r.id for r in recs}


@pytest.mark.parametrize("bad", ["flush_rows=0", "flush_interval_s=0", "queue_max=-1", "hold_s=-1"])
def test_nonsense_settings_are_a_clear_error(db, bad):
    from tuneloop.errors import UserError

    key, value = bad.split("=")
    with pytest.raises(UserError, match=f"log.{key} must be >"):
        RequestLogWriter(db, LogSettings(**{key: type(getattr(LogSettings(), key))(value)}))
