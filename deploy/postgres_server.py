"""A throwaway local PostgreSQL server: initialised in a folder, started, stopped, restarted.

Contract
--------
* :class:`LocalPostgres` runs the PostgreSQL binaries of the machine (Debian's
  ``postgresql`` package: ``/usr/lib/postgresql/<major>/bin``, or any folder
  holding ``initdb``/``pg_ctl``, :func:`find_bin_dir`) on ``127.0.0.1:<port>``
  with a fresh data folder. ``start()`` runs ``initdb`` once (trust auth on
  loopback, a database named ``tuneloop``) and ``pg_ctl start``; ``stop()``
  stops it (``fast`` mode: open connections are cut, as a crash or a failover
  would); ``restart()`` is stop + start on the same data and port. ``url`` is
  the ``postgresql://`` URL a client passes as ``database.url``.
* PostgreSQL refuses to run as root. When this process is root the server runs
  as an unprivileged user (``nobody`` by default) and the data folder is
  handed to it; otherwise it runs as the current user.
* ``pg_ctl`` always gets a log file (``<dir>/postgres.log``): with its output
  on a pipe, ``pg_ctl start`` would keep the pipe open for the server's lifetime.
* It is for tests, benchmarks and local trials (``fsync=off`` unless asked
  otherwise): production runs a managed PostgreSQL or an operator
  (docs/SCALING.md).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

from tuneloop.deploy.server_process import free_port
from tuneloop.errors import UserError


class PostgresUnavailable(UserError, RuntimeError):
    """No PostgreSQL server binaries on this machine, or the server did not start."""


def find_bin_dir() -> Path:
    """The folder with ``initdb`` and ``pg_ctl``: ``$TUNELOOP_PG_BIN``, Debian's newest
    ``/usr/lib/postgresql/<major>/bin``, or the folder of ``pg_ctl`` on ``PATH``."""
    env = os.environ.get("TUNELOOP_PG_BIN")
    candidates = [Path(env)] if env else []
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        majors = sorted((p for p in root.iterdir() if p.name.isdigit()), key=lambda p: int(p.name), reverse=True)
        candidates += [p / "bin" for p in majors]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent)
    for c in candidates:
        if (c / "initdb").exists() and (c / "pg_ctl").exists():
            return c
    raise PostgresUnavailable(
        "no PostgreSQL server binaries (initdb, pg_ctl) found: install Debian's `postgresql` package "
        "(`apt-get install postgresql`) or set TUNELOOP_PG_BIN to the folder holding them"
    )


class LocalPostgres:
    """One local PostgreSQL server in ``root`` (see module doc)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        port: int | None = None,
        *,
        user: str = "nobody",
        fsync: bool = False,
        max_connections: int = 200,
    ) -> None:
        self.root = Path(root).resolve()
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log_path = self.root / "postgres.log"
        self.port = port or free_port()
        self.fsync = fsync
        self.max_connections = max_connections
        self.bin = find_bin_dir()
        self._as_root = os.geteuid() == 0
        self._pw = pwd.getpwnam(user) if self._as_root else None

    @property
    def url(self) -> str:
        """``postgresql://`` URL of the ``tuneloop`` database (trust auth on loopback)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/tuneloop"

    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        kw: dict = {}
        if self._pw is not None:
            kw = {"user": self._pw.pw_uid, "group": self._pw.pw_gid, "extra_groups": []}
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        return subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=str(self.root),
            check=False,
            **kw,
        )

    def _chown(self, p: Path) -> None:
        if self._pw is not None:
            os.chown(p, self._pw.pw_uid, self._pw.pw_gid)

    def _init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        for p in (self.root, self.socket_dir):
            self._chown(p)
        if self._pw is not None:  # the server user must reach the folder through every parent
            p = self.root
            while p != p.parent:
                p = p.parent
                mode = p.stat().st_mode
                if not mode & 0o001:
                    raise PostgresUnavailable(f"{p} is not searchable by {self._pw.pw_name}; put the server elsewhere")
        r = self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        if r.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {(r.stderr or r.stdout).strip()[-800:]}")

    def start(self, timeout: float = 60.0) -> LocalPostgres:
        """Initialise (first time) and start the server; returns self once it accepts connections."""
        fresh = not (self.data / "PG_VERSION").exists()
        if fresh:
            self._init()
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.socket_dir} -c max_connections={self.max_connections}"
        if not self.fsync:  # a throwaway server: durability is not what it is for
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        if not self.log_path.exists():
            self.log_path.touch()
            self._chown(self.log_path)
        r = self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log_path),
            "-o",
            opts,
            "-w",
            "-t",
            str(int(timeout)),
            "start",
            timeout=timeout + 10,
        )
        if r.returncode != 0:
            tail = self.log_path.read_text(errors="replace")[-1500:] if self.log_path.exists() else ""
            raise PostgresUnavailable(f"PostgreSQL did not start: {(r.stderr or r.stdout).strip()}\n{tail}")
        if fresh:
            self._psql("CREATE DATABASE tuneloop")
        return self

    def _psql(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as con:
            con.execute(sql)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: cut open connections; ``immediate``: like a crash). No-op if stopped."""
        if not (self.data / "postmaster.pid").exists():
            return
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def wait_accepting(self, timeout: float = 30.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
