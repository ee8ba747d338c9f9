"""`tuneloop loop`: one recorded, resumable cycle of sample -> train -> gate -> canary -> decide."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tuneloop.db import dumps, utcnow
from tuneloop.deploy import loop
from tuneloop.deploy.loop import LoopError, LoopOptions, next_version_name, run_cycle
from tuneloop.deploy.loop_runs import steps_of
from tuneloop.deploy.watch import trigger
from tuneloop.ids import new_id
from tuneloop.registry import ModelVersion, get_version, register_version, set_stage, version_by_stage
from tuneloop.settings import load_settings


def add_request(db, prompt, response, version, correction=None, rating=None):
    rid = new_id("chatcmpl-")
    with db.connect() as con:
        con.execute(
            """INSERT INTO requests (id, received_at, route, model, model_version, arm, prompt, response, finish_reason,
                       prompt_tokens, completion_tokens, latency_s, status) VALUES (?, ?, 'chat.completions', 'production', ?,
                       'production', ?, ?, 'stop', 5, 5, 0.2, 200)""",
            [rid, utcnow() - timedelta(minutes=1), version, dumps([{"role": "user", "content": prompt}]), response],
        )
        if correction or rating:
            con.execute(
                "INSERT INTO feedback (id, request_id, rating, rating_kind, correction, model_version, created_at) VALUES (?, ?, ?, 'thumbs', ?, ?, ?)",
                [new_id(), rid, rating, correction, version, utcnow()],
            )
    return rid


def test_next_version_names_follow_the_production_version():
    class DB:
        def query(self, *_a):
            return [{"name": "chat-v3"}]

    assert next_version_name(DB(), "chat-v2") == "chat-v4"  # chat-v3 exists already
    assert next_version_name(DB(), None) == "model-v1"
    assert next_version_name(DB(), "support") == "support-v2"
    assert next_version_name(DB(), "chat-v2", prefix="x") == "x-v1"


def test_a_cycle_without_new_data_records_nothing_to_do(home, db):
    res = run_cycle(db, load_settings(), LoopOptions(progress=False))
    assert res.outcome == "nothing_to_do"
    steps = steps_of(db, res.cycle_id)
    assert steps["sample"]["status"] == "skipped" and "nothing to sample" in steps["sample"]["details"]["reason"]
    assert steps["decide"]["details"]["outcome"] == "nothing_to_do" and "train" not in steps
    with pytest.raises(LoopError, match="unknown cycle"):
        run_cycle(db, load_settings(), LoopOptions(progress=False), cycle_id="no-such-cycle")


def test_triggers_fire_on_drift_feedback_or_schedule(home, db):
    register_version(db, ModelVersion(name="v1", kind="adapter", base_model="/b", path="/p", content_hash="h"))
    set_stage(db, "v1", "production")
    t0 = utcnow()
    assert trigger(db, t0, min_feedback=3, every_s=None) is None
    assert trigger(db, t0 - timedelta(hours=2), min_feedback=0, every_s=3600) == "schedule"
    for i in range(3):
        add_request(db, f"q{i}", "a", "v1", rating=1)
    assert trigger(db, t0, min_feedback=3, every_s=None) == "3 new feedback items"
    db.execute(
        """INSERT INTO drift_reports (id, model_version, feature, statistic, value, threshold, drifted, created_at)
                  VALUES (?, 'v1', 'overall', 'score', 0.7, 0.5, true, ?)""",
        [new_id(), utcnow()],
    )
    assert trigger(db, t0, min_feedback=3, every_s=None).startswith("drift on v1")


@pytest.mark.train
@pytest.mark.slow
def test_an_interrupted_cycle_resumes_skipping_finished_steps_and_promotes(home, db, tiny_model, monkeypatch):
    register_version(
        db,
        ModelVersion(
            name="tiny-v1", kind="base", base_model=str(tiny_model), path=str(tiny_model), content_hash="tiny"
        ),
    )
    set_stage(db, "tiny-v1", "production")
    src = [
        add_request(
            db,
            f"what is the capital of country number {i}?",
            "I do not know.",
            "tiny-v1",
            correction=f"The capital of country {i} is City {i}.",
        )
        for i in range(12)
    ]
    src += [add_request(db, f"say hello number {i}", f"hello {i}", "tiny-v1", rating=1) for i in range(8)]
    # gibberish model: the gate judges the plumbing with a wide tolerance
    settings = load_settings(overrides=["deploy.gate_min_delta=1.0", "deploy.gate_max_forgetting=100"])
    opts = LoopOptions(train_overrides=["max_steps=2"], canary=False, progress=False, eval_limit=4)

    calls = {"gate": 0}
    real_gate = loop._do_gate

    def interrupted_gate(*a, **kw):  # Ctrl-C arrives while the gate runs
        calls["gate"] += 1
        if calls["gate"] == 1:
            raise KeyboardInterrupt
        return real_gate(*a, **kw)

    monkeypatch.setattr(loop, "_do_gate", interrupted_gate)
    with pytest.raises(KeyboardInterrupt):
        run_cycle(db, settings, opts)
    cycle = db.query("SELECT id FROM loop_runs LIMIT 1")[0]["id"]
    first = steps_of(db, cycle)
    assert {k: v["status"] for k, v in first.items()} == {"sample": "done", "train": "done", "gate": "failed"}
    assert "KeyboardInterrupt" in first["gate"]["error"]
    runs_before = db.query("SELECT count(*) AS n FROM runs")[0]["n"]

    res = run_cycle(db, settings, opts, cycle_id=cycle)
    after = steps_of(db, cycle)
    assert res.outcome == "promoted", res.summary()
    for s in ("sample", "train"):  # finished steps were not run again
        assert after[s]["started_at"] == first[s]["started_at"] and after[s]["details"] == first[s]["details"]
    assert db.query("SELECT count(*) AS n FROM runs")[0]["n"] == runs_before
    assert [after[s]["status"] for s in loop.STEPS] == ["done"] * 5
    new = res.candidate
    assert new == "tiny-v2" and version_by_stage(db, "production").name == new
    assert get_version(db, "tiny-v1").stage == "retired"
    # lineage: the promoted version's dataset was built from the logged requests
    v = get_version(db, new)
    used = {
        r["request_id"] for r in db.query("SELECT request_id FROM dataset_rows WHERE dataset_id = ?", [v.dataset_id])
    }
    assert used == set(src)
    # a rerun of a finished cycle changes nothing
    again = run_cycle(db, settings, opts, cycle_id=cycle)
    assert again.outcome == "promoted" and db.query("SELECT count(*) AS n FROM runs")[0]["n"] == runs_before


def test_cli_loop_with_an_unknown_cycle_is_a_clear_error(cli):
    r = cli("loop", "--cycle", "nope", check=False)
    assert r.returncode == 2 and "error: unknown cycle 'nope'" in r.stderr
