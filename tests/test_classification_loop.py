"""The loop for a classifier: label feedback from a live classifier server -> the next classifier -> gate -> a canary
served beside production by the same server -> its judge decides on label corrections -> promoted, served by that
server without a restart.

Real components throughout: `tuneloop serve` on the production classifier (vLLM's pooling engine, plus an extra
pooling engine for the canary started by the server itself), HTTP, the DuckDB file, transformers training steps on
the tiny model and the loop's own steps (:func:`tuneloop.deploy.loop.run_cycle`).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from fixtures_server import read_requests, start_server
from test_classification_cycle import TRAIN
from test_classify_train import prepare, ticket_rows, write_rows

pytestmark = [pytest.mark.engine, pytest.mark.train, pytest.mark.slow]

LABELS = ("billing", "bug", "praise")
WORDS = {"billing": "my invoice shows a refund missing", "bug": "the screen froze after the update", "praise": "great"}
SERVER_ENV = {
    # both engines share two cores: the latency guardrail must not flag the noise of two processes as a regression
    "TUNELOOP_DEPLOY__CANARY_MAX_LATENCY_RATIO": "4",
}


def classify(srv, user: str, texts: list[str]) -> dict:
    r = httpx.post(srv.url + "/v1/classify", json={"model": "production", "input": texts, "user": user}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def label(srv, request_id: str, value: str) -> None:
    r = httpx.post(srv.url + "/v1/feedback", json={"request_id": request_id, "label": value}, timeout=30)
    assert r.status_code in (200, 201), r.text


def other(lab: str) -> str:
    return next(x for x in LABELS if x != lab)


def wait_for(what: str, cond, timeout: float, poll: float = 0.5):
    t0 = time.monotonic()
    while not (v := cond()):
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout:g} s"
        time.sleep(poll)
    return v


def test_the_loop_retrains_the_production_classifier_from_label_feedback_and_canaries_it_on_the_live_server(
    cli, db, home, tiny_model, tmp_path
):
    from tuneloop.dataset_store import load_splits
    from tuneloop.deploy.loop import LoopOptions, run_cycle
    from tuneloop.registry import get_dataset, get_version
    from tuneloop.settings import load_settings

    src = write_rows(tmp_path / "tickets.jsonl", ticket_rows())
    prepare(cli, tiny_model, src, "--name", "tickets", "--split", "60/20/20")
    cli("train", *TRAIN, f"base={tiny_model}", "dataset=tickets", "name=cls-v1", "--quiet")
    cli("deploy", "promote", "cls-v1", "--force", "--reason", "first classifier")

    srv = start_server(home, Path("cls-v1"), env=SERVER_ENV)
    try:
        # production traffic, every prediction labelled with the true class by its users
        texts = [(f"customer {i}: {WORDS[lab]} (case {i})", lab) for i, lab in enumerate(LABELS * 10)]
        for k in range(0, len(texts), 5):
            chunk = texts[k : k + 5]
            resp = classify(srv, f"early-{k}", [t for t, _ in chunk])
            assert resp["model"] == "cls-v1"
            for i, (_, truth) in enumerate(chunk):
                label(srv, f"{resp['id']}-{i}", truth)
        srv.flush_log()

        served: dict[str, int] = {}

        def canary_traffic(run) -> None:
            """Once the canary runs: the server starts the candidate's engine by itself; then 60 users, each
            sticky to one arm, classify three texts; simulated users confirm the canary's predictions and correct
            production's (the canary is the better classifier, as its judge must find)."""
            assert run.candidate == "cls-v2" and run.production == "cls-v1"
            httpx.post(srv.url + "/admin/state/refresh", timeout=30).raise_for_status()
            state = wait_for(
                "the server's extra engine for the canary is up",
                lambda: (
                    (s := httpx.get(srv.url + "/admin/state", timeout=30).json())["engines"].get("cls-v2") == "ready"
                    and s
                ),
                timeout=300,
            )
            assert state["production"] == "cls-v1" and state["canary"] == "cls-v2"
            for u in range(60):
                resp = classify(srv, f"user-{u}", [f"user {u} asks about item {j}" for j in range(3)])
                served[resp["model"]] = served.get(resp["model"], 0) + 1
                for i, d in enumerate(resp["data"]):
                    label(srv, f"{resp['id']}-{i}", d["label"] if resp["model"] == "cls-v2" else other(d["label"]))
            srv.flush_log()

        settings = load_settings(overrides=["deploy.gate_min_delta=1.0"])  # the gate is run, not what is tested
        opts = LoopOptions(
            task="classification",
            window="1h",
            train_overrides=[o for o in TRAIN if not o.startswith(("task=", "method="))],
            canary_share=0.5,
            canary_server_judge_s=240,  # the live server's judge decides
            canary_timeout_s=60,
            progress=False,
        )
        res = run_cycle(db, settings, opts, on_canary_start=canary_traffic)
        assert res.outcome == "promoted", res.summary()
        steps = res.steps

        # sample: the label feedback became a classification set
        s = steps["sample"]["details"]
        assert s["task"] == "classification"
        ds = get_dataset(db, s["dataset"])
        splits = load_splits(db, ds.id)
        rows = [r for split in splits.values() for r in split]
        assert ds.kind == "classification" and ds.card["label_names"] == list(LABELS)
        fed = {r["text"]: r["label"] for r in rows if r["origin"] == "feedback"}
        assert fed == dict(texts)  # every labelled production text, with its label
        # and the production classifier's training set replayed against forgetting, in the train split only
        replayed = [r for r in rows if r["origin"] == "replay"]
        assert replayed and all(r in splits["train"] for r in replayed)
        assert {r["origin"] for r in rows} == {"feedback", "replay"} and ds.parent_ids == [
            get_version(db, "cls-v1").dataset_id
        ]
        # train: the next classifier, from the production one
        t = steps["train"]["details"]
        assert (t["objective"], t["method"], t["base"]) == ("classification", "lora", "cls-v1")
        v2 = get_version(db, "cls-v2")
        assert (v2.task, v2.kind, v2.parent_version, v2.dataset_id) == ("classification", "merged", "cls-v1", ds.id)
        # gate: macro-F1 against the production classifier
        g = steps["gate"]["details"]
        assert g["passed"] and "macro_f1 candidate" in g["message"] and g["baseline"] == "cls-v1"
        # canary: decided by the server's own judge, on label corrections
        c = steps["canary"]["details"]
        assert c["decided_by"] != opts.actor, c
        assert "judged wrong (label corrected or thumbs-down)" in c["reason"], c
        assert set(served) == {"cls-v1", "cls-v2"}  # both arms were served by the one server
        assert (get_version(db, "cls-v2").stage, get_version(db, "cls-v1").stage) == ("production", "retired")

        # the server started on cls-v1 now serves cls-v2 as production, without a restart
        httpx.post(srv.url + "/admin/state/refresh", timeout=30).raise_for_status()
        assert classify(srv, "after", ["one more question"])["model"] == "cls-v2"
        srv.flush_log()
    finally:
        srv.stop()
    logged = [r for r in read_requests(home / "tuneloop.duckdb") if r["route"] == "classify"]
    arms = {(r["arm"], r["model_version"]) for r in logged if (r["user_id"] or "").startswith("user-")}
    # each arm served by its own version; production may include cls-v2 if the judge promoted it mid-way
    assert (
        {("production", "cls-v1"), ("canary", "cls-v2")}
        <= arms
        <= {
            ("production", "cls-v1"),
            ("canary", "cls-v2"),
            ("production", "cls-v2"),
        }
    )
