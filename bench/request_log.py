"""Request-log write paths.

``python bench/request_log.py`` (the default, ``--backend duckdb``): 1,000-row batches on a real DuckDB file
(median of 5) against ``executemany``, and the serving-time 5-row flush.

``python bench/request_log.py --backend postgres [--fsync] [--seconds 10]``: sustained rows/s of ONE writer into
PostgreSQL (COPY per flush), against the DuckDB backend measured in the same run (the named baseline). It starts
its own local PostgreSQL (tuneloop.deploy.postgres_server.LocalPostgres) on this machine: fsync, synchronous_commit
and full_page_writes OFF unless ``--fsync`` (then the server's durable defaults). Per backend:

* sustained: a producer thread submits records (copies of 1,000 pre-built ones with new ids) as fast as it can for
  ``--seconds`` into a started writer (log settings at their defaults but queue_max 10**7); rows/s = rows committed
  while the producer ran / its time; then close() must write every row. The producer shares the GIL with the
  writer, as the server's request threads do: when the peak queue stays small the writer kept up and the rate is
  the producer's (offered), not the writer's limit.
* 1,000-row flush (the default ``log.flush_rows``): ``flush()`` of 1,000 queued rows, median of 20 -> rows/s.
* backlog: ``flush()`` of 200,000 queued rows, in batches of ``RequestLogWriter.MAX_BATCH`` -> rows/s.
* the duplicate path (PostgreSQL only): the 1,000-row flush when one id is already logged (a retried batch): the
  COPY fails and the batch goes in again through a temporary table with ``ON CONFLICT DO NOTHING``.

``python bench/request_log.py --backend postgres --outages 5,20,60 [--pool-reconnect-timeout S]``: instead, how
long after the server returns from an outage of each length (stopped and started while rows are submitted) the
writer has written every queued row; ``--pool-reconnect-timeout`` tries the psycopg pool setting that decides it.
"""

import argparse
import os
import shutil
import statistics
import tempfile
import threading
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


def metrics():
    from prometheus_client import CollectorRegistry

    from tuneloop.monitoring.metrics import ServingMetrics

    return ServingMetrics(CollectorRegistry())


def sustained(db, seconds):
    """Rows/s one started writer commits while a producer submits as fast as it can (see module doc)."""
    import msgspec

    w = RequestLogWriter(db, LogSettings(queue_max=10**7), metrics(), replica="bench").start()
    pool = recs(1000)
    stop = threading.Event()
    sent = [0]
    peak = [0]

    def produce():
        i = 0
        while not stop.is_set():
            w.submit(msgspec.structs.replace(pool[i % 1000], id=new_id("chatcmpl-")))
            i += 1
            if i % 1000 == 0:
                peak[0] = max(peak[0], w.queue_depth)
        sent[0] = i

    t0 = time.perf_counter()
    p = threading.Thread(target=produce)
    p.start()
    time.sleep(seconds)
    stop.set()
    p.join()
    produced_s = time.perf_counter() - t0
    written = w.rows_written  # committed while the producer ran (the last < flush_rows rows wait for the interval)
    assert w.close(timeout_s=60) == 0
    stats = w.stats()
    assert stats["written"] == sent[0] and stats["dropped"] == 0, stats
    return written / produced_s, {**stats, "offered": sent[0] / produced_s, "peak_queue": peak[0]}


def backlog(db, n=200_000):
    """Rows/s of flush() draining ``n`` queued rows (batches of RequestLogWriter.MAX_BATCH)."""
    w = RequestLogWriter(db, LogSettings(flush_interval_s=3600, flush_rows=10**9, queue_max=10**7), metrics())
    for r in recs(n):
        w.submit(r)
    t = time.perf_counter()
    assert w.flush() == n
    took = time.perf_counter() - t
    w.close()
    return n / took


def flush_1000(db, n=20, duplicate=False):
    """Median rows/s of flush() of 1,000 queued rows (one of them already logged if ``duplicate``)."""
    w = RequestLogWriter(db, LogSettings(flush_interval_s=3600, flush_rows=10**9, queue_max=10**7), metrics())
    old = recs(1)[0]
    w.submit(old)
    w.flush()
    times = []
    for _ in range(n):
        batch = recs(1000)
        if duplicate:
            batch[500] = old
        for r in batch:
            w.submit(r)
        t = time.perf_counter()
        assert w.flush() == 1000
        times.append(time.perf_counter() - t)
    assert w.flush_errors == 0 and w.rows_dropped == 0
    w.close()
    return 1000 / statistics.median(times)


def outages(durations, reconnect_timeout=None):
    """Seconds from the server's return until the writer has written every row queued during an outage of each
    duration (a started writer, log settings at their defaults, rows submitted every 10 ms throughout)."""
    import logging

    from tuneloop.deploy.postgres_server import LocalPostgres

    logging.disable(logging.WARNING)  # the pool and the writer log every failed attempt
    root = Path(tempfile.mkdtemp(prefix="tuneloop-bench-pg-"))
    root.chmod(0o755)
    server = LocalPostgres(root).start()
    try:
        db = open_database(server.url)
        if reconnect_timeout is not None:  # an experiment on db_postgres's pool, not a setting
            db._state().pool.reconnect_timeout = reconnect_timeout
        w = RequestLogWriter(db, LogSettings(), metrics(), replica="bench").start()
        pool = recs(1)
        w.submit(pool[0])
        while w.rows_written < 1:
            time.sleep(0.01)
        sent = 1
        for outage in durations:
            server.stop()
            t = time.monotonic()
            while time.monotonic() - t < outage:
                w.submit(recs(1)[0])
                sent += 1
                time.sleep(0.01)
            server.start()
            back = time.monotonic()
            w.submit(recs(1)[0])
            sent += 1
            while w.queue_depth:
                time.sleep(0.01)
            print(
                f"outage {outage:g} s: every queued row written {time.monotonic() - back:.1f} s after the server "
                f"returned ({w.flush_errors} failed flushes so far, {w.rows_dropped} dropped)",
                flush=True,
            )
        assert w.close() == 0
        n = db.query("SELECT count(*) AS n FROM requests")[0]["n"]
        print(f"{n:,} rows in the table, {sent:,} submitted")
        db.close()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def postgres_vs_duckdb(seconds, fsync):
    from tuneloop.deploy.postgres_server import LocalPostgres

    root = Path(tempfile.mkdtemp(prefix="tuneloop-bench-pg-"))
    root.chmod(0o755)  # the server runs as another user under root
    server = LocalPostgres(root, fsync=fsync).start()
    try:
        pg = open_database(server.url)
        duck_dir = Path(tempfile.mkdtemp(prefix="tuneloop-bench-duck-"))
        duck = open_database(duck_dir / "b.duckdb")
        for db in (pg, duck):
            with db.connect():
                pass  # schema
        print(
            f"PostgreSQL {server.bin.parent.name} at {server.url}: fsync {'on' if fsync else 'OFF (and synchronous_commit, full_page_writes off)'}; "
            f"{os.cpu_count()} cores; ONE writer each"
        )
        res = {}
        for name, db in (("duckdb", duck), ("postgres", pg)):
            rate, st = sustained(db, seconds)
            res[name] = (rate, flush_1000(db), backlog(db))
            print(
                f"{name:8s} sustained {rate:8,.0f} rows/s ({st['written']:,} rows in {st['flushes']} flushes; producer "
                f"offered {st['offered']:,.0f}/s, peak queue {st['peak_queue']:,}) | 1,000-row flush "
                f"{res[name][1]:8,.0f} rows/s | {RequestLogWriter.MAX_BATCH:,}-row backlog flushes {res[name][2]:8,.0f} rows/s"
            )
        dup = flush_1000(pg, duplicate=True)
        (ps, pf, pb), (ds, df, db_) = res["postgres"], res["duckdb"]
        print(
            f"postgres 1,000-row flush with one id already logged (temp table + ON CONFLICT): {dup:,.0f} rows/s "
            f"({dup / pf:.2f}x the plain COPY)"
        )
        print(
            f"ratio postgres / duckdb (baseline): sustained {ps / ds:.2f}x, 1,000-row flush {pf / df:.2f}x, "
            f"backlog {pb / db_:.2f}x"
        )
        print(
            f"target >= 20,000 rows/s per writer: sustained {'met' if ps >= 20_000 else 'NOT met'}, "
            f"1,000-row flush {'met' if pf >= 20_000 else 'NOT met'}, "
            f"duplicate path {'met' if dup >= 20_000 else 'NOT met'}"
        )
        pg.close()
        shutil.rmtree(duck_dir, ignore_errors=True)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def duckdb_write_paths():
    d = Path(tempfile.mkdtemp())
    db = open_database(d / "b.duckdb")
    with db.connect():
        pass
    from prometheus_client import CollectorRegistry

    from tuneloop.monitoring.metrics import ServingMetrics

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
            con.executemany(
                f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})", rows
            )
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
    import duckdb

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


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=["duckdb", "postgres"], default="duckdb")
    ap.add_argument("--seconds", type=float, default=10.0, help="--backend postgres: producer time per backend")
    ap.add_argument("--fsync", action="store_true", help="--backend postgres: a durable server (fsync on)")
    ap.add_argument(
        "--outages", default="", help="--backend postgres: instead, measure recovery after outages of these seconds"
    )
    ap.add_argument(
        "--pool-reconnect-timeout", type=float, default=None, help="--outages: set the psycopg pool's reconnect_timeout"
    )
    a = ap.parse_args()
    if a.backend == "postgres" and a.outages:
        outages([float(x) for x in a.outages.split(",")], a.pool_reconnect_timeout)
    elif a.backend == "postgres":
        postgres_vs_duckdb(a.seconds, a.fsync)
    else:
        duckdb_write_paths()
