"""`tuneloop tune` as a user runs it: an Optuna study of real training runs on the tiny model.

Real CLI subprocesses, a real DuckDB file, a real sqlite Optuna study, real TRL/PEFT training (1-3 steps a trial).
"""

from __future__ import annotations

import json
import re
import signal
import statistics
import subprocess
from pathlib import Path

import pytest
from conftest import VENV_BIN, workspace

pytestmark = [pytest.mark.train, pytest.mark.slow]


@pytest.fixture(scope="module")
def ws(tiny_model, chat_seed, tmp_path_factory):
    """A copy of the session's prepared home (SFT dataset 'chat', with a validation split)."""
    return workspace(tiny_model, chat_seed, tmp_path_factory.mktemp("tune"))


def _json(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{\n") :])


def _space(ws, name: str, text: str) -> Path:
    p = ws["root"] / f"{name}.yaml"
    p.write_text(text)
    return p


def test_three_trials_register_the_best_with_lineage_and_a_rerun_resumes_with_one_more(ws):
    import optuna

    from tuneloop.registry import find_version, get_run, get_version

    space = _space(ws, "small", "learning_rate: {low: 1e-4, high: 1e-2, log: true}\nlora:\n  r: [4, 8]\n")
    args = ["tune", "--space", space, "--study", "s1", f"base={ws['base']}", "dataset=chat", "max_steps=2"]
    r = ws["cli"](*args, "eval_steps=1", "--trials", "3", "--json")
    res = _json(r.stdout)
    trials = res["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2] and res["ran"] == 3
    # three startup trials are never pruned (MedianPruner n_startup_trials=3): all complete with a loss
    assert all(t["state"] == "complete" and t["value"] > 0 for t in trials), trials
    assert all(1e-4 <= t["params"]["learning_rate"] <= 1e-2 and t["params"]["lora.r"] in (4, 8) for t in trials)
    # one progress line per trial on stderr
    assert len(re.findall(r"^trial \d: learning_rate=\S+ lora\.r=\d -> eval_loss \d", r.stderr, re.M)) == 3

    db_file = ws["home"] / "tune" / "s1.db"
    assert db_file.is_file() and res["storage"] == str(db_file)
    study = optuna.load_study(study_name="s1", storage=f"sqlite:///{db_file}")
    assert len(study.trials) == 3 and study.best_trial.number == res["best"]["number"]
    assert study.best_value == min(t["value"] for t in trials)

    plots = ws["home"] / "tune" / "s1"
    for f in ("optimization_history.html", "param_importances.html"):
        assert (plots / f).stat().st_size > 1000 and str(plots / f) in res["plots"]

    # every trial is a real run, recorded and not registered; its objective is the run's eval_loss
    for t in trials:
        run = get_run(ws["db"], t["run_id"])
        assert run.status == "succeeded" and run.metrics["steps"] == 2
        assert run.metrics["eval_loss"] == pytest.approx(t["value"])
        assert run.config["tune"] == {"study": "s1", "trial": t["number"], "params": t["params"]}
        assert run.config["learning_rate"] == pytest.approx(t["params"]["learning_rate"])
        assert find_version(ws["db"], f"s1-trial-{t['number']}") is None

    best = res["best"]
    v = get_version(ws["db"], "s1-best")
    assert res["version"] == "s1-best" and v.kind == "adapter"
    assert v.run_id == best["run_id"] and v.path == get_run(ws["db"], best["run_id"]).output_path
    lineage = v.config["tune"]
    assert lineage["study"] == "s1" and lineage["trial"] == best["number"] and lineage["objective"] == "eval_loss"
    assert lineage["value"] == pytest.approx(best["value"]) and lineage["params"] == best["params"]
    assert [x["run_id"] for x in lineage["trial_runs"]] == [t["run_id"] for t in trials]

    # the same study again with --trials 4: exactly one more trial (the three count), shown in the table
    r2 = ws["cli"](*args, "--trials", "4")
    assert len(re.findall(r"^trial \d:", r2.stderr, re.M)) == 1 and "trial 3:" in r2.stderr
    rows = [line.split() for line in r2.stdout.splitlines() if re.match(r"^\d+\s+(complete|pruned|fail)", line)]
    assert [row[0] for row in rows] == ["0", "1", "2", "3"], r2.stdout
    assert "study s1 (4 trials, 1 run now)" in r2.stdout
    assert len(optuna.load_study(study_name="s1", storage=f"sqlite:///{db_file}").trials) == 4
    assert "best: trial" in r2.stdout and "plot: " in r2.stdout


def test_unknown_space_key_exits_2_naming_the_valid_keys_and_runs_nothing(ws):
    space = _space(ws, "bad", "lora.rank: [4, 8]\nlearning_rate: [0.001]\n")
    r = ws["cli"]("tune", "--space", space, "--study", "bad", f"base={ws['base']}", "dataset=chat", check=False)
    assert r.returncode == 2, r.stderr
    assert "error:" in r.stderr and "unknown search-space key(s): lora.rank" in r.stderr
    assert "lora.r" in r.stderr and "learning_rate" in r.stderr and "Traceback" not in r.stderr
    assert not (ws["home"] / "tune" / "bad.db").exists()


def test_a_trial_whose_eval_loss_is_above_the_median_of_earlier_trials_is_pruned(ws):
    """Two enqueued sane trials, then one with a destructive learning rate: pruned at its first evaluation."""
    import optuna

    from tuneloop.registry import get_run

    db_file = ws["home"] / "tune" / "p.db"
    db_file.parent.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name="p", storage=f"sqlite:///{db_file}", direction="minimize")
    for lr in (1e-3, 1e-3, 3.0):
        study.enqueue_trial({"learning_rate": lr})
    space = _space(ws, "lr", "learning_rate: [0.001, 3.0]\n")
    r = ws["cli"](
        "tune",
        "--space",
        space,
        "--study",
        "p",
        f"base={ws['base']}",
        "dataset=chat",
        "max_steps=3",
        "eval_steps=1",
        "--trials",
        "3",
        "--prune-startup",
        "2",
        "--json",
    )
    res = _json(r.stdout)
    states = [t["state"] for t in res["trials"]]
    assert states == ["complete", "complete", "pruned"], r.stderr
    assert "trial 2: learning_rate=3 -> pruned at step 1" in r.stderr

    study = optuna.load_study(study_name="p", storage=f"sqlite:///{db_file}")
    t0, t1, t2 = study.trials
    assert t2.intermediate_values[1] > statistics.median([t0.intermediate_values[1], t1.intermediate_values[1]])
    assert list(t2.intermediate_values) == [1]  # training stopped at the first evaluation
    run = get_run(ws["db"], t2.user_attrs["run_id"])
    assert run.status == "pruned" and run.metrics["steps"] == 1 and "pruned by MedianPruner at step 1" in run.error
    assert res["best"]["number"] in (0, 1)


def test_ctrl_c_stops_after_the_running_trial_with_the_study_saved(ws):
    import optuna

    from tuneloop.registry import get_run

    space = _space(ws, "stop", "learning_rate: {low: 1e-4, high: 1e-2, log: true}\n")
    args = ["tune", "--space", space, "--study", "stop", f"base={ws['base']}", "dataset=chat", "max_steps=40"]
    p = subprocess.Popen(
        [str(VENV_BIN / "tuneloop"), *map(str, args), "--trials", "20", "--json"],
        cwd=ws["root"],
        env=ws["cli"].env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stderr is not None
    err = []
    for line in p.stderr:  # the first trial's progress line: trial 1 is starting or running
        err.append(line)
        if line.startswith("trial 0:"):
            break
    p.send_signal(signal.SIGINT)
    out, rest = p.communicate(timeout=300)
    err.append(rest)
    assert p.returncode == 130, "".join(err)
    assert "stopping after the running trial(s), the study is saved" in rest
    res = _json(out)
    assert res["interrupted"] and 1 <= len(res["trials"]) < 20
    study = optuna.load_study(study_name="stop", storage=f"sqlite:///{ws['home'] / 'tune' / 'stop.db'}")
    # the running trial was finished, not cut: every trial is complete, with a succeeded run of 40 steps
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * len(res["trials"])
    assert all(get_run(ws["db"], t.user_attrs["run_id"]).metrics["steps"] == 40 for t in study.trials)
    assert res["version"] == "stop-best"


def test_space_file_forms_lists_ranges_and_nested_keys(tmp_path):
    from tuneloop.trainer.tune import load_space

    p = tmp_path / "s.yaml"
    p.write_text(
        "learning_rate: {low: 1e-5, high: 1e-3, log: true}\nlora: {r: [4, 8], dropout: {low: 0.0, high: 0.2}}\n"
        "batch_size: {low: 1, high: 4, step: 1}\nmethod: [lora]\n"
    )
    got = {x.key: x for x in load_space(p)}
    assert got["learning_rate"].kind == "float" and got["learning_rate"].log and got["learning_rate"].low == 1e-5
    assert got["lora.r"].kind == "categorical" and got["lora.r"].choices == [4, 8]
    assert got["lora.dropout"].kind == "float" and got["batch_size"].kind == "int"
    assert got["method"].choices == ["lora"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: [a, b]\n", "tune sets name per trial"),
        ("lora.r: []\n", "lora.r: an empty list of choices"),
        ("lora.r: {low: 2.5, high: 8}\n", "lora.r is an integer key"),
        ("base: {low: 1, high: 2}\n", "a range needs a numeric key"),
        ("learning_rate: {low: 0, high: 1, log: true}\n", "a log range needs low > 0"),
        ("learning_rate: 0.001\n", "expected a list of choices or {low, high[, log, step]}"),
    ],
)
def test_bad_space_files_are_user_errors(tmp_path, text, message):
    from tuneloop.errors import UserError
    from tuneloop.trainer.tune import load_space

    p = tmp_path / "s.yaml"
    p.write_text(text)
    with pytest.raises(UserError, match=re.escape(message)):
        load_space(p)


def test_a_choice_that_makes_an_invalid_config_is_refused_before_any_trial():
    from tuneloop.errors import UserError
    from tuneloop.trainer.config import TrainConfig
    from tuneloop.trainer.tune import Param, check_space

    with pytest.raises(UserError, match=r"search space batch_size=0: batch_size must be >= 1"):
        check_space(TrainConfig(dataset="chat"), [Param("batch_size", "categorical", choices=[2, 0])])
    with pytest.raises(UserError, match=r"search space lora.r='many': lora.r: expected an integer"):
        check_space(TrainConfig(dataset="chat"), [Param("lora.r", "categorical", choices=["many"])])
