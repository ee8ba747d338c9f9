"""Experiment tracking: `tuneloop train report_to=...` reports to transformers' trackers and records where.

Real CLI subprocesses, a real DuckDB file, real TRL training on the tiny model and real TensorBoard event files.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import copy_home

pytestmark = [pytest.mark.train, pytest.mark.slow]


@pytest.fixture(scope="module")
def ws(tiny_model, chat_seed, tmp_path_factory):
    """A copy of the session's prepared home: SFT dataset 'chat' and the adapter 'chat-v1' (conftest)."""
    root = tmp_path_factory.mktemp("tracking")
    home, cli = copy_home(chat_seed, root)
    from tuneloop.db import open_database

    return {"root": root, "home": home, "cli": cli, "db": open_database(home / "tuneloop.duckdb"), "base": tiny_model}


def _run_count(ws) -> int:
    return int(ws["db"].query("SELECT count(*) AS n FROM runs")[0]["n"])


def test_report_to_tensorboard_writes_the_run_losses_as_train_loss_and_records_the_folder(ws):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tuneloop.registry import get_run

    r = ws["cli"](
        "train",
        f"base={ws['base']}",
        "dataset=chat",
        "name=tb-run",
        "max_steps=2",
        "logging_steps=1",
        "report_to=tensorboard",
        "--quiet",
        "--json",
    )
    res = json.loads(r.stdout[r.stdout.index("{\n") :])
    run = get_run(ws["db"], res["run_id"])
    tb_dir = ws["home"] / "runs" / "tb-run" / "tensorboard"
    assert run.status == "succeeded"
    assert run.tracking == {"tensorboard": str(tb_dir.resolve())}
    assert list(tb_dir.glob("events.out.tfevents.*"))

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"]
    series = acc.Scalars("train/loss")
    recorded = json.loads((tb_dir.parent / "loss.json").read_text())  # the run's own loss history
    assert [e.step for e in series] == [e["step"] for e in recorded] == [1, 2]
    assert all(abs(e.value - h["loss"]) <= 1e-6 for e, h in zip(series, recorded, strict=True))
    assert abs(series[-1].value - run.metrics["final_loss"]) <= 1e-6


def test_a_run_without_report_to_records_no_tracking(ws):
    from tuneloop.registry import get_run, get_version

    v = get_version(ws["db"], "chat-v1")  # trained by conftest without report_to
    assert v.run_id is not None and get_run(ws["db"], v.run_id).tracking is None


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_tracker_whose_package_is_missing_exits_2_naming_it_before_training(ws, tracker):
    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here")
    before = _run_count(ws)
    r = ws["cli"]("train", f"base={ws['base']}", "dataset=chat", "max_steps=1", f"report_to={tracker}", check=False)
    assert r.returncode == 2, r.stderr
    assert "error:" in r.stderr and f"pip install {tracker}" in r.stderr and "Traceback" not in r.stderr
    assert _run_count(ws) == before


def test_an_unknown_tracker_exits_2_listing_the_valid_ones(ws):
    before = _run_count(ws)
    r = ws["cli"]("train", f"base={ws['base']}", "dataset=chat", "report_to=tensorboard,neptune", check=False)
    assert r.returncode == 2
    assert "unknown tracker 'neptune'" in r.stderr
    assert all(t in r.stderr for t in ("tensorboard", "mlflow", "trackio", "wandb"))
    assert _run_count(ws) == before


def test_report_to_override_parses_a_comma_list_and_drops_none_and_duplicates():
    from tuneloop.config import build
    from tuneloop.trainer.config import TrainConfig

    cfg = build(TrainConfig, {}, ["dataset=chat", "report_to=tensorboard,none,tensorboard"]).validate()
    assert cfg.report_to == ["tensorboard"]
    assert build(TrainConfig, {}, ["dataset=chat"]).validate().report_to == []
