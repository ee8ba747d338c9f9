"""Experiment tracking: `tuneloop train report_to=...` reports to transformers' trackers and records where.

Real CLI subprocesses, a real DuckDB file, real TRL training on the tiny model and real TensorBoard event files.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import time

import pytest
from conftest import VENV_BIN, copy_home

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


def test_report_to_tensorboard_and_mlflow_puts_the_same_loss_curve_in_both_and_records_the_mlflow_run(ws):
    from mlflow import MlflowClient
    from mlflow.entities import RunStatus
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tuneloop.registry import get_run

    r = ws["cli"](
        "train",
        f"base={ws['base']}",
        "dataset=chat",
        "name=mlflow-run",
        "max_steps=2",
        "logging_steps=1",
        "report_to=tensorboard,mlflow",
        "--quiet",
        "--json",
    )
    res = json.loads(r.stdout[r.stdout.index("{\n") :])
    run = get_run(ws["db"], res["run_id"])
    home = ws["home"].resolve()
    assert run.status == "succeeded" and run.tracking is not None
    mlflow_at = run.tracking["mlflow"]
    # MLflow 3 refuses its file store: the default is a SQLite file in the home
    assert mlflow_at["tracking_uri"] == f"sqlite:///{home / 'mlflow.db'}"
    assert (mlflow_at["experiment"], mlflow_at["run_name"]) == ("tuneloop", run.id)
    assert run.tracking["tensorboard"] == str(home / "runs" / "mlflow-run" / "tensorboard")
    recorded = json.loads((home / "runs" / "mlflow-run" / "loss.json").read_text())  # the run's own loss history
    assert [h["step"] for h in recorded] == [1, 2]

    client = MlflowClient(mlflow_at["tracking_uri"])
    ml_run = client.get_run(mlflow_at["run_id"])
    experiment = client.get_experiment(ml_run.info.experiment_id)
    assert experiment.name == "tuneloop" and ml_run.info.run_name == run.id
    assert experiment.artifact_location == (home / "mlruns").as_uri()  # the home, not the working directory
    assert ml_run.info.status == RunStatus.to_string(RunStatus.FINISHED)
    curve = sorted(client.get_metric_history(ml_run.info.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in curve] == [1, 2]
    assert all(abs(m.value - h["loss"]) <= 1e-6 for m, h in zip(curve, recorded, strict=True))
    assert abs(ml_run.data.metrics["loss"] - run.metrics["final_loss"]) <= 1e-6  # the latest logged value
    assert abs(ml_run.data.metrics["eval_loss"] - run.metrics["eval_loss"]) <= 1e-6  # evaluated after training
    assert len(client.search_runs([experiment.experiment_id])) == 1  # the evaluation started no second run

    acc = EventAccumulator(run.tracking["tensorboard"], size_guidance={"scalars": 0})
    acc.Reload()
    series = acc.Scalars("train/loss")
    assert [e.step for e in series] == [m.step for m in curve]
    assert all(abs(e.value - m.value) <= 1e-6 for e, m in zip(series, curve, strict=True))
    assert not (ws["root"] / "mlruns").exists() and not (ws["root"] / "mlflow.db").exists()  # the CLI's cwd


def test_a_run_stopped_by_sigterm_ends_its_mlflow_run_killed_with_the_steps_it_logged(ws):
    from mlflow import MlflowClient
    from mlflow.entities import RunStatus

    from tuneloop.registry import get_run

    out = ws["root"] / "mlflow-stopped"
    args = [str(VENV_BIN / "tuneloop"), "train", f"base={ws['base']}", "dataset=chat", "name=mlflow-stopped"]
    args += [f"output_dir={out}", "max_steps=400", "logging_steps=1", "save_steps=1", "report_to=mlflow", "--quiet"]
    p = subprocess.Popen(args, cwd=ws["root"], env=ws["cli"].env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list(out.glob("checkpoint-*")) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.1)  # a checkpoint on disk: training (and its MLflow run) is under way
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err.decode()[-3000:]
    run = get_run(ws["db"], json.loads((out / "run.json").read_text())["run_id"])
    assert run.status == "failed" and run.tracking is not None
    client = MlflowClient(run.tracking["mlflow"]["tracking_uri"])
    ml_run = client.get_run(run.tracking["mlflow"]["run_id"])
    assert ml_run.info.run_name == run.id
    assert ml_run.info.status == RunStatus.to_string(RunStatus.KILLED)
    steps = [m.step for m in client.get_metric_history(ml_run.info.run_id, "loss")]
    assert steps and steps == list(range(1, len(steps) + 1))


def test_a_run_without_report_to_records_no_tracking(ws):
    from tuneloop.registry import get_run, get_version

    v = get_version(ws["db"], "chat-v1")  # trained by conftest without report_to
    assert v.run_id is not None and get_run(ws["db"], v.run_id).tracking is None


@pytest.mark.parametrize("tracker", ["wandb", "trackio"])  # not in the lock (mlflow and tensorboard are)
def test_a_tracker_whose_package_is_missing_exits_2_naming_it_before_training(ws, tracker):
    assert importlib.util.find_spec(tracker) is None, f"{tracker} is installed: pick a tracker the lock lacks"
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
