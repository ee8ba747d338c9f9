"""`tuneloop train` as a user runs it: every method trains on the tiny model and registers a version.

Real CLI subprocesses, a real DuckDB file, real TRL/PEFT training (2 steps each).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import VENV_BIN, workspace

pytestmark = [pytest.mark.train, pytest.mark.slow]


@pytest.fixture(scope="module")
def ws(tiny_model, chat_seed, tmp_path_factory):
    """A copy of the session's prepared home: SFT dataset 'chat' and preference dataset 'pref' (conftest)."""
    return workspace(tiny_model, chat_seed, tmp_path_factory.mktemp("train"))


def test_help_lists_every_config_key_with_its_help(ws):
    from tuneloop.config import field_help
    from tuneloop.trainer.config import TrainConfig

    out = ws["cli"]("train", "--help").stdout
    for key, _text in field_help(TrainConfig).items():
        assert key in out
    assert "padding_free" in out and "lora.r" in out and "--nproc" in out


def test_unknown_key_is_an_error_listing_the_valid_keys(ws):
    r = ws["cli"]("train", "dataset=chat", "max_step=2", check=False)
    assert r.returncode == 2
    assert "error: unknown config key(s): max_step" in r.stderr
    assert "max_steps" in r.stderr and "learning_rate" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["dataset=nope", "max_steps=1"], "cannot load dataset 'nope'"),
        (["dataset=chat", "method=dpo", "max_steps=1"], "needs a preference dataset"),
        (["dataset=chat", "batch_size=0"], "batch_size must be >= 1"),
        (["dataset=chat", "lora.r=many"], "lora.r: expected an integer"),
        (["dataset=chat", "lora.targets=[nope_proj]", "max_steps=1"], "Target modules {'nope_proj'} not found"),
    ],
)
def test_bad_input_exits_2_and_records_nothing(ws, args, message):
    before = (
        ws["db"].query("SELECT count(*) AS n FROM runs")[0]["n"] if (ws["home"] / "tuneloop.duckdb").exists() else 0
    )
    r = ws["cli"]("train", f"base={ws['base']}", *args, check=False)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert ws["db"].query("SELECT count(*) AS n FROM runs")[0]["n"] == before


@pytest.mark.parametrize(
    "method, dataset, kind",
    [
        ("lora", "chat", "adapter"),
        ("qlora", "chat", "adapter"),
        ("full", "chat", "merged"),
        ("prompt_tuning", "chat", "adapter"),
        ("dpo", "pref", "adapter"),
    ],
)
def test_each_method_trains_two_steps_and_registers_a_version(ws, method, dataset, kind):
    from tuneloop.ids import hash_path
    from tuneloop.registry import get_dataset, get_run, get_version

    name = f"v-{method}"
    r = ws["cli"](
        "train",
        f"base={ws['base']}",
        f"dataset={dataset}",
        f"method={method}",
        "max_steps=2",
        f"name={name}",
        "--quiet",
        "--json",
    )
    res = json.loads(r.stdout[r.stdout.index("{\n") :])
    assert res["version"] == name and res["kind"] == kind and res["metrics"]["steps"] == 2

    v = get_version(ws["db"], name)
    run = get_run(ws["db"], res["run_id"])
    assert v.kind == kind and v.run_id == run.id and v.stage == "candidate"
    assert v.dataset_id == get_dataset(ws["db"], dataset).id == run.dataset_id
    assert v.base_model == ws["base"] == run.base_model
    assert v.content_hash == hash_path(v.path) == run.artifact_hash
    assert run.status == "succeeded" and run.method == method and run.duration_s > 0
    assert run.config["method"] == method and run.config["max_steps"] == 2
    assert (Path(v.path) / ("config.json" if kind == "merged" else "adapter_config.json")).is_file()
    assert (Path(v.path) / "tokenizer_config.json").is_file()
    losses = json.loads((Path(v.path).parent / "loss.json").read_text())
    assert [e["step"] for e in losses] == [1, 2] and all(e["loss"] > 0 for e in losses)
    if method != "dpo":
        assert run.metrics["num_tokens"] > 0 and run.metrics["tokens_per_s"] > 0


def test_sigterm_leaves_a_checkpoint_and_the_rerun_resumes_the_same_run(ws):
    """Pre-emption: SIGTERM stops after the current step with a checkpoint; the same command resumes it."""
    out = ws["root"] / "interrupted"
    args = [
        str(VENV_BIN / "tuneloop"),
        "train",
        f"base={ws['base']}",
        "dataset=chat",
        "name=resumed",
        f"output_dir={out}",
        "max_steps=400",
        "save_steps=1",
        "save_total_limit=1",
        "--quiet",
    ]
    p = subprocess.Popen(
        args, cwd=ws["root"], env=ws["cli"].env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while not list(out.glob("checkpoint-*")) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err
    assert "training interrupted: stopped at step" in err
    ckpt = sorted(out.glob("checkpoint-*"))
    assert len(ckpt) == 1
    step = int(ckpt[0].name.split("-")[1])
    assert 1 <= step < 400
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    from tuneloop.registry import RegistryError, get_run, get_version

    assert get_run(ws["db"], run_id).status == "failed"
    with pytest.raises(RegistryError):
        get_version(ws["db"], "resumed")

    r = ws["cli"](*args[1:-3], f"max_steps={step + 1}", "--quiet")
    assert f"resuming run {run_id} from {ckpt[0]}" in r.stdout
    v = get_version(ws["db"], "resumed")
    run = get_run(ws["db"], run_id)
    assert v.run_id == run_id and run.status == "succeeded" and run.metrics["steps"] == step + 1
    losses = json.loads((out / "loss.json").read_text())
    assert [e["step"] for e in losses] == list(range(1, step + 2))  # history spans both processes


def _adapter_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "adapter_model.safetensors"))


def test_init_adapter_continues_an_existing_adapter_from_its_weights_and_shape(ws):
    """Continued training starts from the parent's LoRA weights (not a fresh init) and keeps its rank/targets."""
    import torch

    from tuneloop.registry import get_version

    cli = ws["cli"]
    common = [f"base={ws['base']}", "dataset=chat", "max_steps=2"]
    # the parent: chat-v1 of the session's home (LoRA r=8 on q/k/v/o, 2 steps at lr 1e-2; conftest.chat_seed)
    # a learning rate of 1e-12 (0 is refused): the saved adapter is the parent's, shape included, despite lora.r=16
    cli("train", *common, "name=child-lr0", "init_adapter=chat-v1", "learning_rate=1e-12", "lora.r=16", "--quiet")
    parent = _adapter_tensors(get_version(ws["db"], "chat-v1").path)
    child = _adapter_tensors(get_version(ws["db"], "child-lr0").path)
    assert parent.keys() == child.keys() and any("lora_B" in k for k in parent)
    assert all(torch.allclose(parent[k], child[k], atol=1e-8) for k in parent)
    assert any(parent[k].abs().max() > 1e-4 for k in parent if "lora_B" in k)  # the parent learned something
    assert all(v.shape[0] == 8 for k, v in child.items() if "lora_A" in k)
    # and a fresh adapter (no init_adapter) starts with lora_B = 0: after the same steps it is still ~0
    cli("train", *common, "name=fresh-lr0", "learning_rate=1e-12", "--quiet")
    fresh = _adapter_tensors(get_version(ws["db"], "fresh-lr0").path)
    assert all(v.abs().max() < 1e-8 for k, v in fresh.items() if "lora_B" in k)


@pytest.mark.parametrize(
    "args, message",
    [
        (["init_adapter=no/such/folder"], "no/such/folder is not a LoRA adapter folder"),
        (["init_adapter=chat-v1", "method=full"], "method=full cannot start from one"),
    ],
)
def test_a_bad_init_adapter_exits_2_naming_it(ws, args, message):
    r = ws["cli"]("train", f"base={ws['base']}", "dataset=chat", "max_steps=1", *args, check=False)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
