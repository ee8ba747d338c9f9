"""An HTTP server in a subprocess: ``tuneloop serve`` (or any other command), started, awaited and stopped.

Contract
--------
* :class:`ServerProcess` runs a command in its own process group with stdout and
  stderr going to a log file. :meth:`~ServerProcess.start` launches it,
  :meth:`~ServerProcess.wait_ready` polls ``GET <ready_path>`` until it answers
  200 and fails fast (:class:`ServerStartError`, naming the log file and quoting
  its tail) when the process exits first or the timeout passes;
  :meth:`~ServerProcess.stop` sends SIGTERM to the process group so the server
  drains and flushes its request log, then SIGKILL after a grace period. As a
  context manager it starts, waits and stops.
* :func:`tuneloop_command` is the ``tuneloop`` command line with settings
  overrides (``--set KEY=VALUE``) and, when given, the data folder passed
  explicitly as the last ``--set paths.home=DIR`` (so it wins over any other).
* :func:`tuneloop_server` is a (not yet started) :class:`ServerProcess` for
  ``tuneloop serve`` on a port of ``127.0.0.1``.

The demo, the test fixtures and the serving benchmark start their servers with it.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType

from tuneloop.errors import UserError


class ServerStartError(UserError, RuntimeError):
    """The server process exited during start-up or did not become ready in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, chosen *below* the kernel's ephemeral range.

    A server binds its port only once its engine has started (tens of seconds); a port from the ephemeral
    range (what ``bind(0)`` returns) can be handed in the meantime to any outgoing or auto-bound socket,
    vLLM's own ZMQ sockets included, and the server then fails with "address already in use". Ports below
    the range are never handed out by the kernel, so only another explicit chooser can collide (random pick)."""
    low = 32768
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low // 2), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # fall back to any free port
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tuneloop_command(
    *args: str,
    home: str | os.PathLike[str] | None = None,
    config_path: str | None = None,
    overrides: Iterable[str] = (),
) -> list[str]:
    """``tuneloop [--config FILE] [--set KEY=VALUE ...] [--set paths.home=HOME] ARGS...`` for this interpreter."""
    exe = Path(sys.executable).parent / "tuneloop"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tuneloop.cli"]
    if config_path:
        cmd += ["--config", str(config_path)]
    for o in overrides:
        cmd += ["--set", o]
    if home is not None:
        cmd += ["--set", f"paths.home={home}"]
    return cmd + list(args)


class ServerProcess:
    """A server command in a subprocess (its own process group), ready once ``GET ready_path`` answers 200."""

    def __init__(
        self,
        cmd: list[str],
        port: int,
        log_path: str | os.PathLike[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        ready_path: str = "/readyz",
        host: str = "127.0.0.1",
        stop_grace_s: float = 60.0,
        name: str | None = None,
    ):
        self.cmd, self.port, self.log_path = list(cmd), port, Path(log_path)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.ready_path = ready_path
        self.url = f"http://{host}:{port}"
        self.stop_grace_s = stop_grace_s
        self.name = name or Path(self.cmd[0]).name
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()

    # ---- life cycle ------------------------------------------------------------------------------

    def start(self) -> ServerProcess:
        """Launch the command (does not wait for readiness)."""
        if self.proc is not None:
            raise ServerStartError(f"server on port {self.port} was already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:  # the child keeps its own handle
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        return self

    def wait_ready(self, timeout_s: float = 300.0, poll_s: float = 0.5) -> float:
        """Poll ``ready_path`` until it answers 200; seconds it took. Fails fast when the process exits."""
        import httpx

        proc = self._running_proc()
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if proc.poll() is not None:
                raise ServerStartError(
                    f"`{self.name}` exited with {proc.returncode} during start-up; see {self.log_path}:\n{self.tail()}"
                )
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            if self._stopping.wait(poll_s):
                raise ServerStartError(f"`{self.name}` was stopped before it was ready; see {self.log_path}")
        raise ServerStartError(f"`{self.name}` not ready after {timeout_s:.0f} s; see {self.log_path}:\n{self.tail()}")

    def stop(self, sig: int = signal.SIGTERM, grace_s: float | None = None, group: bool = True) -> int | None:
        """Send ``sig`` to the process group (``group=False``: to the server process only, as Kubernetes signals a
        container's main process), SIGKILL the group after ``grace_s`` (default ``stop_grace_s``); the exit code."""
        self._stopping.set()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            if group:
                self._signal(sig)
            else:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(sig)
            try:
                self.proc.wait(self.stop_grace_s if grace_s is None else grace_s)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(30)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop(signal.SIGKILL)
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # ---- helpers ----------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self._running_proc().pid

    def output(self) -> str:
        """The whole log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the log."""
        return "\n".join(self.output().splitlines()[-lines:])

    def _running_proc(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise ServerStartError(f"server on port {self.port} was not started")
        return self.proc

    def _signal(self, sig: int) -> None:
        proc = self._running_proc()
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the group is gone; the process itself may still be reaped
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass


def tuneloop_server(
    home: str | os.PathLike[str] | None,
    log_path: str | os.PathLike[str],
    *,
    port: int | None = None,
    model: str | os.PathLike[str] | None = None,
    config_path: str | None = None,
    overrides: Iterable[str] = (),
    serve_args: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stop_grace_s: float = 60.0,
) -> ServerProcess:
    """A :class:`ServerProcess` for ``tuneloop serve`` on ``127.0.0.1:port`` (a free port by default), not started.

    ``home`` is passed to the child as the settings override ``paths.home``; ``overrides``
    are further ``--set`` settings; ``serve_args`` are appended to ``tuneloop serve``.
    """
    port = port or free_port()
    args = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    if model is not None:
        args += ["--model", str(model)]
    cmd = tuneloop_command(*args, *serve_args, home=home, config_path=config_path, overrides=overrides)
    return ServerProcess(cmd, port, log_path, env=env, cwd=cwd, stop_grace_s=stop_grace_s, name="tuneloop serve")
