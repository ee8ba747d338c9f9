"""`tuneloop loop`: one recorded, resumable cycle of sample -> train -> gate -> canary -> decide."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from datetime import timedelta

import pytest
from conftest import VENV_BIN

from tuneloop.db import dumps, utcnow
from tuneloop.deploy import loop
from tuneloop.deploy.loop import LoopError, LoopOptions, next_version_name, run_cycle
from tuneloop.deploy.watch import trigger
from tuneloop.ids import new_id
from tuneloop.registry import ModelVersion, get_version, register_version, set_stage, version_by_stage
from tuneloop.settings import load_settings
from tuneloop.store_deploy import begin_step, end_step, steps_of


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


# ---- `tuneloop loop --watch` as a user runs it ------------------------------------------------------------------


class Watch:
    """``tuneloop loop --watch`` running as a subprocess; its stdout+stderr go to a file the test polls."""

    def __init__(self, cli, *args: str):
        self.log = cli.cwd / f"watch-{new_id()}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "tuneloop"), "loop", "--watch", *args],
                cwd=cli.cwd,
                env=cli.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, pattern: str, timeout_s: float = 60) -> re.Match:
        """The first match of ``pattern`` in the output, polled until it appears (fails on exit or deadline)."""
        deadline = time.monotonic() + timeout_s
        while not (m := re.search(pattern, self.output(), re.M)):
            assert self.proc.poll() is None, f"watch exited {self.proc.returncode} before {pattern!r}:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {pattern!r} within {timeout_s} s:\n{self.output()}"
            time.sleep(0.05)
        return m

    def stays_idle(self, polls: int, poll_s: float) -> None:
        """No trigger for ``polls`` poll intervals (absence can only be shown over a bounded time)."""
        before = self.output().count("trigger:")
        time.sleep(polls * poll_s)
        assert self.proc.poll() is None and self.output().count("trigger:") == before, self.output()

    def stop(self, sig: int, timeout_s: float = 30) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"watch did not stop within {timeout_s} s of {sig!r}:\n{self.output()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def old_request(db, version: str) -> str:
    """A request served two hours ago: outside the watch's one-hour sampling window, so a triggered cycle
    finds nothing to sample and ends at once (``nothing_to_do``) instead of training."""
    rid = new_id("chatcmpl-")
    db.execute(
        """INSERT INTO requests (id, received_at, route, model, model_version, arm, prompt, response, finish_reason,
                   prompt_tokens, completion_tokens, latency_s, status) VALUES (?, ?, 'chat.completions', 'production', ?,
                   'production', ?, 'a', 'stop', 5, 5, 0.2, 200)""",
        [rid, utcnow() - timedelta(hours=2), version, dumps([{"role": "user", "content": "q"}])],
    )
    return rid


def thumbs_up(db, rid: str, version: str) -> None:
    db.execute(
        "INSERT INTO feedback (id, request_id, rating, rating_kind, model_version, created_at) VALUES (?, ?, 1, 'thumbs', ?, ?)",
        [new_id(), rid, version, utcnow()],
    )


def cycles(db) -> dict[str, dict]:
    """cycle id -> {step: row}, for every cycle in loop_runs."""
    return {r["id"]: steps_of(db, r["id"]) for r in db.query("SELECT DISTINCT id FROM loop_runs")}


def test_watch_resumes_runs_a_cycle_on_each_trigger_only_and_stops_cleanly_on_sigterm_and_sigint(cli, db):
    register_version(db, ModelVersion(name="v1", kind="adapter", base_model="/b", path="/p", content_hash="h"))
    set_stage(db, "v1", "production")
    rids = [old_request(db, "v1") for _ in range(3)]
    # a cycle interrupted in its sample step (Ctrl-C) by an earlier watch
    interrupted = new_id()
    begin_step(
        db, interrupted, "sample", {"window": "1h", "since": None, "until": utcnow().isoformat(), "production": "v1"}
    )
    end_step(db, interrupted, "sample", "failed", {}, error="KeyboardInterrupt: ")
    poll = 0.2
    w = Watch(cli, "--min-feedback", "3", "--poll", str(poll), "--window", "1h", "--no-canary")
    try:
        # 1. the unfinished cycle is resumed first and decided
        w.wait_for(rf"^resuming unfinished cycle {interrupted}$")
        w.wait_for(rf"^cycle {interrupted}: nothing to do$")
        w.wait_for(
            r"^watching: a cycle runs on drift of the production version over threshold, or 3 new feedback items"
        )
        assert cycles(db)[interrupted]["decide"]["details"]["outcome"] == "nothing_to_do"

        # 2. two new feedback items are below --min-feedback 3, and there is no schedule: no cycle
        thumbs_up(db, rids[0], "v1")
        thumbs_up(db, rids[1], "v1")
        w.stays_idle(10, poll)
        assert list(cycles(db)) == [interrupted]

        # 3. the third fires a cycle, recorded in loop_runs; the same feedback does not fire another
        thumbs_up(db, rids[2], "v1")
        w.wait_for(r"^trigger: 3 new feedback items$")
        deadline = time.monotonic() + 30
        while not (new := [c for c, st in cycles(db).items() if c != interrupted and "decide" in st]):
            assert time.monotonic() < deadline, w.output()
            time.sleep(0.05)
        (feedback_cycle,) = new
        w.wait_for(rf"^cycle {feedback_cycle}: nothing to do$")
        steps = cycles(db)[feedback_cycle]
        assert steps["sample"]["status"] == "skipped" and steps["decide"]["details"]["outcome"] == "nothing_to_do"
        w.stays_idle(5, poll)
        assert len(cycles(db)) == 2

        # 4. drift of the production version over its threshold fires the next one
        db.execute(
            """INSERT INTO drift_reports (id, model_version, feature, statistic, value, threshold, drifted, created_at)
                      VALUES (?, 'v1', 'overall', 'score', 0.7, 0.5, true, ?)""",
            [new_id(), utcnow()],
        )
        w.wait_for(r"^trigger: drift on v1 \(overall 0\.7 over 0\.5\)$")
        deadline = time.monotonic() + 30
        while len(done := [c for c, s in cycles(db).items() if "decide" in s]) < 3:
            assert time.monotonic() < deadline, w.output()
            time.sleep(0.05)
        (drift_cycle,) = set(done) - {interrupted, feedback_cycle}
        w.wait_for(rf"^cycle {drift_cycle}: nothing to do$")
        assert w.output().count("trigger:") == 2

        # 5. SIGTERM stops it cleanly: a message, exit 130 as for Ctrl-C, no traceback
        rc = w.stop(signal.SIGTERM)
        out = w.output()
        assert rc == 130, out
        assert "watch stopped (SIGTERM) after 3 cycle(s)" in out and out.rstrip().endswith("interrupted"), out
        assert "Traceback" not in out
    finally:
        w.kill()

    # 6. so does Ctrl-C (SIGINT) while it waits for a trigger; nothing new fired
    w = Watch(cli, "--min-feedback", "3", "--poll", str(poll), "--window", "1h", "--no-canary")
    try:
        w.wait_for(r"^watching: ")
        assert w.stop(signal.SIGINT) == 130
        out = w.output()
        assert "resuming" not in out and "trigger:" not in out
        assert "watch stopped (SIGINT) after 0 cycle(s)" in out and out.rstrip().endswith("interrupted"), out
        assert "Traceback" not in out
    finally:
        w.kill()
    assert len(cycles(db)) == 3
