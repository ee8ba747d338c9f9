"""`tuneloop train --nproc 2`: data-parallel training on CPU (gloo) through torchrun, run as a user runs it.

Two processes with batch 2 each see the same data as one process with batch 4; the adapter is valid, the loss
curve tracks the single-process one, and only one run and one version are recorded (rank 0 writes, alone).
"""

from __future__ import annotations

import json
import random

import pytest

pytestmark = [pytest.mark.train, pytest.mark.slow]

TOPICS = ["weather", "music", "cooking", "travel", "sports", "books"]


def chats(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        t = rng.choice(TOPICS)
        rows.append(
            {
                "id": f"r{seed}-{i}",
                "request_id": None,
                "origin": "file",
                "messages": [
                    {"role": "user", "content": f"tell me about {t} number {i}"},
                    {"role": "assistant", "content": f"{t} is nice and {t} is fun, item {i % 7}"},
                ],
            }
        )
    return rows


@pytest.fixture
def dataset(db, home):
    from tuneloop.dataset_store import save_dataset

    rec = save_dataset(
        db,
        home,
        "dist",
        {"train": chats(48, 1), "validation": chats(8, 2), "test": chats(8, 3)},
        "sft",
        card={},
        source={"test": True},
    )
    return rec.id


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in json.loads((run_dir / "loss.json").read_text())]


def test_two_processes_train_like_one_and_only_rank_zero_records(cli, home, db, tiny_model, dataset):
    common = [
        f"base={tiny_model}",
        f"dataset={dataset}",
        "max_steps=6",
        "learning_rate=3e-3",
        "save_steps=0",
        "lr_scheduler_type=constant",
        "padding_free=false",
        "max_seq_length=64",
        "seed=3",
    ]
    cli("train", *common, "name=single", "batch_size=4", "--quiet")
    r = cli("train", "--nproc", "2", *common, "name=ddp", "batch_size=2")
    assert "registered ddp (adapter)" in r.stdout
    assert r.stdout.count("registered") == 1, r.stdout  # one process reports

    runs = db.query("SELECT id, status, config->>'name' AS name FROM runs ORDER BY started_at")
    assert [(x["name"], x["status"]) for x in runs] == [("single", "succeeded"), ("ddp", "succeeded")]
    versions = db.query("SELECT name, kind, run_id FROM model_versions ORDER BY created_at")
    assert [(v["name"], v["kind"]) for v in versions] == [("single", "adapter"), ("ddp", "adapter")]
    assert versions[1]["run_id"] == runs[1]["id"]

    run_dir = home / "runs" / "ddp"
    model = run_dir / "model"
    assert (model / "adapter_config.json").is_file() and (model / "adapter_model.safetensors").is_file()
    assert not list((home / "tmp").glob("tuneloop-dist-*")), "scratch folders of ranks > 0 are removed"

    # the adapter loads on its base and changes the output
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    with torch.no_grad():
        before = base(ids).logits.clone()
        after = PeftModel.from_pretrained(base, str(model))(ids).logits
    assert torch.isfinite(after).all() and not torch.allclose(before, after)

    single, ddp = losses(home / "runs" / "single"), losses(run_dir)
    assert len(single) == len(ddp) == 6
    assert ddp[-1] < ddp[0] and single[-1] < single[0]
    # same data, same total batch: the curves agree step by step within 10% (only batch composition differs)
    for s, d in zip(single, ddp):
        assert abs(s - d) <= 0.1 * s, (single, ddp)


def test_distributed_launch_rejects_bad_input_before_starting_processes(cli, home, db, tiny_model, dataset):
    from tuneloop.registry import ModelVersion, register_version

    register_version(
        db,
        ModelVersion(
            name="taken", kind="adapter", base_model=str(tiny_model), path=str(tiny_model), content_hash="0" * 64
        ),
    )
    r = cli(
        "train", "--nproc", "2", f"base={tiny_model}", f"dataset={dataset}", "max_steps=1", "name=taken", check=False
    )
    assert r.returncode == 2 and "already exists" in r.stderr and "launching" not in r.stderr
    r = cli("train", "--nproc", "2", f"base={tiny_model}", "max_steps=1", check=False)
    assert r.returncode == 2 and "no dataset" in r.stderr
    assert [x["name"] for x in db.query("SELECT name FROM model_versions")] == ["taken"]


def test_write_config_then_torchrun_the_worker_directly_as_on_each_node(cli, home, db, tiny_model, dataset, tmp_path):
    """The multi-node recipe on one machine: `--write-config FILE`, then torchrun `-m tuneloop.trainer.distributed`.

    The worker gets everything from the file (settings with the home folder, the pinned version name); ranks > 0,
    started without `tuneloop train --nproc`, train on their own database snapshot and remove it afterwards.
    """
    import os
    import subprocess
    import sys

    import yaml

    conf = tmp_path / "conf" / "train_config.yaml"
    r = cli(
        "train",
        "--nproc",
        "2",
        f"base={tiny_model}",
        f"dataset={dataset}",
        "max_steps=2",
        "batch_size=2",
        "save_steps=0",
        "max_seq_length=64",
        "name=multi",
        "--write-config",
        conf,
    )
    assert r.stdout.strip() == str(conf) and "-m tuneloop.trainer.distributed --config" in r.stderr
    doc = yaml.safe_load(conf.read_text())
    assert doc["settings"]["paths"]["home"] == str(home.resolve())
    assert doc["settings"]["paths"]["db"] == str(home.resolve() / "tuneloop.duckdb")
    assert doc["train"]["name"] == "multi" and doc["train"]["resume"] is False
    assert db.query("SELECT count(*) AS n FROM runs") == [{"n": 0}], "writing the config trains nothing"

    # the worker needs neither the CLI nor TUNELOOP_HOME: only the file
    env = {k: v for k, v in os.environ.items() if k != "TUNELOOP_HOME"}
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, tuneloop.trainer.distributed; "
            "print(sorted(m for m in ('tuneloop.cli', 'tuneloop.trainer.cli_train') if m in sys.modules))",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "[]"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "tuneloop.trainer.distributed",
            "--config",
            str(conf),
        ],
        cwd=tmp_path,
        env=dict(env, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("registered multi (adapter)") == 1, run.stdout
    runs = db.query("SELECT status, config->>'name' AS name FROM runs")
    assert runs == [{"status": "succeeded", "name": "multi"}]
    assert [v["name"] for v in db.query("SELECT name FROM model_versions")] == ["multi"]
    assert (home / "runs" / "multi" / "model" / "adapter_model.safetensors").is_file()
    assert not list((home / "tmp").glob("tuneloop-dist-*")), "ranks > 0 remove their own snapshot and scratch folder"

    # the name is pinned in the file: running it again is refused before training
    again = cli("train", f"base={tiny_model}", f"dataset={dataset}", "name=multi", "--write-config", conf, check=False)
    assert again.returncode == 2 and "already exists" in again.stderr
