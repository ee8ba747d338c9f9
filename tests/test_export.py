"""Logs from many replicas: each exports closed windows to one Parquet folder; reading the folder equals one database.

Real DuckDB files (one per replica, plus one holding every row as the reference), real Parquet files
written by DuckDB's COPY, read back through monitoring.sources.
"""

from __future__ import annotations

import json
import os
import random
from datetime import datetime, timedelta

import pytest

from tuneloop.db import Database, open_database
from tuneloop.errors import UserError
from tuneloop.ids import new_id
from tuneloop.monitoring.export import export_logs, floor_window, read_manifest
from tuneloop.monitoring.sources import LogSource, log_source, open_requests, table_columns

T0 = datetime(2026, 3, 1, 21, 0, 0)  # rows span midnight: two date partitions
VERSIONS = ["chat-v1", "chat-v2", "org/base model", None]  # a '/' and a space in a name, and no version


_CALLS = json.dumps([{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": 1}'}}])


def make_rows(rng: random.Random, n: int, start: datetime, span_h: float) -> tuple[list[dict], list[dict]]:
    reqs, fbs = [], []
    for _ in range(n):
        at = start + timedelta(seconds=rng.uniform(0, span_h * 3600))
        v = rng.choice(VERSIONS)
        rid = new_id()
        reqs.append(
            dict(
                id=rid,
                received_at=at,
                route=rng.choice(["chat.completions", "completions"]),
                model=v or "base",
                model_version=v,
                arm=rng.choice(["production", "canary", "direct"]),
                prompt=json.dumps([{"role": "user", "content": f"question {rng.randint(0, 999)}"}]),
                response=f"answer {rng.random():.3f}",
                finish_reason=rng.choice(["stop", "length"]),
                prompt_tokens=rng.randint(3, 200),
                completion_tokens=rng.randint(0, 64),
                ttft_s=rng.uniform(0.01, 2),
                latency_s=rng.uniform(0.1, 9),
                status=rng.choice([200, 200, 200, 400, 499]),
                error=None,
                stream=rng.random() < 0.5,
                params=json.dumps({"temperature": 0.7}),
                user_id=f"u{rng.randint(0, 9)}",
                key_id=None,
                tool_calls=_CALLS if len(reqs) % 5 == 0 else None,
            )
        )
        if rng.random() < 0.3:
            fbs.append(
                dict(
                    id=new_id(),
                    request_id=rid,
                    source="api",
                    rating=rng.choice([-1, 1]),
                    rating_kind="thumbs",
                    correction=rng.choice([None, "better answer"]),
                    comment=None,
                    labels=json.dumps(["x"]),
                    model_version=v,
                    created_at=at + timedelta(seconds=rng.uniform(1, 600)),
                )
            )
    return reqs, fbs


def insert(db: Database, reqs: list[dict], fbs: list[dict]) -> None:
    import pyarrow as pa

    with db.connect() as con:
        for table, rows in (("requests", reqs), ("feedback", fbs)):
            cols = [n for n, _ in table_columns(table)]
            batch = pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in rows])  # noqa: F841 (read by DuckDB)
            con.execute(f"INSERT INTO {table} ({', '.join(cols)}) SELECT {', '.join(cols)} FROM batch")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    """Two replicas' databases and one database holding all their rows (tests only read them)."""
    tmp_path = tmp_path_factory.mktemp("replicas")
    rng = random.Random(7)
    dbs = {name: open_database(tmp_path / f"{name}.duckdb") for name in ("server-0", "server-1")}
    everything = open_database(tmp_path / "all.duckdb")
    for _name, db in dbs.items():
        reqs, fbs = make_rows(rng, 300, T0, span_h=6)
        insert(db, reqs, fbs)
        insert(everything, reqs, fbs)
    return dbs, everything


AGGREGATES = {
    "per version and day": """
        SELECT model_version, CAST(received_at AS DATE) AS day, count(*) AS n, sum(prompt_tokens) AS pt,
               sum(completion_tokens) AS ct, round(avg(latency_s), 9) AS lat, count(*) FILTER (WHERE status >= 400) AS errors,
               count(DISTINCT user_id) AS users
        FROM requests GROUP BY ALL ORDER BY ALL""",
    "feedback joined to requests": """
        SELECT r.model_version, f.rating, count(*) AS n, count(f.correction) AS corrections
        FROM feedback f JOIN requests r ON r.id = f.request_id GROUP BY ALL ORDER BY ALL""",
    "every request row": "SELECT * FROM requests ORDER BY id",
    "every feedback row": "SELECT * FROM feedback ORDER BY id",
    "json columns": "SELECT id, prompt->>'$[0].content' AS q, params->>'temperature' AS t FROM requests ORDER BY id",
}


def test_two_replicas_exported_to_one_folder_read_like_one_database(replicas, tmp_path):
    dbs, everything = replicas
    out = tmp_path / "logs"
    now = T0 + timedelta(days=1)
    for name, db in dbs.items():
        res = export_logs(db, out, name, now=now)
        assert {t.table: t.rows for t in res.tables} == {
            "requests": 300,
            "feedback": db.query("SELECT count(*) AS n FROM feedback")[0]["n"],
        }

    # hive layout: date and model_version partitions, the replica name in every file name
    files = sorted(out.glob("requests/date=*/model_version=*/*.parquet"))
    assert {p.parent.parent.name for p in files} == {"date=2026-03-01", "date=2026-03-02"}
    assert {p.parent.name for p in files} == {
        "model_version=chat-v1",
        "model_version=chat-v2",
        "model_version=org%2Fbase%20model",
        "model_version=__HIVE_DEFAULT_PARTITION__",
    }
    assert {p.name.split("-2026")[0] for p in files} == {"server-0", "server-1"}

    parquet = LogSource(None, str(out))
    for what, sql in AGGREGATES.items():
        got = [{k: v for k, v in r.items() if k != "replica"} for r in parquet.query(sql)]
        assert got == [{k: v for k, v in r.items() if k != "replica"} for r in everything.query(sql)], what
    by_replica = parquet.query("SELECT replica, count(*) AS n FROM requests GROUP BY 1 ORDER BY 1")
    assert by_replica == [{"replica": "server-0", "n": 300}, {"replica": "server-1", "n": 300}]


def test_views_have_the_tables_exact_columns_and_types(replicas, tmp_path):
    dbs, _ = replicas
    export_logs(dbs["server-0"], tmp_path / "logs", "server-0", now=T0 + timedelta(days=1))
    src = LogSource(None, str(tmp_path / "logs"))
    for table in ("requests", "feedback"):
        with src.connect() as con:
            got = [(r[0], r[1]) for r in con.execute(f"DESCRIBE {table}").fetchall()]
        cols = [c for c in table_columns(table) if c[0] != "replica"]  # requests.replica (migration 6) comes last
        assert got == [*cols, ("replica", "VARCHAR")]


def test_parquet_views_shadow_only_the_log_tables_of_a_database(replicas, tmp_path):
    """--from-parquet with a database: requests/feedback come from the exports, every other table from the file."""
    dbs, everything = replicas
    out = tmp_path / "logs"
    for name, db in dbs.items():
        export_logs(db, out, name, now=T0 + timedelta(days=1))
    empty = open_database(tmp_path / "control-plane.duckdb")
    empty.execute("INSERT INTO api_keys VALUES ('k1', 'ci', 'admin', 'h', 'tl_', now(), NULL)")
    src = log_source(empty, out)
    assert src.query("SELECT count(*) AS n FROM requests") == [{"n": 600}]
    assert src.query("SELECT count(*) AS n FROM api_keys") == [{"n": 1}]
    assert empty.query("SELECT count(*) AS n FROM requests") == [{"n": 0}]  # the file itself is untouched
    with everything.connect(transaction=False) as con:  # open_requests on a caller's connection
        open_requests(con, out)
        assert con.execute("SELECT count(*) FROM requests").fetchone() == (600,)


def test_export_is_idempotent_and_only_exports_closed_windows(replicas, tmp_path):
    dbs, _ = replicas
    db, out = dbs["server-0"], tmp_path / "logs"
    last_row = db.query("SELECT max(received_at) AS t FROM requests")[0]["t"]
    # at this moment the window holding the newest rows is still open
    now = floor_window(last_row, 3600) + timedelta(minutes=30)
    first = export_logs(db, out, "server-0", now=now)
    open_rows = db.query("SELECT count(*) AS n FROM requests WHERE received_at >= ?", [floor_window(last_row, 3600)])[
        0
    ]["n"]
    assert open_rows > 0
    assert first.tables[0].rows == 300 - open_rows
    snapshot = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}

    again = export_logs(db, out, "server-0", now=now)
    assert again.rows == 0 and all(t.skipped for t in again.tables)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == snapshot

    later = export_logs(db, out, "server-0", now=now + timedelta(hours=2))
    assert later.tables[0].rows == open_rows
    assert LogSource(None, str(out)).query("SELECT count(*) AS n FROM requests") == [{"n": 300}]
    m = read_manifest(str(out), "server-0")
    assert m["requests"]["rows"] == 300 and m["requests"]["runs"] == 2


def test_a_run_interrupted_before_its_manifest_is_redone_without_duplicates(replicas, tmp_path):
    dbs, _ = replicas
    db, out = dbs["server-1"], tmp_path / "logs"
    export_logs(db, out, "server-1", now=T0 + timedelta(days=1))
    os.remove(out / "_manifests" / "server-1.json")  # as if killed between the data and the manifest
    export_logs(db, out, "server-1", now=T0 + timedelta(days=1, hours=3))
    assert LogSource(None, str(out)).query("SELECT count(*) AS n, count(DISTINCT id) AS d FROM requests") == [
        {"n": 300, "d": 300}
    ]


def test_since_and_until_bound_the_export(replicas, tmp_path):
    dbs, everything = replicas
    out = tmp_path / "logs"
    since, until = T0 + timedelta(hours=1), T0 + timedelta(hours=3)
    for name, db in dbs.items():
        export_logs(db, out, name, since=since, until=until, now=T0 + timedelta(days=2))
    sql = "SELECT count(*) AS n FROM requests"
    expected = everything.query(sql + " WHERE received_at >= ? AND received_at < ?", [since, until])
    assert LogSource(None, str(out)).query(sql) == expected


def test_an_empty_export_folder_reads_as_empty_tables(tmp_path):
    (tmp_path / "logs").mkdir()
    src = LogSource(None, str(tmp_path / "logs"))
    assert src.query("SELECT count(*) AS n FROM requests") == [{"n": 0}]
    assert src.query("SELECT count(*) AS n FROM feedback") == [{"n": 0}]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"replica": "../escape"}, "replica name"),
        ({"replica": "ok", "window_s": 0}, "window must be positive"),
        ({"replica": "ok", "since": T0, "until": T0 - timedelta(hours=1)}, "must be after"),
    ],
)
def test_bad_export_arguments_are_user_errors_and_write_nothing(tmp_path, kwargs, message):
    db = open_database(tmp_path / "r.duckdb")
    with pytest.raises(UserError, match=message):
        export_logs(db, tmp_path / "logs", **kwargs)
    assert not (tmp_path / "logs").exists()


def test_missing_parquet_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a folder of exported logs"):
        log_source(None, tmp_path / "nope")


def test_export_logs_command_as_a_user_runs_it(cli, db, tmp_path):
    rng = random.Random(3)
    reqs, fbs = make_rows(rng, 40, T0, span_h=3)
    insert(db, reqs, fbs)
    out = tmp_path / "exported"
    r = cli("export", "logs", "--out", out, "--replica", "box-1", "--until", "2026-03-02T00:00:00Z", "--json")
    res = json.loads(r.stdout)
    assert res["replica"] == "box-1" and res["tables"][0]["rows"] == 40
    again = cli("export", "logs", "--out", out, "--replica", "box-1", "--until", "2026-03-02")
    assert "requests  nothing (no closed window after the last export)" in again.stdout
    assert LogSource(None, str(out)).query("SELECT count(*) AS n FROM requests") == [{"n": 40}]
    bad = cli("export", "logs", "--out", out, "--since", "yesterday", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    assert "partitioned by date and model_version" in cli("export", "logs", "--help").stdout
