"""The DuckDB schema: migrations apply once, in order, and every table has exactly its columns."""

from __future__ import annotations

import json

import duckdb
import pytest

from tuneloop.db import Database, migrate, open_database
from tuneloop.migrations import MIGRATIONS

EXPECTED = {
    "datasets": [
        ("id", "VARCHAR"),
        ("name", "VARCHAR"),
        ("content_hash", "VARCHAR"),
        ("kind", "VARCHAR"),
        ("path", "VARCHAR"),
        ("source", "JSON"),
        ("card", "JSON"),
        ("rows_train", "BIGINT"),
        ("rows_validation", "BIGINT"),
        ("rows_test", "BIGINT"),
        ("parent_ids", "JSON"),
        ("created_at", "TIMESTAMP"),
    ],
    "runs": [
        ("id", "VARCHAR"),
        ("method", "VARCHAR"),
        ("base_model", "VARCHAR"),
        ("dataset_id", "VARCHAR"),
        ("config", "JSON"),
        ("status", "VARCHAR"),
        ("started_at", "TIMESTAMP"),
        ("finished_at", "TIMESTAMP"),
        ("duration_s", "DOUBLE"),
        ("metrics", "JSON"),
        ("output_path", "VARCHAR"),
        ("artifact_hash", "VARCHAR"),
        ("error", "VARCHAR"),
        ("tracking", "JSON"),
    ],
    "model_versions": [
        ("name", "VARCHAR"),
        ("kind", "VARCHAR"),
        ("base_model", "VARCHAR"),
        ("path", "VARCHAR"),
        ("content_hash", "VARCHAR"),
        ("parent_version", "VARCHAR"),
        ("dataset_id", "VARCHAR"),
        ("run_id", "VARCHAR"),
        ("config", "JSON"),
        ("metrics", "JSON"),
        ("created_at", "TIMESTAMP"),
        ("stage", "VARCHAR"),
        ("stage_changed_at", "TIMESTAMP"),
        ("task", "VARCHAR"),
    ],
    "eval_reports": [
        ("id", "VARCHAR"),
        ("dataset_id", "VARCHAR"),
        ("models", "JSON"),
        ("report", "JSON"),
        ("path", "VARCHAR"),
        ("created_at", "TIMESTAMP"),
    ],
    "requests": [
        ("id", "VARCHAR"),
        ("received_at", "TIMESTAMP"),
        ("route", "VARCHAR"),
        ("model", "VARCHAR"),
        ("model_version", "VARCHAR"),
        ("arm", "VARCHAR"),
        ("prompt", "JSON"),
        ("response", "VARCHAR"),
        ("finish_reason", "VARCHAR"),
        ("prompt_tokens", "INTEGER"),
        ("completion_tokens", "INTEGER"),
        ("ttft_s", "DOUBLE"),
        ("latency_s", "DOUBLE"),
        ("status", "INTEGER"),
        ("error", "VARCHAR"),
        ("stream", "BOOLEAN"),
        ("params", "JSON"),
        ("user_id", "VARCHAR"),
        ("key_id", "VARCHAR"),
        ("tool_calls", "JSON"),
        ("replica", "VARCHAR"),
        ("scores", "JSON"),
    ],
    "api_keys": [
        ("id", "VARCHAR"),
        ("name", "VARCHAR"),
        ("scope", "VARCHAR"),
        ("key_hash", "VARCHAR"),
        ("prefix", "VARCHAR"),
        ("created_at", "TIMESTAMP"),
        ("revoked_at", "TIMESTAMP"),
    ],
    "reference_profiles": [
        ("model_version", "VARCHAR"),
        ("dataset_id", "VARCHAR"),
        ("profile", "JSON"),
        ("embeddings", "BLOB"),
        ("embedding_dim", "INTEGER"),
        ("created_at", "TIMESTAMP"),
    ],
    "drift_reports": [
        ("id", "VARCHAR"),
        ("model_version", "VARCHAR"),
        ("window_start", "TIMESTAMP"),
        ("window_end", "TIMESTAMP"),
        ("n_requests", "BIGINT"),
        ("feature", "VARCHAR"),
        ("statistic", "VARCHAR"),
        ("value", "DOUBLE"),
        ("threshold", "DOUBLE"),
        ("drifted", "BOOLEAN"),
        ("details", "JSON"),
        ("created_at", "TIMESTAMP"),
    ],
    "feedback": [
        ("id", "VARCHAR"),
        ("request_id", "VARCHAR"),
        ("source", "VARCHAR"),
        ("rating", "INTEGER"),
        ("rating_kind", "VARCHAR"),
        ("correction", "VARCHAR"),
        ("comment", "VARCHAR"),
        ("labels", "JSON"),
        ("model_version", "VARCHAR"),
        ("created_at", "TIMESTAMP"),
        ("label", "VARCHAR"),
    ],
    "dataset_rows": [
        ("dataset_id", "VARCHAR"),
        ("row_id", "VARCHAR"),
        ("split", "VARCHAR"),
        ("request_id", "VARCHAR"),
        ("origin", "VARCHAR"),
    ],
    "deploy_events": [
        ("id", "VARCHAR"),
        ("model_version", "VARCHAR"),
        ("from_stage", "VARCHAR"),
        ("to_stage", "VARCHAR"),
        ("actor", "VARCHAR"),
        ("reason", "VARCHAR"),
        ("details", "JSON"),
        ("occurred_at", "TIMESTAMP"),
    ],
    "canaries": [
        ("id", "VARCHAR"),
        ("candidate", "VARCHAR"),
        ("production", "VARCHAR"),
        ("share", "DOUBLE"),
        ("status", "VARCHAR"),
        ("started_at", "TIMESTAMP"),
        ("decided_at", "TIMESTAMP"),
        ("decision", "JSON"),
    ],
    "loop_runs": [
        ("id", "VARCHAR"),
        ("step", "VARCHAR"),
        ("status", "VARCHAR"),
        ("started_at", "TIMESTAMP"),
        ("finished_at", "TIMESTAMP"),
        ("details", "JSON"),
        ("error", "VARCHAR"),
    ],
    "review_assignments": [
        ("request_id", "VARCHAR"),
        ("reviewer", "VARCHAR"),
        ("reason", "VARCHAR"),
        ("assigned_at", "TIMESTAMP"),
        ("reviewed_at", "TIMESTAMP"),
    ],
    "console_sessions": [("id_hash", "VARCHAR"), ("data", "BLOB"), ("expires_at", "TIMESTAMP")],
    "console_secrets": [("name", "VARCHAR"), ("value", "VARCHAR"), ("created_at", "TIMESTAMP")],
    "schema_migrations": [("version", "INTEGER"), ("applied_at", "TIMESTAMP")],
}


def columns(db: Database, table: str) -> list[tuple[str, str]]:
    rows = db.query(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
        [table],
    )
    return [(r["column_name"], r["data_type"]) for r in rows]


@pytest.mark.parametrize("table", sorted(EXPECTED))
def test_every_table_has_exactly_its_columns(db, table):
    assert columns(db, table) == EXPECTED[table]


def test_no_unexpected_tables(db):
    tables = {r["table_name"] for r in db.query("SELECT table_name FROM information_schema.tables")}
    assert tables == set(EXPECTED)


def test_migrations_apply_once_and_are_recorded_in_order(tmp_path):
    path = tmp_path / "t.duckdb"
    con = duckdb.connect(str(path))
    assert migrate(con) == len(MIGRATIONS)
    assert migrate(con) == len(MIGRATIONS)  # second run is a no-op
    versions = [r[0] for r in con.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()]
    assert versions == list(range(1, len(MIGRATIONS) + 1))
    con.close()


def test_an_old_database_is_upgraded_in_place(tmp_path):
    """A database created by an earlier release (fewer migrations) gains the new tables and keeps its rows."""
    import tuneloop.migrations as m

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    saved = list(m.MIGRATIONS)
    try:
        m.MIGRATIONS[:] = saved[:1]
        migrate(con)
        con.execute("INSERT INTO datasets VALUES ('d@1', 'd', '1', 'sft', '/x', NULL, NULL, 1, 0, 0, NULL, now())")
    finally:
        m.MIGRATIONS[:] = saved
    migrate(con)
    assert con.execute("SELECT count(*) FROM datasets").fetchone()[0] == 1
    assert con.execute("SELECT count(*) FROM requests").fetchone()[0] == 0
    con.close()


def test_a_request_log_from_before_tool_calling_gains_a_null_tool_calls_column_and_keeps_its_rows(tmp_path):
    """Migration 5 (ALTER TABLE): an old requests table keeps every row and column, tool_calls is NULL for
    them, and the request-log writer can then log tool calls into the upgraded file."""
    import tuneloop.migrations as m
    from tuneloop.db import open_database, utcnow
    from tuneloop.monitoring.records import RequestRecord
    from tuneloop.monitoring.requestlog import RequestLogWriter
    from tuneloop.settings import LogSettings

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    saved = list(m.MIGRATIONS)
    try:
        m.MIGRATIONS[:] = saved[:4]  # the schema before tool calling
        assert migrate(con) == 4
        con.execute(
            "INSERT INTO requests (id, received_at, route, prompt, response, status, params, key_id) VALUES "
            "('old-1', now(), 'chat.completions', '[{\"role\": \"user\", \"content\": \"hi\"}]', 'hello', "
            "200, '{\"temperature\": 0.5}', 'k1')"
        )
    finally:
        m.MIGRATIONS[:] = saved
    assert "tool_calls" not in [r[0] for r in con.execute("DESCRIBE requests").fetchall()]
    assert migrate(con) == len(MIGRATIONS)
    cols = con.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'requests' "
        "ORDER BY ordinal_position"
    ).fetchall()
    assert cols == EXPECTED["requests"]
    row = con.execute(
        "SELECT id, prompt->>'$[0].content', response, params->>'$.temperature', key_id, tool_calls FROM requests"
    ).fetchall()
    assert row == [("old-1", "hi", "hello", "0.5", "k1", None)]
    assert con.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] == len(MIGRATIONS)
    con.close()

    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]
    w = RequestLogWriter(open_database(path), LogSettings(flush_interval_s=60))
    w.submit(RequestRecord(id="new-1", received_at=utcnow(), route="chat.completions", status=200, tool_calls=calls))
    assert w.flush() == 1 and w.close() == 0
    got = open_database(path).query(
        "SELECT tool_calls->>'$[0].function.name' AS name, tool_calls FROM requests WHERE id = 'new-1'"
    )
    assert got[0]["name"] == "get_weather" and json.loads(got[0]["tool_calls"]) == calls


def test_failed_transaction_writes_nothing(db):
    with pytest.raises(RuntimeError), db.connect() as con:
        con.execute("INSERT INTO api_keys VALUES ('k', 'n', 'admin', 'h', 'p', now(), NULL)")
        raise RuntimeError("crash mid-write")
    assert db.query("SELECT count(*) AS n FROM api_keys")[0]["n"] == 0


def test_a_second_process_waits_for_the_lock_then_proceeds(db, tmp_path):
    """Short connections + retry: a writer that holds the file briefly does not make another process fail."""
    import subprocess
    import sys
    import textwrap

    db.execute("SELECT 1")  # create + migrate
    script = textwrap.dedent(f"""
        import duckdb, time
        con = duckdb.connect({str(db.path)!r})
        print('locked', flush=True)
        time.sleep(1.5)
        con.close()
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    db.execute("INSERT INTO api_keys VALUES ('k2', 'n', 'admin', 'h2', 'p', now(), NULL)")
    p.wait(10)
    assert db.query("SELECT count(*) AS n FROM api_keys")[0]["n"] == 1


def test_data_version_moves_on_writes_from_any_process_but_not_on_reads_or_own_log_appends(db):
    """Pollers (deploy state, API keys) re-read only when data_version moved: a stat instead of a 15 ms open."""
    import subprocess
    import sys

    db.execute("SELECT 1")  # create + migrate
    v0 = db.data_version()
    assert db.data_version() == v0
    db.query("SELECT count(*) FROM api_keys")  # a read is not a change
    assert db.data_version() == v0
    with db.connect(log_only=True) as con:  # this process's request-log appends are not either
        con.execute(
            "INSERT INTO requests (id, received_at, route, status) VALUES ('r1', now(), 'chat.completions', 200)"
        )
    assert db.data_version() == v0
    db.execute("INSERT INTO api_keys VALUES ('k', 'n', 'admin', 'h', 'p', now(), NULL)")  # an ordinary write is
    v1 = db.data_version()
    assert v1 != v0 and db.data_version() == v1
    other = open_database(db.path)  # another handle on the same file shares what this process has seen
    assert other.data_version() == v1
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"import duckdb; con = duckdb.connect({str(db.path)!r}); "
            "con.execute(\"UPDATE api_keys SET name = 'renamed'\"); con.close()",
        ],
        check=True,
    )
    v2 = db.data_version()  # another process's write: seen without opening the file
    assert v2 != v1 and db.data_version() == v2


def test_cached_read_reruns_only_after_a_change(db):
    from tuneloop.db import CachedRead

    db.execute("SELECT 1")  # create + migrate (a first open writes the schema: that is a change)
    calls = []
    keys = CachedRead(db, lambda con: calls.append(1) or con.execute("SELECT count(*) FROM api_keys").fetchone()[0])
    assert keys.get() == 0 and keys.get() == 0 and len(calls) == 1  # unchanged: a stat, no open
    db.execute("INSERT INTO api_keys VALUES ('k', 'n', 'admin', 'h', 'p', now(), NULL)")
    assert keys.get() == 1 and len(calls) == 2


def test_a_process_waiting_for_the_lock_knocks_and_the_holder_hears_each_knock_once(db):
    import subprocess
    import sys

    with db.connect(keep_open=True):
        pass
    assert db.held and not db.knocked()
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from tuneloop.db import Database, DatabaseBusy, open_database\n"
            "try:\n    open_database(sys.argv[1], lock_timeout_s=0.3).query('SELECT 1')\n"
            "except DatabaseBusy:\n    print('busy')",
            str(db.path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.stdout.strip() == "busy", p.stderr  # held: the other process had to wait, and knocked
    assert db.knocked() and not db.knocked()
    db.release()
    assert not db.held
    assert db.query("SELECT 1 AS one") == [{"one": 1}]


# PostgreSQL spells the same types its own way; the migrations are rendered for it (migrations.render).
PG_TYPE = {
    "VARCHAR": "character varying",
    "TIMESTAMP": "timestamp without time zone",
    "JSON": "json",
    "BIGINT": "bigint",
    "INTEGER": "integer",
    "DOUBLE": "double precision",
    "BOOLEAN": "boolean",
    "BLOB": "bytea",
}


@pytest.fixture
def pg_db(pg_url):
    db = open_database(pg_url, lock_timeout_s=10.0)
    yield db
    db.close()


@pytest.mark.parametrize("table", sorted(EXPECTED))
def test_every_table_has_exactly_its_columns_on_postgresql(pg_db, table):
    rows = pg_db.query(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = 'public' "
        "AND table_name = ? ORDER BY ordinal_position",
        [table],
    )
    assert [(r["column_name"], r["data_type"]) for r in rows] == [(n, PG_TYPE[t]) for n, t in EXPECTED[table]]


def test_no_unexpected_tables_on_postgresql(pg_db):
    rows = pg_db.query("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
    assert {r["table_name"] for r in rows} == set(EXPECTED)


def test_replicas_starting_together_apply_each_postgresql_migration_once(pg_url):
    """Four processes' worth of handles (separate pools) migrate a fresh database at the same moment: the
    advisory lock lets one apply the migrations, the others find them applied."""
    import threading

    dbs = [open_database(pg_url, lock_timeout_s=30.0) for _ in range(4)]
    barrier = threading.Barrier(len(dbs))
    errors: list[BaseException] = []

    def start(db) -> None:
        barrier.wait()
        try:
            db.query("SELECT 1 AS one")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start, args=(d,)) for d in dbs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        versions = [r["version"] for r in dbs[0].query("SELECT version FROM schema_migrations ORDER BY version")]
        assert versions == list(range(1, len(MIGRATIONS) + 1))
    finally:
        for d in dbs:
            d.close()


def test_json_reads_back_as_text_and_placeholders_work_on_both_backends(any_db):
    """The one SQL the control plane writes runs unchanged on both backends: ``?`` placeholders (also next to a
    quoted '?'), JSON written as text and read back as the same text, naive UTC timestamps."""
    from tuneloop.db import dumps, loads, utcnow

    now = utcnow()
    with any_db.connect() as con:
        con.execute(
            "INSERT INTO eval_reports (id, models, report, path, created_at) VALUES (?, ?, ?, '?', ?)",
            ["r1", dumps(["a", "b"]), dumps({"score": 0.5, "what?": [1, 2]}), now],
        )
    row = any_db.query("SELECT models, report, path, created_at FROM eval_reports WHERE id = ?", ["r1"])[0]
    assert isinstance(row["report"], str) and loads(row["report"]) == {"score": 0.5, "what?": [1, 2]}
    assert loads(row["models"]) == ["a", "b"] and row["path"] == "?"
    assert abs((row["created_at"] - now).total_seconds()) < 1e-3 and row["created_at"].tzinfo is None


def test_postgresql_has_the_time_window_indexes_and_duckdb_none(pg_db, db):
    """Migration 7 indexes what the analytics copy by (a time window of the log, feedback by request) on
    PostgreSQL only; both backends record the same schema version."""
    rows = pg_db.query("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'")
    defs = {r["indexname"]: r["indexdef"] for r in rows}
    assert "USING btree (received_at)" in defs["requests_received_at"]
    assert "USING btree (model_version, received_at)" in defs["requests_version_received_at"]
    assert "USING btree (request_id)" in defs["feedback_request_id"]
    assert "USING btree (created_at)" in defs["feedback_created_at"]
    assert db.query("SELECT count(*) AS n FROM duckdb_indexes()")[0]["n"] == 0
    versions = "SELECT max(version) AS v FROM schema_migrations"
    assert pg_db.query(versions)[0]["v"] == db.query(versions)[0]["v"] == len(MIGRATIONS)
