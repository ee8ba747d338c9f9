"""Request-log write paths, 1,000-row batches on a real DuckDB file (median of 5)."""

import statistics
import tempfile
import time
from pathlib import Path

from tuneloop.db import open_database, utcnow
from tuneloop.ids import new_id
from tuneloop.monitoring.records import RequestRecord
from tuneloop.monitoring.requestlog import COLUMNS, RequestLogWriter
from tuneloop.settings import LogSettings


def recs(n):
    return [
        RequestRecord(
            id=new_id("chatcmpl-"),
            received_at=utcnow(),
            route="chat.completions",
            status=200,
            model="production",
            model_version="v1",
            arm="production",
            prompt=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "question " * 20}],
            response="answer " * 40,
            finish_reason="stop",
            prompt_tokens=30,
            completion_tokens=40,
            ttft_s=0.2,
            latency_s=1.1,
            stream=True,
            params={"temperature": 0.7, "max_tokens": 64},
            user_id="u",
        )
        for _ in range(n)
    ]


d = Path(tempfile.mkdtemp())
db = open_database(d / "b.duckdb")
with db.connect():
    pass
from prometheus_client import CollectorRegistry  # noqa: E402

from tuneloop.monitoring.metrics import ServingMetrics  # noqa: E402

w = RequestLogWriter(
    db, LogSettings(flush_interval_s=3600, flush_rows=10**9, queue_max=10**7), ServingMetrics(CollectorRegistry())
)
w.flush()
arrow, execmany, submit = [], [], []
for _ in range(5):
    batch = recs(1000)
    t = time.perf_counter()
    for r in batch:
        w.submit(r)
    submit.append((time.perf_counter() - t) / 1000)
    t = time.perf_counter()
    assert w.flush() == 1000
    arrow.append(time.perf_counter() - t)
    batch = recs(1000)
    rows = [tuple(w._prepare(r)[c] for c in COLUMNS) for r in batch]
    t = time.perf_counter()
    with db.connect() as con:
        con.executemany(f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})", rows)
    execmany.append(time.perf_counter() - t)
big = recs(10000)
for r in big:
    w.submit(r)
t = time.perf_counter()
w.flush()
big_s = time.perf_counter() - t
a, e = statistics.median(arrow), statistics.median(execmany)
print(f"submit (queue + metrics.observe): {statistics.median(submit) * 1e6:.1f} us/row")
print(f"flush 1,000 rows, pyarrow + INSERT..SELECT (open+insert+commit+close): {a * 1000:.1f} ms")
print(f"baseline executemany 1,000 rows (same open/commit): {e * 1000:.1f} ms  -> {e / a:.1f}x slower")
print(f"flush 10,000 rows backlog: {big_s * 1000:.0f} ms")
# does the flush slow down as the log grows? (the primary key on requests.id is checked on every insert)
with db.connect() as con:
    con.execute("""INSERT INTO requests (id, received_at, route, status, model_version, prompt, response, prompt_tokens)
                   SELECT 'old-' || i, TIMESTAMP '2025-01-01' + to_seconds(i // 20), 'chat.completions', 200, 'v0',
                          json_array(json_object('role', 'user', 'content', 'question ' || i)), 'answer ' || i, 20
                   FROM range(1000000) t(i)""")
grown = []
for _ in range(5):
    for r in recs(1000):
        w.submit(r)
    t = time.perf_counter()
    assert w.flush() == 1000
    grown.append(time.perf_counter() - t)
g = statistics.median(grown)
print(f"flush 1,000 rows into a log of 1,000,000+ rows: {g * 1000:.1f} ms ({g / a:.2f}x the small-log flush)")

# The serving-time case: a flush a second of a few rows (16 clients of SmolLM2 on 2 cores make ~5 requests/s).
# What matters there is the CPU each flush takes from the engine's threads. Three ways, CPU ms per 5-row flush:
# a new DuckDB instance per flush (tuneloop before the ATTACH change, the baseline), ATTACH per flush to the
# instance the process keeps (log.hold_s: 0), and the file kept open between flushes (the writer under traffic).
import duckdb  # noqa: E402


def cpu_ms(fn, n=50):
    out = []
    for _ in range(n):
        t = time.process_time()
        fn()
        out.append((time.process_time() - t) * 1000)
    return statistics.median(out)


def new_instance():
    table = w._table(recs(5))
    con = duckdb.connect(str(db.path))
    con.begin()
    w._insert_table(con, table)
    con.commit()
    con.close()


def five(hold):
    def f():
        for r in recs(5):
            w.submit(r)
        assert w.flush(hold=hold) == 5

    return f


base = cpu_ms(new_instance)
per_flush = cpu_ms(five(False))
held = cpu_ms(five(True))
db.release()
print(
    f"5-row flush, CPU: new DuckDB instance per flush {base:.1f} ms (baseline); ATTACH per flush {per_flush:.1f} ms "
    f"({base / per_flush:.1f}x less); kept open {held:.1f} ms ({base / held:.1f}x less)"
)
w.close()
