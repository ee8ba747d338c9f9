"""The storage layer is the only way into the tables: no other module writes SQL against them.

Read from the source of every module (its string literals, f-strings included), so a new module that slips a
``SELECT ... FROM model_versions`` into a command fails here, whatever the backend it was tried on.

* The control tables (registry, datasets, runs, deploy state, canaries, loop runs, keys, eval, drift and profile
  tables) appear in SQL only in the storage modules.
* ``requests`` and ``feedback`` are written (INSERT, UPDATE, DELETE, COPY) only by the storage modules and the
  request-log writer; the analytics modules read them with DuckDB SQL (on ``db.analytics()``: the file, or the rows
  copied from PostgreSQL), which is the one dialect the statistics are written in.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AREAS = ("server", "monitoring", "feedback", "trainer", "deploy")

STORAGE = {
    "tuneloop/db.py",
    "tuneloop/dbapi.py",
    "tuneloop/db_duckdb.py",
    "tuneloop/db_postgres.py",
    "tuneloop/migrations.py",
    "tuneloop/registry.py",
    "tuneloop/lineage.py",
    "tuneloop/dataset_store.py",
    "tuneloop/store_deploy.py",
    "tuneloop/store_keys.py",
    "tuneloop/store_feedback.py",
    "tuneloop/store_monitoring.py",
    "tuneloop/store_review.py",
    "tuneloop/store_console.py",
    "tuneloop/store_sessions.py",
}
LOG_WRITER = {"monitoring/requestlog.py"}
CONTROL = {
    "model_versions",
    "deploy_events",
    "canaries",
    "api_keys",
    "loop_runs",
    "eval_reports",
    "runs",
    "datasets",
    "dataset_rows",
    "drift_reports",
    "reference_profiles",
    "schema_migrations",
    "review_assignments",
    "console_sessions",
    "console_secrets",
}
LOG = {"requests", "feedback"}
# a table named after a SQL keyword that introduces it
_TABLE = re.compile(r"\b(FROM|JOIN|INTO|UPDATE|TABLE|COPY)\s+(\w+)", re.IGNORECASE)
_WRITE = re.compile(r"\b(INSERT\s+INTO|UPDATE|DELETE\s+FROM|COPY)\s+(\w+)", re.IGNORECASE)
_SQL_HINT = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|COPY|CREATE)\b")


def modules() -> list[str]:
    paths = list((ROOT / "tuneloop").glob("*.py"))
    for area in AREAS:
        paths += list((ROOT / area).glob("*.py"))
    return sorted(str(p.relative_to(ROOT)) for p in paths)


def sql_strings(rel: str) -> list[str]:
    """String literals of a module that look like SQL (f-strings joined with a placeholder for each value)."""
    tree = ast.parse((ROOT / rel).read_text())
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else " x " for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        else:
            continue
        if _SQL_HINT.search(text):
            out.append(text)
    return out


def test_the_scan_sees_the_sql_of_the_storage_modules_and_the_log_writer():
    """The scan is not vacuous: it finds the statements the storage layer is known to run."""
    found = {rel: {t.lower() for s in sql_strings(rel) for _, t in _TABLE.findall(s)} for rel in STORAGE | LOG_WRITER}
    assert {"model_versions", "deploy_events"} <= found["tuneloop/registry.py"]
    assert {"canaries", "loop_runs"} <= found["tuneloop/store_deploy.py"]
    assert "api_keys" in found["tuneloop/store_keys.py"] and "feedback" in found["tuneloop/store_feedback.py"]
    assert "requests" in found["monitoring/requestlog.py"]


def test_no_module_outside_the_storage_layer_writes_sql_against_the_control_tables():
    offenders = []
    for rel in modules():
        if rel in STORAGE:
            continue
        for s in sql_strings(rel):
            for _, table in _TABLE.findall(s):
                if table.lower() in CONTROL:
                    offenders.append(f"{rel}: {table}: {' '.join(s.split())[:120]}")
    assert offenders == []


def test_only_the_storage_layer_and_the_request_log_writer_write_the_log_tables():
    offenders = []
    for rel in modules():
        if rel in STORAGE or rel in LOG_WRITER:
            continue
        for s in sql_strings(rel):
            for _, table in _WRITE.findall(s):
                if table.lower() in LOG:
                    offenders.append(f"{rel}: {table}: {' '.join(s.split())[:120]}")
    assert offenders == []
