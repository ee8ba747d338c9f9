"""A real PostgreSQL server for the tests of the shared backend.

* ``postgres_server`` (session): Debian's PostgreSQL binaries run as an unprivileged user on a loopback port
  in a temporary folder (:class:`tuneloop.deploy.postgres_server.LocalPostgres`); stopped at the end. Missing
  binaries skip the test outside CI and fail it in CI (``require``): ``make test`` installs them.
* ``pg_url`` (function): a fresh, empty database on that server for one test, dropped afterwards.
* ``any_db`` (function, parametrized ``duckdb`` / ``postgres``): a :class:`tuneloop.db.Database` of each
  backend, for the storage tests that must hold on both.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tuneloop.db import Database, open_database


@pytest.fixture(scope="session")
def postgres_server():
    from conftest import require

    from tuneloop.deploy.postgres_server import LocalPostgres, PostgresUnavailable, find_bin_dir

    try:
        find_bin_dir()
        found = True
    except PostgresUnavailable:
        found = False
    require(found, "PostgreSQL server binaries (initdb, pg_ctl)", "make test-deps installs Debian's postgresql")
    # not under pytest's tmp folders: they are private to root, and the server runs as another user
    root = Path(tempfile.mkdtemp(prefix="tuneloop-test-pg-"))
    root.chmod(0o755)
    pg = LocalPostgres(root).start()
    try:
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


def _admin(pg, sql: str) -> None:
    import psycopg

    with psycopg.connect(pg.url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as con:
        con.execute(sql)  # type: ignore[arg-type]


@pytest.fixture
def pg_url(postgres_server) -> Iterator[str]:
    name = "t_" + uuid.uuid4().hex[:12]
    _admin(postgres_server, f"CREATE DATABASE {name}")
    url = postgres_server.url.rsplit("/", 1)[0] + "/" + name
    try:
        yield url
    finally:
        _admin(postgres_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["duckdb", "postgres"])
def any_db(request, tmp_path) -> Iterator[Database]:
    if request.param == "duckdb":
        yield open_database(tmp_path / "tuneloop.duckdb")
        return
    url = request.getfixturevalue("pg_url")
    db = open_database(url, lock_timeout_s=10.0)
    try:
        yield db
    finally:
        db.close()
