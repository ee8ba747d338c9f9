"""Multi-task mixing (`train datasets=a:0.7,b:0.3`) and the per-task gate, as a user runs them.

Two small SFT tasks on the tiny model: task ``a`` answers every question with "alpha red red red", task ``b``
with "beta square square square". Real CLI subprocesses (the gate test trains its versions through the API, as
tests/test_gate_real_models.py does), a real DuckDB file, real TRL/PEFT training.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import CLI

from tuneloop.errors import UserError
from tuneloop.trainer.inputs import mix_counts, parse_mix

ANSWERS = {"a": "alpha red red red", "b": "beta square square square"}
QUESTIONS = {"a": "alpha question {i}: what colour is it?", "b": "beta question {i}: which shape is it?"}


def task_rows(task: str, train: int = 20, validation: int = 2, test: int = 8) -> dict[str, list[dict]]:
    def rows(split: str, n: int, start: int) -> list[dict]:
        return [
            {
                "id": f"{task}-{split}-{i}",
                "messages": [
                    {"role": "user", "content": QUESTIONS[task].format(i=i)},
                    {"role": "assistant", "content": ANSWERS[task]},
                ],
            }
            for i in range(start, start + n)
        ]

    return {
        "train": rows("train", train, 0),
        "validation": rows("val", validation, 100),
        "test": rows("test", test, 200),
    }


@pytest.fixture(scope="module")
def ws(tiny_model, tmp_path_factory):
    """A home with the SFT datasets 'a' and 'b' (20 train / 2 validation / 8 test rows each) and a preference
    dataset 'pref', registered through the dataset store."""
    from tuneloop.dataset_store import save_dataset
    from tuneloop.db import open_database

    root = tmp_path_factory.mktemp("mixing")
    home = root / "home"
    db = open_database(home / "tuneloop.duckdb")
    ids = {t: save_dataset(db, home, t, task_rows(t), "sft", {}, {"kind": "test"}).id for t in ("a", "b")}
    m = [{"role": "user", "content": "hi"}]
    pref = {"train": [{"id": "p0", "prompt": m, "chosen": [{"role": "assistant", "content": "hello"}],
                       "rejected": [{"role": "assistant", "content": "go away"}]}]}  # fmt: skip
    save_dataset(db, home, "pref", pref, "preference", {}, {"kind": "test"})
    env = dict(
        os.environ,
        TUNELOOP_HOME=str(home),
        # neg_loss: the gate's outcome follows from what each version was trained on; it needs no generation,
        # so the gate generates its (unused) answers with transformers instead of starting vLLM engines
        TUNELOOP_DEPLOY__GATE_METRIC="neg_loss",
        TUNELOOP_DEPLOY__EVAL_BACKEND="transformers",
        TUNELOOP_DEPLOY__GATE_MAX_NEW_TOKENS="2",
    )
    env.pop("TUNELOOP_CONFIG", None)
    return {"root": root, "home": home, "db": db, "cli": CLI(root, env), "base": str(tiny_model), "ids": ids}


# ---- datasets= parsing and the mixing rule ------------------------------------------------------------


def test_weights_are_normalised_to_shares_and_a_lone_dataset_weighs_one():
    assert [(e.ref, e.weight, e.share) for e in parse_mix(["a:3", "b@0123:1"])] == [
        ("a", 3.0, 0.75),
        ("b@0123", 1.0, 0.25),
    ]
    assert [(e.ref, e.share) for e in parse_mix(["a"])] == [("a", 1.0)]
    assert [e.share for e in parse_mix(["a", "b"])] == [0.5, 0.5]


@pytest.mark.parametrize(
    "entries, message",
    [
        ([":0.3", "b:0.7"], "entry ':0.3' has a weight but no dataset name"),
        (["a:x"], "entry 'a:x': weight 'x' is not a number"),
        (["a:0", "b:1"], "entry 'a:0': the weight must be a number > 0"),
        (["a:-1"], "entry 'a:-1': the weight must be a number > 0"),
        (["a:0.5", "b"], "entry 'b' has no weight while 'a:0.5' has one"),
        (["a:1", "a:2"], "names 'a' twice"),
    ],
)
def test_bad_entries_are_refused_naming_the_entry(entries, message):
    with pytest.raises(UserError, match=message):
        parse_mix(entries)


def test_the_input_scarcest_for_its_weight_is_used_in_full_and_no_row_repeats():
    assert mix_counts([20, 20], [0.7, 0.3]) == [20, 8]  # 28 rows: 20/28 = 0.71, 8/28 = 0.29
    assert mix_counts([1000, 5], [0.99, 0.01]) == [495, 5]  # b is scarcest for its weight: all 5 rows
    assert mix_counts([10, 1000], [0.5, 0.5]) == [10, 10]
    assert mix_counts([1000, 1000], [0.999, 0.001]) == [1000, 1]  # every input gives at least one row


# ---- a real run on a mix ----------------------------------------------------------------------------


@pytest.mark.train
@pytest.mark.slow
def test_a_weighted_mix_trains_on_rows_drawn_by_the_weights_and_records_the_mix(ws):
    from tuneloop.dataset_store import load_splits
    from tuneloop.lineage import lineage
    from tuneloop.registry import get_dataset, get_run, get_version

    a, b = ws["ids"]["a"], ws["ids"]["b"]
    r = ws["cli"](
        "train", f"base={ws['base']}", "datasets=a:0.7,b:0.3", "max_steps=2", "name=mixed", "--quiet", "--json"
    )
    res = json.loads(r.stdout[r.stdout.index("{\n") :])
    assert res["metrics"]["steps"] == 2 and res["metrics"]["train_rows"] == 28

    v = get_version(ws["db"], "mixed")
    mix = get_dataset(ws["db"], v.dataset_id)
    assert mix.name.startswith("mix-") and mix.parent_ids == [a, b]
    # the rows trained on: all 20 of a (scarcest for its weight) and 8 of b's 20, i.e. shares 0.71 / 0.29
    train_ids = load_splits(ws["db"], mix.id)["train"]["id"]
    assert sum(i.startswith(f"{a}/") for i in train_ids) == 20 and sum(i.startswith(f"{b}/") for i in train_ids) == 8
    assert (mix.rows_train, mix.rows_validation, mix.rows_test) == (28, 4, 16)  # held-out splits: all rows of both
    drawn = [(m["dataset"], m["weight"], m["share"], m["rows_available"], m["rows_drawn"]) for m in mix.card["mix"]]
    assert drawn == [(a, 0.7, 0.7, 20, 20), (b, 0.3, 0.3, 20, 8)]
    assert mix.card["mix_seed"] == 42 and "scarcest for its weight is used in full" in mix.card["mix_rule"]
    # the run config records the same mix, and the version names the mixed dataset
    run = get_run(ws["db"], v.run_id)
    assert run.dataset_id == v.dataset_id == run.config["mix"]["dataset"]
    assert run.config["datasets"] == ["a:0.7", "b:0.3"] and run.config["mix"]["inputs"] == mix.card["mix"]
    # lineage: version -> the mix -> both inputs
    ds = lineage(ws["db"], "mixed")["chain"][0]["dataset"]
    assert ds["id"] == mix.id and [p["id"] for p in ds["parents"]] == [a, b]
    shown = ws["cli"]("lineage", "mixed").stdout
    assert mix.id in shown and a in shown and b in shown


@pytest.mark.train
@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["datasets=:0.3,b:0.7"], "error: datasets= entry ':0.3' has a weight but no dataset name"),
        (["datasets=a:lots,b:1"], "error: datasets= entry 'a:lots': weight 'lots' is not a number"),
        (["datasets=a:0,b:1"], "error: datasets= entry 'a:0': the weight must be a number > 0"),
        (["datasets=a:1,pref:1"], "error: datasets= mixes datasets of one kind, got a (sft), pref (preference)"),
        (["datasets=a:1,nope:1"], "error: cannot load dataset 'nope'"),
        (["datasets=a:1", "dataset=b"], "error: pass dataset= or datasets= (a weighted mix), not both"),
    ],
)
def test_bad_datasets_values_exit_2_naming_the_entry_and_record_nothing(ws, args, message):
    before = ws["db"].query("SELECT count(*) AS n FROM runs")[0]["n"]
    r = ws["cli"]("train", f"base={ws['base']}", "max_steps=1", *args, check=False)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert ws["db"].query("SELECT count(*) AS n FROM runs")[0]["n"] == before


# ---- the per-task gate ------------------------------------------------------------------------------


def _gate(ws, version: str, *flags: str) -> tuple[int, dict]:
    r = ws["cli"]("deploy", "gate", version, "--json", *flags, check=False)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, json.loads(r.stdout[r.stdout.index("{\n") :])


@pytest.mark.train
@pytest.mark.slow
def test_per_task_gate_passes_a_mix_that_improves_every_task_and_refuses_a_regression_the_pooled_split_hides(ws):
    from tuneloop.config import build
    from tuneloop.registry import set_stage
    from tuneloop.settings import load_settings
    from tuneloop.trainer.config import TrainConfig
    from tuneloop.trainer.train import train

    a, b = ws["ids"]["a"], ws["ids"]["b"]
    settings = load_settings(None, [f"paths.home={ws['home']}"])

    def fit(name, *keys):
        cfg = build(TrainConfig, {}, [f"base={ws['base']}", f"name={name}", "method=full", "learning_rate=5e-3", *keys])
        return train(cfg, ws["db"], settings, progress=False)

    # 10 steps each (full fine-tuning learns fast on the tiny model): the candidate learns both tasks from the
    # 40-row even mix; the b specialist sees twice as many b rows and never sees a. Measured answer losses:
    # candidate 3.0 (a) / 2.7 (b), specialist 7.0 (a) / 1.8 (b), base 7.0 / 7.0
    fit("cand", "datasets=a:1,b:1", "max_steps=10")
    fit("b-only", "dataset=b", "max_steps=10")

    # against the base model (no production yet) the candidate improves on both tasks: passed
    code, ok = _gate(ws, "cand", "--per-task")
    checks = {c["name"]: c for c in ok["checks"]}
    assert code == 0 and ok["passed"], ok
    assert checks[f"task {a}"]["passed"] and checks[f"task {b}"]["passed"]
    assert [t["dataset"] for t in ok["extra"]["tasks"]] == [a, b]
    assert all(t["n_examples"] == 8 and t["bootstrap"]["ci_low"] > 0 for t in ok["extra"]["tasks"])

    # against the b specialist in production it is better on a but worse on b: refused by task b alone
    set_stage(ws["db"], "b-only", "production", actor="test", reason="the b specialist")
    code, refused = _gate(ws, "cand", "--per-task")
    checks = {c["name"]: c for c in refused["checks"]}
    tasks = {t["dataset"]: t for t in refused["extra"]["tasks"]}
    assert code == 1 and not refused["passed"], [c["detail"] for c in refused["checks"]]
    assert checks[f"task {a}"]["passed"] and tasks[a]["candidate"] > tasks[a]["baseline"]
    assert not checks[f"task {b}"]["passed"] and tasks[b]["bootstrap"]["ci_high"] < 0
    assert checks["quality"]["passed"], [c["detail"] for c in refused["checks"]]  # a's gain hides b's regression
    assert "neg_loss on " + b in checks[f"task {b}"]["detail"] and "95% CI" in checks[f"task {b}"]["detail"]
    # without the per-task requirement the same candidate passes on the pooled test split
    code, pooled = _gate(ws, "cand", "--no-per-task")
    assert code == 0 and pooled["passed"] and not any(c["name"].startswith("task") for c in pooled["checks"])

    # a candidate not trained on a mix gets a skipped per-task check; --per-task cannot judge a stored report
    _, single = _gate(ws, "b-only", "--per-task")
    assert next(c for c in single["checks"] if c["name"] == "tasks")["skipped"]
    r = ws["cli"]("deploy", "gate", "cand", "--per-task", "--report", refused["report_id"], check=False)
    assert r.returncode == 2 and "error: --per-task evaluates each task's test split" in r.stderr
