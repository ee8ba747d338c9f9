"""Server fixtures: LoRA adapters for the tiny model and a live ``tuneloop serve`` shared by the session.

* ``tiny_adapters``: random-init LoRA adapters of the tiny model, written with
  PEFT (``get_peft_model`` + ``save_pretrained``; plumbing, not quality):
  ``a`` and ``b`` (r=8), ``wide`` (r=32, above the server's max_lora_rank=16).
* ``live_server``: the real console script ``tuneloop serve`` started once per
  session as a subprocess on a free port over the tiny model (real vLLM
  engine, real DuckDB file, real HTTP), with adapter ``a`` registered as model
  version ``tiny-a``. Tests talk to it with the official ``openai`` client or
  httpx. :func:`start_server` starts further short-lived servers (SIGTERM /
  SIGKILL tests).
* Every server runs the engine as shipped: vLLM's online engine (``AsyncLLM``)
  always runs its engine core in a child process, whatever
  ``VLLM_ENABLE_V1_MULTIPROCESSING`` says (that variable, which conftest sets,
  only keeps the *offline* engines of eval and the gate in-process). The
  lifecycle tests assert the ``VLLM::EngineCore`` child exists.
  ``default_server`` is a second session server whose drift job runs every
  second (health in a fresh server, the drift job and its gauges).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tuneloop.deploy.server_process import ServerProcess, ServerStartError, free_port, tuneloop_server

__all__ = [
    "LiveServer",
    "descendants",
    "free_port",
    "make_lora",
    "read_requests",
    "sse_events",
    "start_server",
]

VENV_BIN = Path(sys.executable).parent
SERVER_SETTINGS = {
    "TUNELOOP_ENGINE__MAX_MODEL_LEN": "512",
    "TUNELOOP_ENGINE__MAX_NUM_SEQS": "64",
    "TUNELOOP_ENGINE__MAX_LORA_RANK": "16",
    "TUNELOOP_ENGINE__MAX_LORAS": "4",
    "TUNELOOP_LOG__FLUSH_INTERVAL_S": "0.2",
    "TUNELOOP_SERVER__STATE_REFRESH_S": "0.5",
    # the live canary tests (tests/test_canary.py) run on the session server: it judges canaries every second;
    # promotion needs 50 canary requests, and a 5-point error-rate margin can be shown on ~100 error-free
    # requests per arm. With no running canary the judge does nothing.
    "TUNELOOP_DEPLOY__CANARY_JUDGE_INTERVAL_S": "1",
    "TUNELOOP_DEPLOY__CANARY_MIN_REQUESTS": "50",
    "TUNELOOP_DEPLOY__CANARY_MAX_ERROR_RATE_DELTA": "0.05",
    # the admin API loads adapter folders only from server.adapter_roots: the tests' folders are pytest tmp
    # folders (tiny_adapters, tmp_path), all under pytest's temp root; plus the defaults (<home>/runs, <home>/models)
    "TUNELOOP_SERVER__ADAPTER_ROOTS": ",".join(
        ["runs", "models", str(Path(os.environ.get("PYTEST_DEBUG_TEMPROOT") or tempfile.gettempdir()).resolve())]
    ),
}
# the drift job of `default_server`: every second, over few requests, without the embedding model
DRIFT_SETTINGS = {
    "TUNELOOP_DRIFT__INTERVAL_S": "1",
    "TUNELOOP_DRIFT__MIN_REQUESTS": "20",
    "TUNELOOP_DRIFT__EMBEDDINGS": "false",
}


def make_lora(base: Path, dest: Path, r: int = 8, seed: int = 0) -> Path:
    """A random-init (non-zero B) LoRA adapter of ``base`` saved with PEFT at ``dest``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(str(dest))
    return dest


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_lora(tiny_model, root / "a", r=8, seed=1),
        "b": make_lora(tiny_model, root / "b", r=8, seed=2),
        "wide": make_lora(tiny_model, root / "wide", r=32, seed=3),
    }


@dataclass
class LiveServer:
    """A running ``tuneloop serve`` subprocess (started with :mod:`tuneloop.deploy.server_process`)."""

    server: ServerProcess
    home: Path
    base_name: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def proc(self) -> subprocess.Popen:
        assert self.server.proc is not None
        return self.server.proc

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def log_path(self) -> Path:
        return self.server.log_path

    @property
    def db_path(self) -> Path:
        return self.home / "tuneloop.duckdb"

    def db(self):
        from tuneloop.db import open_database

        return open_database(self.db_path)

    def openai(self, **kw):
        import openai

        return openai.OpenAI(
            base_url=self.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, timeout=120, **kw
        )

    def async_openai(self, **kw):
        import openai

        return openai.AsyncOpenAI(
            base_url=self.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, timeout=300, **kw
        )

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kw)

    def flush_log(self, headers: dict[str, str] | None = None) -> dict:
        r = httpx.post(self.url + "/admin/log/flush", headers=headers or {}, timeout=60)
        r.raise_for_status()
        return r.json()

    def output(self) -> str:
        return self.server.output()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> int:
        """``sig`` to the server's process group, SIGKILL after ``timeout`` seconds; its exit code."""
        rc = self.server.stop(sig, grace_s=timeout)
        assert rc is not None
        return rc


def start_server(
    home: Path,
    model: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    ready_timeout: float = 240,
) -> LiveServer:
    """Start ``tuneloop serve --model MODEL`` on a free port and wait until /readyz answers 200."""
    home.mkdir(parents=True, exist_ok=True)
    e = {**os.environ, "TUNELOOP_HOME": str(home), **SERVER_SETTINGS, **(env or {})}
    e.pop("TUNELOOP_CONFIG", None)
    port = free_port()
    server = tuneloop_server(
        home, home / f"serve-{port}.log", port=port, model=model, serve_args=extra, env=e, cwd=home, stop_grace_s=90
    )
    srv = LiveServer(server.start(), home, Path(model).name, e)
    try:
        server.wait_ready(ready_timeout)
    except ServerStartError as err:
        srv.stop(signal.SIGKILL)
        raise AssertionError(f"{err}\n{srv.output()[-6000:]}") from None
    return srv


@pytest.fixture(scope="session")
def live_server(tiny_model, tiny_adapters, tmp_path_factory):
    """One live server for the session: tiny base served as its folder name, version ``tiny-a`` registered."""
    from tuneloop.db import open_database
    from tuneloop.ids import hash_path
    from tuneloop.registry import ModelVersion, register_version

    home = tmp_path_factory.mktemp("serve-home")
    db = open_database(home / "tuneloop.duckdb")
    register_version(
        db,
        ModelVersion(
            name="tiny-a",
            kind="adapter",
            base_model=str(tiny_model),
            path=str(tiny_adapters["a"]),
            content_hash=hash_path(tiny_adapters["a"]),
        ),
    )
    srv = start_server(home, tiny_model)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def default_server(tiny_model, tmp_path_factory):
    """A second session server whose drift job runs every second (health of a fresh server, the drift job)."""
    srv = start_server(tmp_path_factory.mktemp("serve-default"), tiny_model, env=DRIFT_SETTINGS)
    yield srv
    srv.stop()


def descendants(pid: int) -> list:
    """The live descendant processes of ``pid`` (``psutil.Process`` objects, so a reused pid is not mistaken)."""
    import psutil

    return psutil.Process(pid).children(recursive=True)


def read_requests(db_path: Path, where: str = "TRUE", params: list | None = None) -> list[dict]:
    """Rows of the request log (short read-only connection that retries while the server writes)."""
    from tuneloop.db import open_database

    return open_database(db_path).query(f"SELECT * FROM requests WHERE {where} ORDER BY received_at", params or [])


def sse_events(text: str) -> list:
    """Parse an SSE body into the JSON payloads of its ``data:`` lines (``[DONE]`` kept as the string)."""
    out = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                payload = line[len("data: ") :]
                out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out
