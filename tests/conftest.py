"""Shared test fixtures: a tiny model built once per session, an isolated home, the CLI.

Fixtures here are real components: a real (tiny, random-init) Llama with a
trained BPE tokenizer, real DuckDB files in tmp, and the real ``tuneloop``
console script run as a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# vLLM reads its environment when imported: the tests run its engine core in-process, and on CPU it needs
# VLLM_CPU_KVCACHE_SPACE and friends (set by configure_vllm_env) or start-up fails.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
from tuneloop.runtime import configure_vllm_env

configure_vllm_env(cache_root=Path(__file__).resolve().parent.parent / ".tuneloop")

VENV_BIN = Path(sys.executable).parent
pytest_plugins = ["fixtures_server"]  # live `tuneloop serve` + LoRA adapters (tests/fixtures_server.py)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random-init 2-layer Llama + BPE tokenizer + ChatML template (built once, ~7 s)."""
    from tuneloop.trainer.bootstrap import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty TUNELOOP_HOME (database, datasets, runs) for one test."""
    h = tmp_path / "home"
    monkeypatch.setenv("TUNELOOP_HOME", str(h))
    monkeypatch.delenv("TUNELOOP_CONFIG", raising=False)
    return h


@pytest.fixture
def db(home):
    from tuneloop.db import Database

    return Database(home / "tuneloop.duckdb")


class CLI:
    """Runs the installed ``tuneloop`` console script as a user would."""

    def __init__(self, cwd: Path, env: dict[str, str]):
        self.cwd, self.env = cwd, env

    def __call__(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        r = subprocess.run(
            [str(VENV_BIN / "tuneloop"), *map(str, args)],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"tuneloop {' '.join(map(str, args))} exited {r.returncode}\nSTDOUT:\n{r.stdout}\nSTDERR:\n{r.stderr}"
            )
        return r


@pytest.fixture
def cli(home, tmp_path) -> CLI:
    env = dict(os.environ, TUNELOOP_HOME=str(home))
    return CLI(tmp_path, env)
