"""Every input a user can get wrong ends the same way: `error: <what to do>` on stderr, exit 2, no traceback, and
nothing half-written (no run, version, report or drift rows; the database still opens).

One table, one row per failure: each row builds its bad input in a fresh home, runs the real `tuneloop` console
script and checks the contract. The serve rows fail before an engine starts (the settings are checked up front),
except `serve-engine-refuses`, which lets vLLM refuse a setting at start-up: the server's lifespan turns that into
the same error.
"""

from __future__ import annotations

import json
import shlex
import shutil
import socket
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import CLI, run_with_importtime

pytestmark = pytest.mark.slow

TABLES = ("runs", "model_versions", "eval_reports", "drift_reports", "loop_runs", "deploy_events", "datasets")
NO_ML = """
import sys
BLOCKED = {"torch", "vllm", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "gguf"}
class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Blocker())
"""
ONE_FAKE_GPU = """
import torch
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
"""


@dataclass
class Setup:
    """What a row's setup gets: the test's home, a scratch folder and the tiny model."""

    home: Path
    tmp: Path
    tiny_model: Path
    env: dict[str, str] = field(default_factory=dict)
    files: dict[Path, bytes] = field(default_factory=dict)  # files that must be left unchanged

    @property
    def db(self):
        from tuneloop.db import open_database

        return open_database(self.home / "tuneloop.duckdb")

    def model_copy(self, name: str, drop: tuple[str, ...] = ()) -> Path:
        dest = self.tmp / name
        shutil.copytree(self.tiny_model, dest)
        for pattern in drop:
            for f in dest.glob(pattern):
                f.unlink()
        return dest

    def adapter(self, name: str, config: str | None = None) -> Path:
        d = self.tmp / "adapters" / name
        d.mkdir(parents=True)
        cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
        (d / "adapter_config.json").write_text(config if config is not None else json.dumps(cfg))
        (d / "adapter_model.safetensors").write_bytes(b"")
        return d

    def register(self, name: str, base: Path, path: Path, dataset_id: str | None = None) -> None:
        from tuneloop.registry import ModelVersion, register_version

        register_version(
            self.db,
            ModelVersion(
                name=name,
                kind="adapter",
                base_model=str(base),
                path=str(path),
                content_hash="0" * 64,
                dataset_id=dataset_id,
            ),
        )

    def keep(self, p: Path) -> Path:
        self.files[p] = p.read_bytes()
        return p


@dataclass
class Case:
    id: str
    item: int  # the numbered failure of the issue
    setup: Callable[[Setup], list[str]]  # builds the bad input, returns the CLI arguments
    hint: str  # what stderr must say (the fix, or what is wrong)
    slow: bool = False
    timeout: float = 120


def serve_args(s: Setup, *settings: str, model: Path | None = None) -> list[str]:
    sets = [a for kv in settings for a in ("--set", kv)]
    return [*sets, "serve", "--model", str(model or s.tiny_model), "--port", str(free_port())]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- row set-ups ---------------------------------------------------------------------------------------------


def serve_kv_cache(s: Setup) -> list[str]:
    s.env["VLLM_CPU_KVCACHE_SPACE"] = ""  # exported values win over the setting; let the setting speak
    return serve_args(s, "engine.kv_cache_gib=1000000")


def serve_bad_arch(s: Setup) -> list[str]:
    m = s.model_copy("unknown-arch")
    cfg = json.loads((m / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    (m / "config.json").write_text(json.dumps(cfg))
    return serve_args(s, model=m)


def drift_out_missing_folder(s: Setup) -> list[str]:
    return ["drift", "report", "--no-embeddings", "--out", str(s.tmp / "no" / "such" / "folder" / "drift.html")]


def bad_general(s: Setup) -> Path:
    f = s.tmp / "general.jsonl"
    f.write_text('{"text": "fine"}\n{"text": "broken\n')
    return f


def eval_bad_general(s: Setup) -> list[str]:
    return ["eval", str(s.tiny_model), "--backend", "transformers", "--general", str(bad_general(s))]


def loop_bad_general(s: Setup) -> list[str]:
    return ["loop", "--no-canary", "--general", str(bad_general(s))]


def version_on_deleted_base(s: Setup) -> str:
    base = s.model_copy("moved-base")
    s.register("v-moved", base, s.adapter("v-moved"), dataset_id="some-dataset")
    shutil.rmtree(base)
    return "v-moved"


def train_missing_base(s: Setup) -> list[str]:
    return ["train", f"base={s.tmp / 'moved' / 'model'}", "dataset=anything", "name=v-new", "max_steps=1"]


def train_base_without_tokenizer(s: Setup) -> list[str]:
    m = s.model_copy("no-tokenizer", drop=("tokenizer*",))
    return ["train", f"base={m}", "dataset=anything", "name=v-new", "max_steps=1"]


def train_base_without_weights(s: Setup) -> list[str]:
    m = s.model_copy("no-weights", drop=("*.safetensors",))
    return ["train", f"base={m}", "dataset=anything", "name=v-new", "max_steps=1"]


def eval_deleted_base(s: Setup) -> list[str]:
    return ["eval", version_on_deleted_base(s), "--backend", "transformers", "--dataset", "anything"]


def merge_deleted_base(s: Setup) -> list[str]:
    return ["merge", version_on_deleted_base(s)]


def gate_deleted_base(s: Setup) -> list[str]:
    return ["deploy", "gate", version_on_deleted_base(s), "--dataset", "anything"]


def merge_bad_adapter_config(s: Setup) -> list[str]:
    s.register("v-bad-config", s.tiny_model, s.adapter("v-bad-config", config='{"peft_type": "LORA", "r": 8,'))
    return ["merge", "v-bad-config"]


def train_resume_corrupt_run_json(s: Setup) -> list[str]:
    run = s.home / "runs" / "v-resume"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "run.json").write_text('{"run_id": ')
    s.keep(run / "run.json")
    return ["train", f"base={s.tiny_model}", "dataset=anything", "name=v-resume", "max_steps=1"]


def export_s3_unreachable(s: Setup) -> list[str]:
    from tuneloop.db import utcnow

    with s.db.connect() as con:  # one request in a closed window, so the export has something to copy
        con.execute(
            "INSERT INTO requests (id, received_at, route, status) VALUES ('r1', ?, 'chat.completions', 200)",
            [utcnow() - timedelta(days=2)],
        )
    closed = free_port()
    s.env.update(
        AWS_EC2_METADATA_DISABLED="true",
        AWS_ACCESS_KEY_ID="",
        AWS_SECRET_ACCESS_KEY="",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{closed}",
        HTTP_PROXY=f"http://127.0.0.1:{closed}",
        HTTPS_PROXY=f"http://127.0.0.1:{closed}",
    )
    return ["export", "logs", "--out", "s3://tuneloop-no-such-bucket/logs", "--replica", "r0"]


def db_is_a_text_file(s: Setup) -> list[str]:
    f = s.tmp / "notes.txt"
    f.write_text("not a database\n")
    s.keep(f)
    return ["--set", f"paths.db={f}", "models", "list"]


def nproc_above_gpus(s: Setup) -> list[str]:
    shim = s.tmp / "fake-gpu"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(ONE_FAKE_GPU)
    s.env["PYTHONPATH"] = str(shim)
    return ["train", "--nproc", "2", f"base={s.tiny_model}", "dataset=anything", "name=v-ddp", "max_steps=1"]


def nproc_zero(s: Setup) -> list[str]:
    return ["train", "--nproc", "0", f"base={s.tiny_model}", "dataset=anything", "name=v-ddp", "max_steps=1"]


def merge_prompt_tuning(s: Setup) -> list[str]:
    cfg = json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8})
    s.register("v-pt", s.tiny_model, s.adapter("v-pt", config=cfg))
    return ["merge", "v-pt"]


def without_ml_stack(*args: str) -> Callable[[Setup], list[str]]:
    def setup(s: Setup) -> list[str]:
        shim = s.tmp / "no-ml"
        shim.mkdir()
        (shim / "sitecustomize.py").write_text(NO_ML)
        s.env["PYTHONPATH"] = str(shim)
        return [a.format(model=s.tiny_model) for a in args]

    return setup


def misspelt_env_key(s: Setup) -> list[str]:
    s.env["TUNELOOP_ENGINE__MAX_MODLE_LEN"] = "4096"
    return ["config", "show"]


def unpulled_hub_id(*args: str) -> Callable[[Setup], list[str]]:
    """A hub id that is not in the (empty) model cache, with HF_HUB_OFFLINE set: no command may try to download."""

    def setup(s: Setup) -> list[str]:
        s.env["TUNELOOP_MODEL_CACHE"] = str(s.tmp / "model-cache")
        s.env["HF_HUB_OFFLINE"] = "1"
        return [a.format(port=free_port()) for a in args]

    return setup


HUB_HINT = "HF_HUB_OFFLINE is set, so it cannot be downloaded: run `tuneloop models pull nosuch/model`"

CASES = [
    Case("serve-max-model-len", 1, lambda s: serve_args(s, "engine.max_model_len=1000000"), "max_model_len=2048"),
    Case("serve-lora-rank", 1, lambda s: serve_args(s, "engine.max_lora_rank=12"), "max_lora_rank=16"),
    Case("serve-kv-cache", 1, serve_kv_cache, "engine.kv_cache_gib"),
    Case("serve-architecture", 1, serve_bad_arch, "not supported by the installed vLLM"),
    Case(
        "serve-engine-refuses",
        1,
        lambda s: serve_args(s, "engine.dtype=float77"),
        "the vLLM engine could not start",
        slow=True,
        timeout=300,
    ),
    Case("drift-out-missing-folder", 2, drift_out_missing_folder, "mkdir -p"),
    Case("eval-general-jsonl", 3, eval_bad_general, "line 2: not valid JSON"),
    Case("loop-general-jsonl", 3, loop_bad_general, "line 2: not valid JSON"),
    Case("train-base-moved", 4, train_missing_base, "does not exist (moved or deleted?)"),
    Case("train-base-no-tokenizer", 4, train_base_without_tokenizer, "has no tokenizer"),
    Case("train-base-no-weights", 4, train_base_without_weights, "has no weights"),
    Case("eval-base-deleted", 4, eval_deleted_base, "does not exist (moved or deleted?)"),
    Case("merge-base-deleted", 4, merge_deleted_base, "does not exist (moved or deleted?)"),
    Case("gate-base-deleted", 4, gate_deleted_base, "does not exist (moved or deleted?)"),
    Case("merge-adapter-config", 5, merge_bad_adapter_config, "adapter_config.json is malformed"),
    Case("train-resume-run-json", 6, train_resume_corrupt_run_json, "--fresh"),
    Case("export-s3-unreachable", 7, export_s3_unreachable, "httpfs"),
    Case("db-not-a-database", 8, db_is_a_text_file, "not a valid DuckDB database file"),
    Case("nproc-above-gpus", 9, nproc_above_gpus, "--nproc 1 or fewer"),
    Case("nproc-zero", 9, nproc_zero, "--nproc must be >= 1"),
    Case("no-ml-serve", 10, without_ml_stack("serve", "--model", "{model}"), "pip install"),
    Case("no-ml-train", 10, without_ml_stack("train", "base={model}", "dataset=x", "max_steps=1"), "pip install"),
    Case(
        "no-ml-train-nproc", 10, without_ml_stack("train", "--nproc", "2", "base={model}", "dataset=x"), "pip install"
    ),
    Case("no-ml-merge", 10, without_ml_stack("merge", "some-version"), "pip install"),
    Case("no-ml-eval", 10, without_ml_stack("eval", "{model}"), "pip install"),
    Case("no-ml-gate", 10, without_ml_stack("deploy", "gate", "some-version"), "pip install"),
    Case("no-ml-loop", 10, without_ml_stack("loop", "--no-canary"), "pip install"),
    Case("env-key-misspelt", 11, misspelt_env_key, "TUNELOOP_ENGINE__MAX_MODEL_LEN"),
    Case("hub-offline-pull", 12, unpulled_hub_id("models", "pull", "nosuch/model"), HUB_HINT),
    Case("hub-offline-serve", 12, unpulled_hub_id("serve", "--model", "nosuch/model", "--port", "{port}"), HUB_HINT),
    Case("hub-offline-eval", 12, unpulled_hub_id("eval", "nosuch/model", "--dataset", "anything"), HUB_HINT),
    Case(
        "hub-offline-train",
        12,
        unpulled_hub_id("train", "base=nosuch/model", "dataset=anything", "name=v-new", "max_steps=1"),
        HUB_HINT,
    ),
    Case("merge-prompt-tuning", 13, merge_prompt_tuning, "tuneloop eval"),
]


def counts(db) -> dict[str, int]:
    with db.connect(transaction=False) as con:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.id, marks=[pytest.mark.engine] if c.slow else []) for c in CASES]
)
def test_bad_input_is_a_clean_error_and_writes_nothing(case: Case, cli: CLI, home: Path, tmp_path: Path, tiny_model):
    s = Setup(home, tmp_path / "case", tiny_model)
    s.tmp.mkdir()
    args = case.setup(s)
    before = counts(s.db)
    files = sorted(p for p in home.rglob("*") if p.is_file() and not p.name.startswith("tuneloop.duckdb"))
    env = dict(cli.env)
    for k, v in s.env.items():
        if v == "":
            env.pop(k, None)
        else:
            env[k] = v

    r = CLI(cli.cwd, env)(*args, check=False, timeout=case.timeout)

    where = f"tuneloop {shlex.join(map(str, args))}\nSTDOUT:\n{r.stdout[-2000:]}\nSTDERR:\n{r.stderr[-4000:]}"
    assert r.returncode == 2, where
    assert "Traceback" not in r.stderr, where
    lines = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, where
    assert case.hint in r.stderr, where
    if case.item == 10:
        assert "needs the ML stack" in r.stderr, where
    # nothing half-written: the database opens and holds what it held, no new files in the home, inputs unchanged
    assert counts(s.db) == before, where
    after = sorted(p for p in home.rglob("*") if p.is_file() and not p.name.startswith("tuneloop.duckdb"))
    assert [p for p in after if p not in files and "cache" not in p.parts] == [], where
    for p, content in s.files.items():
        assert p.read_bytes() == content, p


def test_every_item_of_the_issue_has_a_row():
    assert {c.item for c in CASES} == set(range(1, 14))


def test_tuneloop_variables_that_are_not_settings_stay_valid(cli: CLI):
    """TUNELOOP_HOME, _CONFIG, _MODEL_CACHE and the other non-settings names never trip the unknown-key check."""
    from tuneloop.settings import OTHER_ENV

    env = dict(cli.env, TUNELOOP_SERVER__PORT="9001")
    env.update({k: env.get(k, "x") for k in OTHER_ENV if k not in ("TUNELOOP_CONFIG", "TUNELOOP_ACCELERATE_CONFIG")})
    r = CLI(cli.cwd, env)("config", "show")
    assert "port: 9001" in r.stdout


def test_loop_help_examples_parse():
    from tuneloop.cli import build_parser

    parser = build_parser()
    loop = parser._subparsers._group_actions[0].choices["loop"]  # type: ignore[union-attr]
    examples = [
        ln.split("#")[0].strip() for ln in (loop.epilog or "").splitlines() if ln.strip().startswith("tuneloop ")
    ]
    assert len(examples) >= 5
    for ex in examples:
        argv = shlex.split(ex)[1:]
        args = parser.parse_args(argv)  # SystemExit (exit 2) if an example does not parse
        assert args.command == "loop", ex


def test_serve_refusals_come_before_torch_and_vllm_imports(cli: CLI, home: Path, tiny_model):
    """A busy port or a bad plan is refused before torch, vLLM or uvicorn is imported (fast refusals)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        busy = ["serve", "--model", str(tiny_model), "--port", str(port)]
        missing = ["serve", "--model", str(home / "no-such-model")]
        for argv in (busy, missing):
            r, imported = run_with_importtime(cli, *argv)
            assert r.returncode == 2 and "error: " in r.stderr, r.stderr[-2000:]
            assert not imported & {"torch", "vllm", "uvicorn"}, textwrap.shorten(str(sorted(imported)), 300)
