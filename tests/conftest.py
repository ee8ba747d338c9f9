"""Shared test fixtures: a tiny model built once per session, an isolated home, the CLI.

Fixtures here are real components: a real (tiny, random-init) Llama with a
trained BPE tokenizer, real DuckDB files in tmp, and the real ``tuneloop``
console script run as a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Under pytest-xdist (`make test` runs two workers on a 2-core machine) each worker keeps to one core: its vLLM
# engines bind their OpenMP threads to that core and torch (here and in the CLI subprocesses) runs one thread, so
# the workers do not spin against each other. Set before torch or vLLM is imported; user-set values win.
_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
if _worker.startswith("gw") and (os.cpu_count() or 1) >= int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")):
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(int(_worker[2:]) % (os.cpu_count() or 1)))
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# vLLM reads its environment when imported: the tests run its engine core in-process, and on CPU it needs
# VLLM_CPU_KVCACHE_SPACE and friends (set by configure_vllm_env) or start-up fails.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
from tuneloop.runtime import configure_vllm_env  # noqa: E402 (after the environment above)

configure_vllm_env(cache_root=Path(__file__).resolve().parent.parent / ".tuneloop")

VENV_BIN = Path(sys.executable).parent
IN_CI = bool(os.environ.get("CI"))


def require(available: bool, what: str, how: str) -> None:
    """Skip the calling test when ``what`` is missing, except in CI (``$CI`` set), where a missing tool fails
    the run: a CI run never goes green by testing nothing."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{what} is required in CI but missing ({how})")
    pytest.skip(f"{what} not available ({how})")


def require_tool(name: str) -> str:
    """The path of executable ``name`` (skip outside CI, fail in CI when it is not installed)."""
    path = shutil.which(name)
    require(path is not None, name, "make system-deps")
    assert path is not None
    return path


pytest_plugins = [
    "fixtures_server",  # live `tuneloop serve` + LoRA adapters (tests/fixtures_server.py)
    "fixtures_vllm",  # vLLM's own OpenAI server on the tiny model, for parity (tests/fixtures_vllm.py)
    "fixtures_postgres",  # a real PostgreSQL server and a database per test (tests/fixtures_postgres.py)
]


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
    from tuneloop.db import open_database

    return open_database(home / "tuneloop.duckdb")


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


@pytest.fixture(scope="session")
def chat_seed(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """A home prepared once per session by the real CLI, for the train / merge / eval modules to copy.

    It holds the SFT dataset ``chat`` (40 chatterbot conversations), the preference dataset ``pref`` (24 pairs
    built from them: the real answer chosen, a refusal rejected) and ``chat-v1``, a LoRA trained 2 steps on
    ``chat``. Modules take a copy (:func:`copy_home`) so what they write stays theirs.
    """
    root = tmp_path_factory.mktemp("chat-seed")
    home = root / "home"
    cli = CLI(root, dict(os.environ, TUNELOOP_HOME=str(home)))
    cli("data", "corpus", "chatterbot-corpus", "-o", root / "chat.jsonl", "--limit", "40")
    cli("data", "prepare", root / "chat.jsonl", "--name", "chat", "--base", tiny_model, "--no-progress")
    rows = [json.loads(line) for line in (root / "chat.jsonl").read_text().splitlines()]
    with open(root / "pref.jsonl", "w") as f:
        for i, r in enumerate(rows[:24]):
            m = r["messages"]
            rejected = [{"role": "assistant", "content": f"No idea, sorry ({i})."}]
            f.write(json.dumps({"prompt": m[:-1], "chosen": m[-1:], "rejected": rejected}) + "\n")
    cli("data", "prepare", root / "pref.jsonl", "--name", "pref", "--base", tiny_model, "--no-progress")
    cli("train", f"base={tiny_model}", "dataset=chat", "name=chat-v1", "max_steps=2", "learning_rate=0.01", "--quiet")
    return {"root": root, "home": home}


def copy_home(seed: dict[str, Path], root: Path) -> tuple[Path, CLI]:
    """A copy of the seed's home under ``root`` and a CLI on it (datasets and adapters stay the seed's files)."""
    home = root / "home"
    shutil.copytree(seed["home"], home)
    return home, CLI(root, dict(os.environ, TUNELOOP_HOME=str(home)))


def workspace(tiny_model: Path, chat_seed: dict[str, Path], root: Path) -> dict:
    """A copy of the session's prepared home under ``root`` (datasets 'chat' and 'pref'), with its CLI and
    database: what the training and tuning test modules start from."""
    from tuneloop.db import open_database

    home, cli = copy_home(chat_seed, root)
    return {
        "root": root,
        "home": home,
        "cli": cli,
        "db": open_database(home / "tuneloop.duckdb"),
        "base": str(tiny_model),
    }


def run_with_importtime(cli: CLI, *argv: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``tuneloop ARGV`` under ``python -X importtime``: the result and the set of modules it imported."""
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "tuneloop.cli", *argv],
        env=cli.env,
        cwd=cli.cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}
    return r, imported


# the longest modules first: under pytest-xdist (--dist loadfile) they start at once on different workers, and the
# many short modules fill the other worker meanwhile, so the two finish together instead of one long tail
LONGEST_FIRST = ("test_gate_real_models.py", "test_demo.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def register_chat_base(cli: CLI, db, folder: Path, name: str, rows: int) -> str:
    """``name``: the model ``folder`` registered as a base version whose dataset is ``rows`` rows of the chatterbot
    corpus prepared on it (``chat``), through the CLI as a user does it; its test split is what exports measure."""
    from tuneloop.ids import hash_path
    from tuneloop.registry import ModelVersion, get_dataset, register_version

    cli("data", "corpus", "chatterbot-corpus", "-o", "chat.jsonl", "--limit", str(rows))
    cli("data", "prepare", "chat.jsonl", "--name", "chat", "--base", str(folder), "--no-progress")
    register_version(
        db,
        ModelVersion(
            name=name, kind="base", base_model=str(folder), path=str(folder), content_hash=hash_path(folder),
            dataset_id=get_dataset(db, "chat").id,
        ),
    )  # fmt: skip
    return name
