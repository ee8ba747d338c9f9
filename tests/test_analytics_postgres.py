"""Drift statistics and log exports over PostgreSQL equal those over a DuckDB file holding the same rows.

The same synthetic request log and feedback (two versions, errors, aborts, truncations, empty answers,
redacted and plain-string prompts, thumbs and stars, rows outside the window) go into a DuckDB file and into a
real PostgreSQL database (``pg_url``). The drift job's statistics are DuckDB SQL on both: over the file
directly, over PostgreSQL on the window's rows copied in as Arrow. Exports of both are compared file by file.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tuneloop.db import Database, open_database
from tuneloop.ids import new_id
from tuneloop.monitoring.drift import parse_window, production_stats, prompt_text, words
from tuneloop.monitoring.drift_job import DriftJob
from tuneloop.monitoring.export import export_logs, read_manifest
from tuneloop.monitoring.profile import Profile, js_null, load_profile, store_profile
from tuneloop.monitoring.sources import LogSource, log_source, table_columns
from tuneloop.settings import DriftSettings

NOW = datetime(2026, 3, 2, 12, 0, 0)
VOCAB = [f"w{i}" for i in range(400)]
SETTINGS = DriftSettings(embeddings=False, min_requests=20, word_sample=150)


def _text(rng: random.Random, new_share: float) -> str:
    n = rng.randint(3, 30)
    return " ".join(
        f"New{rng.randint(0, 60)}" if rng.random() < new_share else VOCAB[min(int(rng.paretovariate(1.2)) - 1, 399)]
        for _ in range(n)
    )


def make_logs(seed: int = 5, n: int = 1500) -> tuple[list[dict], list[dict]]:
    """Requests of two versions over the last 2 hours (about half inside a 1 h window), and feedback on 30%."""
    rng = random.Random(seed)
    req_cols = [c for c, _ in table_columns("requests")]
    fb_cols = [c for c, _ in table_columns("feedback")]
    reqs, fbs = [], []
    for i in range(n):
        version = "chat-v2" if i % 3 == 0 else "chat-v1"
        at = NOW - timedelta(seconds=rng.uniform(0, 7200))
        text = _text(rng, 0.1 if version == "chat-v2" else 0.02)
        kind = rng.random()
        prompt = (
            None  # redacted
            if kind < 0.04
            else json.dumps(text)  # a completion request's prompt string
            if kind < 0.1
            else json.dumps([{"role": "system", "content": "be brief"}, {"role": "user", "content": text}])
        )
        empty = rng.random() < 0.05
        r = dict.fromkeys(req_cols)
        r.update(
            id=new_id("chatcmpl-"),
            received_at=at,
            route="chat.completions",
            model=version,
            model_version=version,
            arm=rng.choice(["production", "canary", "direct"]),
            prompt=prompt,
            response="" if empty else "answer " * rng.randint(1, 20),
            finish_reason="length" if rng.random() < 0.12 else "stop",
            prompt_tokens=len(text.split()) + 12,
            completion_tokens=rng.randint(0, 1) if empty else rng.randint(2, 80),
            ttft_s=rng.uniform(0.01, 1),
            latency_s=rng.uniform(0.1, 5),
            status=rng.choices([200, 500, 499], [0.94, 0.03, 0.03])[0],
            stream=rng.random() < 0.5,
            params=json.dumps({"temperature": 0.7}),
            user_id=f"u{rng.randint(0, 9)}",
            replica=rng.choice(["server-0", "server-1", None]),
        )
        reqs.append(r)
        if rng.random() < 0.3:
            f = dict.fromkeys(fb_cols)
            stars = rng.random() < 0.3
            f.update(
                id=new_id(),
                request_id=r["id"],
                source="api",
                rating=rng.randint(1, 5) if stars else rng.choice([-1, 1]),
                rating_kind="stars" if stars else "thumbs",
                correction="a better answer" if rng.random() < 0.2 else None,
                labels=json.dumps(["x"]),
                model_version=version,
                created_at=at + timedelta(seconds=rng.uniform(1, 600)),
            )
            fbs.append(f)
    return reqs, fbs


def insert(db: Database, reqs: list[dict], fbs: list[dict]) -> None:
    """The rows into ``db``: COPY on PostgreSQL, an Arrow INSERT on DuckDB (the log writers' own paths)."""
    import pyarrow as pa

    with db.connect() as con:
        for table, rows in (("requests", reqs), ("feedback", fbs)):
            cols = [c for c, _ in table_columns(table)]
            if db.backend == "postgres":
                con.copy_rows(table, cols, [[r[c] for c in cols] for r in rows])
            else:
                con.register("_rows", pa.Table.from_pylist([{c: r[c] for c in cols} for r in rows]))
                con.execute(f"INSERT INTO {table} ({', '.join(cols)}) SELECT {', '.join(cols)} FROM _rows")
                con.unregister("_rows")


def reference_profile(seed: int = 9, n: int = 800) -> dict[str, Any]:
    """A reference profile (the dict ``monitoring.profile`` stores) of training prompts like chat-v1's traffic."""
    rng = random.Random(seed)
    texts = [_text(rng, 0.0) for _ in range(n)]
    wc = Counter(w for t in texts for w in words(t))
    top = wc.most_common(300)
    total, kept = sum(wc.values()), sum(c for _, c in top)
    plen = Counter(len(t.split()) + 12 for t in texts)
    rlen = Counter(rng.randint(2, 80) for _ in texts)
    return {
        "n_rows": n,
        "prompt_length": [[k, v] for k, v in sorted(plen.items())],
        "response_length": [[k, v] for k, v in sorted(rlen.items())],
        "vocab": [w for w, _ in top],
        "vocab_counts": [c for _, c in top],
        "total_tokens": total,
        "oov_tokens": total - kept,
        "oov_expected": ((total - kept) + sum(1 for _, c in top if c == 1)) / total,
        "finish_mix": {"stop": n},
        "empty_share": 0.0,
        "js_null": js_null(texts, 300, np.random.default_rng(0)),
    }


@pytest.fixture(scope="module")
def logs() -> tuple[list[dict], list[dict]]:
    return make_logs()


@pytest.fixture
def both(tmp_path, pg_url, logs) -> Iterator[dict[str, Database]]:
    """A DuckDB file and a PostgreSQL database holding the same rows and the same reference profiles."""
    dbs = {"duckdb": open_database(tmp_path / "t.duckdb"), "postgres": open_database(pg_url, lock_timeout_s=10.0)}
    prof = reference_profile()
    for db in dbs.values():
        insert(db, *logs)
        for v in ("chat-v1", "chat-v2"):
            store_profile(db, Profile(v, None, prof))
    try:
        yield dbs
    finally:
        dbs["postgres"].close()


def assert_close(a: Any, b: Any, path: str = "") -> None:
    """``a == b`` with floats equal to 1e-9 (relative), through dicts, lists and tuples."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert isinstance(b, (int, float)) and b == pytest.approx(a, rel=1e-9, nan_ok=True), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.mark.parametrize("window", ["1h", "300r"])
def test_drift_statistics_over_postgres_equal_those_over_a_duckdb_file(both, window):
    results = {name: DriftJob(db, SETTINGS, None).run_once(None, window, now=NOW) for name, db in both.items()}
    duck, pg = results["duckdb"], results["postgres"]
    assert [r.model_version for r in pg] == [r.model_version for r in duck] == ["chat-v1", "chat-v2"]
    for d, p in zip(duck, pg):
        assert d.skipped is None and p.skipped is None
        assert (p.n_requests, p.window_start, p.window_end) == (d.n_requests, d.window_start, d.window_end)
        assert d.n_requests >= 200
        assert [f.feature for f in p.features] == [f.feature for f in d.features]
        assert {"prompt_length_psi", "vocabulary", "oov", "finish_length", "negative_feedback"} <= {
            f.feature for f in d.features
        }
        for fd, fp in zip(d.features, p.features):
            assert (fp.statistic, fp.drifted) == (fd.statistic, fd.drifted), fd.feature
            assert_close(fd.value, fp.value, fd.feature)
            assert_close(fd.threshold, fp.threshold, fd.feature)
            assert_close(fd.details, fp.details, fd.feature)
        assert_close(d.score, p.score)
        assert p.new_words == d.new_words and p.new_words
        assert_close(d.histograms, p.histograms)
    # the vocabulary was counted on the same hash-sampled requests: fewer than the window on chat-v1
    v1 = duck[0].feature("vocabulary")
    assert v1 is not None and v1.details["word_requests"] < duck[0].n_requests


def test_a_postgres_window_copies_only_its_rows_and_gives_the_same_aggregates(both, logs):
    reqs, fbs = logs
    since, until = NOW - timedelta(hours=1), NOW
    src = LogSource(both["postgres"])
    assert src.copies and not LogSource(both["duckdb"]).copies
    in_window = {r["id"] for r in reqs if r["model_version"] == "chat-v1" and since <= r["received_at"] <= until}
    with src.connect(since=since, until=until, model_version="chat-v1") as con:
        copied = {r[0] for r in con.execute("SELECT id FROM requests").fetchall()}
        feedback = {r[0] for r in con.execute("SELECT request_id FROM feedback").fetchall()}
    assert copied == in_window
    assert feedback == {f["request_id"] for f in fbs if f["request_id"] in in_window} and feedback

    def stats(con):
        return production_stats(
            con, "chat-v1", parse_window("1h"), VOCAB[:300], NOW, text_sample=40, seed=3, word_sample=150
        )

    with both["duckdb"].analytics() as con:
        d = stats(con)
    with src.connect(since=since, until=until, model_version="chat-v1") as con:
        p = stats(con)
    # the embedding sample: the same prompts in the same order (chosen by a hash of the id, not by row order)
    assert p.texts == d.texts and len(d.texts) == 40
    want = [prompt_text(json.loads(r["prompt"])) for r in reqs if r["id"] in in_window and r["prompt"]]
    assert set(d.texts) <= set(want)
    for key in ("n_requests", "oov_tokens", "total_tokens", "finish_length", "empty", "rated", "negative"):
        assert getattr(p, key) == getattr(d, key), key
    assert np.array_equal(p.vocab_counts, d.vocab_counts) and p.word_requests == d.word_requests
    for name in ("prompt_len", "response_len"):
        (dv, dc), (pv, pc) = getattr(d, name), getattr(p, name)
        assert sorted(zip(pv.tolist(), pc.tolist())) == sorted(zip(dv.tolist(), dc.tolist())), name


def test_drift_reports_and_reference_profiles_written_on_postgres_read_back_equal(both):
    pg, duck = both["postgres"], both["duckdb"]
    emb = np.random.default_rng(1).standard_normal((64, 384)).astype(np.float32)
    emb[0, :4] = [0.0, -0.0, np.inf, np.float32(1e-45)]  # bytes that must survive as they are
    prof = reference_profile(seed=4)
    store_profile(pg, Profile("chat-v3", "ds@abc", prof, emb))
    store_profile(pg, Profile("chat-v3", "ds@abc", prof, emb))  # replaces, does not duplicate
    back = load_profile(pg, "chat-v3")
    assert back is not None and back.dataset_id == "ds@abc" and back.profile == prof
    assert back.embeddings is not None and back.embeddings.dtype == np.float32
    assert back.embeddings.tobytes() == emb.tobytes()
    assert pg.query("SELECT count(*) AS n FROM reference_profiles WHERE model_version = 'chat-v3'") == [{"n": 1}]
    with pg.connect(transaction=False) as con:  # through a caller's connection too
        again = load_profile(pg, "chat-v3", con)
    assert again is not None and again.embeddings is not None and again.embeddings.tobytes() == emb.tobytes()

    [res] = DriftJob(pg, SETTINGS, None).run_once("chat-v1", "1h", now=NOW)
    DriftJob(duck, SETTINGS, None).run_once("chat-v1", "1h", now=NOW)  # the same pass into the DuckDB file
    sql = """SELECT id, model_version, window_start, window_end, n_requests, feature, statistic, value, threshold,
                    drifted, details FROM drift_reports ORDER BY feature"""
    rows, ref_rows = pg.query(sql), duck.query(sql)
    assert {r["id"] for r in rows} == {res.id}
    assert [r["feature"] for r in rows] == sorted([f.feature for f in res.features] + ["overall"])
    for r in rows:
        f = res.feature(r["feature"])
        want = (
            (res.score, res.threshold, res.drifted, None)
            if f is None
            else (f.value, f.threshold, f.drifted, json.loads(json.dumps(f.details, default=str)))
        )
        assert (r["model_version"], r["window_start"], r["window_end"], r["n_requests"]) == (
            "chat-v1",
            res.window_start,
            res.window_end,
            res.n_requests,
        )
        assert_close((r["value"], r["threshold"], r["drifted"]), want[:3], r["feature"])
        details = json.loads(r["details"])
        if want[3] is not None:
            assert_close(details, want[3], r["feature"])
        else:
            assert details["drifted_features"] == [f.feature for f in res.features if f.drifted]
    # and equal to what the same pass stored in the DuckDB file, row by row
    strip = [{k: v for k, v in r.items() if k != "id"} | {"details": json.loads(r["details"])} for r in rows]
    ref_strip = [{k: v for k, v in r.items() if k != "id"} | {"details": json.loads(r["details"])} for r in ref_rows]
    assert_close(strip, ref_strip)


def _parquet_contents(root: Path) -> dict[str, list[tuple]]:
    """Every Parquet file under ``root`` (relative path -> its rows by id), read back with DuckDB."""
    import duckdb

    con = duckdb.connect()
    try:
        return {
            str(p.relative_to(root)): con.execute(
                f"SELECT * FROM read_parquet('{p}', hive_partitioning=false) ORDER BY id"
            ).fetchall()
            for p in sorted(root.rglob("*.parquet"))
        }
    finally:
        con.close()


def _schemas(root: Path) -> dict[str, list[tuple]]:
    import duckdb

    con = duckdb.connect()
    try:
        return {
            str(p.relative_to(root)): con.execute(f"DESCRIBE SELECT * FROM read_parquet('{p}')").fetchall()
            for p in sorted(root.rglob("*.parquet"))
        }
    finally:
        con.close()


def test_export_logs_from_postgres_writes_the_same_parquet_as_from_a_duckdb_file(both, tmp_path, logs):
    reqs, fbs = logs
    outs = {name: tmp_path / f"out-{name}" for name in both}
    cut = NOW - timedelta(minutes=30)  # first export: everything before the last 30 minutes (closed 10-minute windows)
    for name, db in both.items():
        res = export_logs(db, outs[name], "shared", window_s=600, grace_s=0, now=cut)
        assert {t.table: t.rows for t in res.tables} == {
            "requests": sum(r["received_at"] < cut for r in reqs),
            "feedback": sum(f["created_at"] < cut for f in fbs),
        }
    first = _parquet_contents(outs["duckdb"])
    assert first and _parquet_contents(outs["postgres"]) == first
    assert _schemas(outs["postgres"]) == _schemas(outs["duckdb"])

    # idempotent on PostgreSQL: nothing new until a window closes, then only the new rows
    again = export_logs(both["postgres"], outs["postgres"], "shared", window_s=600, grace_s=0, now=cut)
    assert again.rows == 0 and all(t.skipped for t in again.tables)
    assert _parquet_contents(outs["postgres"]) == first
    for name, db in both.items():
        export_logs(db, outs[name], "shared", window_s=600, grace_s=0, now=NOW + timedelta(hours=1))
    final = _parquet_contents(outs["duckdb"])
    assert _parquet_contents(outs["postgres"]) == final
    m_pg, m_duck = (read_manifest(str(outs[n]), "shared") for n in ("postgres", "duckdb"))
    for m in (m_pg, m_duck):
        for t in ("requests", "feedback"):
            m[t].pop("last_export_at")
    assert m_pg == m_duck and m_pg["requests"]["rows"] == len(reqs) and m_pg["requests"]["runs"] == 2

    # read back through the Parquet source: every row, each with the replica that served it
    src = log_source(None, outs["postgres"])
    got = src.query("SELECT id, replica FROM requests ORDER BY id")
    assert got == sorted(({"id": r["id"], "replica": r["replica"] or "shared"} for r in reqs), key=lambda r: r["id"])
    assert src.query("SELECT count(*) AS n FROM feedback") == [{"n": len(fbs)}]


def test_export_from_postgres_defaults_to_one_name_for_the_shared_database(both, tmp_path, pg_url):
    res = export_logs(both["postgres"], tmp_path / "out", window_s=600, grace_s=0, now=NOW + timedelta(hours=1))
    name = "pg-" + pg_url.rsplit("/", 1)[1]
    assert res.replica == name and read_manifest(str(tmp_path / "out"), name)["requests"]["runs"] == 1
    assert {p.name.split("-2026")[0] for p in (tmp_path / "out").rglob("*.parquet")} == {name}


def test_drift_from_parquet_with_a_postgres_control_plane_equals_drift_over_postgres(both, tmp_path):
    pg = both["postgres"]
    out = tmp_path / "logs"
    export_logs(pg, out, "shared", window_s=600, grace_s=0, now=NOW + timedelta(hours=1))
    src = log_source(pg, out)
    assert not src.copies
    [direct] = DriftJob(pg, SETTINGS, None).run_once("chat-v2", "1h", now=NOW, write=False)
    [parquet] = DriftJob(pg, SETTINGS, None, source=src).run_once("chat-v2", "1h", now=NOW, write=False)
    assert parquet.n_requests == direct.n_requests > 0
    for fd, fp in zip(direct.features, parquet.features, strict=True):
        assert (fp.feature, fp.drifted) == (fd.feature, fd.drifted)
        assert_close(fd.value, fp.value, fd.feature)
    # control-plane tables asked for are copied from PostgreSQL next to the Parquet logs
    rows = src.query(
        "SELECT model_version, count(*) AS n FROM reference_profiles JOIN requests USING (model_version) "
        "GROUP BY 1 ORDER BY 1",
        tables=("reference_profiles",),
    )
    assert [r["model_version"] for r in rows] == ["chat-v1", "chat-v2"]


def test_drift_report_and_export_logs_commands_print_the_same_on_postgres_as_on_duckdb(cli, db, pg_url, logs, tmp_path):
    """The real console script, once on the home's DuckDB file and once with database.url naming PostgreSQL."""
    pgdb = open_database(pg_url, lock_timeout_s=10.0)
    try:
        prof = reference_profile()
        for d in (db, pgdb):
            insert(d, *logs)
            for v in ("chat-v1", "chat-v2"):
                store_profile(d, Profile(v, None, prof))
    finally:
        pgdb.close()
    on_pg = type(cli)(cli.cwd, dict(cli.env, TUNELOOP_DATABASE__URL=pg_url))
    out = {}
    for name, c in (("duckdb", cli), ("postgres", on_pg)):
        html = tmp_path / f"{name}.html"
        r = c("drift", "report", "--window", "300r", "--no-embeddings", "--out", html)
        out[name] = r.stdout.replace(str(html), "REPORT")
        assert "svg" in html.read_text()
    assert out["postgres"] == out["duckdb"]
    assert "chat-v1: 300 requests" in out["duckdb"] and "chat-v2: 300 requests" in out["duckdb"]
    assert "skipped" not in out["duckdb"] and "prompt_length_psi" in out["duckdb"]

    r = on_pg("export", "logs", "--out", tmp_path / "pg-logs", "--until", "2026-03-02T13:00:00Z", "--json")
    res = json.loads(r.stdout)
    assert res["replica"] == "pg-" + pg_url.rsplit("/", 1)[1]
    assert {t["table"]: t["rows"] for t in res["tables"]} == {"requests": len(logs[0]), "feedback": len(logs[1])}
