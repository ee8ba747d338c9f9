"""`tuneloop data synthesize`: synthetic rows generated through a live `tuneloop serve` (SmolLM2, real vLLM engine,
real HTTP), aimed at production's thumbs-down and drifted requests, with provenance, quality controls and a
train-only split; the server keeps the generation requests out of its request log.

One SmolLM2 server for the module: SmolLM2 registered as version `smollm2` with a chatterbot dataset (its training
prompts are chit-chat), so production prompts about Kubernetes are the drifted slice.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from fixtures_server import start_server

pytestmark = [pytest.mark.slow]

DRIFTED = [
    "How do I roll back a Kubernetes deployment with kubectl rollout undo?",
    "Which Kubernetes probe restarts a pod: liveness or readiness?",
]
USUAL = ["Hello, how are you today?", "Do you like music?", "What is your favourite food?", "Tell me a joke."]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(server, CLI env) : `tuneloop serve --model smollm2` with production traffic and thumbs-down feedback."""
    import subprocess

    from conftest import VENV_BIN

    from tuneloop.db import open_database
    from tuneloop.ids import hash_path
    from tuneloop.registry import ModelVersion, get_dataset, register_version
    from tuneloop.settings import PathSettings
    from tuneloop.trainer.bootstrap import DEFAULT_BASE, pull

    base = pull(DEFAULT_BASE, PathSettings().models_path)
    home = tmp_path_factory.mktemp("synth-home")
    env = {"TUNELOOP_HOME": str(home), "PATH": str(VENV_BIN) + ":/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    exe = str(VENV_BIN / "tuneloop")
    subprocess.run(
        [exe, "data", "corpus", "chatterbot-corpus", "-o", str(home / "c.jsonl"), "--limit", "80"], env=env, check=True
    )
    subprocess.run(
        [exe, "data", "prepare", str(home / "c.jsonl"), "--name", "chat", "--base", str(base), "--no-progress"],
        env=env,
        check=True,
        capture_output=True,
    )
    db = open_database(home / "tuneloop.duckdb")
    register_version(
        db,
        ModelVersion(
            name="smollm2", kind="base", base_model=str(base), path=str(base), content_hash=hash_path(base),
            dataset_id=get_dataset(db, "chat").id,
        ),
    )  # fmt: skip
    srv = start_server(home, Path("smollm2"))
    ids = {}
    client = srv.openai()
    for text in DRIFTED + USUAL:
        r = client.chat.completions.with_raw_response.create(
            model="smollm2",
            messages=[
                {"role": "system", "content": "Answer in one short sentence."},
                {"role": "user", "content": text},
            ],
            max_tokens=300,
            temperature=0,
        )
        ids[text] = r.headers["x-request-id"]
    for text in (DRIFTED[0], USUAL[0], USUAL[1]):  # thumbs-down, no correction: the teacher's work
        httpx.post(
            srv.url + "/v1/feedback", json={"request_id": ids[text], "rating": "down"}, timeout=30
        ).raise_for_status()
    srv.flush_log()
    yield srv, env, ids
    srv.stop()


def run(env: dict[str, str], *args: str, check: bool = True):
    import subprocess

    from conftest import VENV_BIN

    r = subprocess.run([str(VENV_BIN / "tuneloop"), *args], env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-4000:]
    return r


def logged_requests(srv) -> int:
    srv.flush_log()
    db = srv.db()
    return int(db.query("SELECT count(*) AS n FROM requests")[0]["n"])


def synthetic_counter(srv) -> float:
    text = httpx.get(srv.url + "/metrics", timeout=30).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tuneloop_synthetic_requests_total{")
    )


def test_teacher_answers_thumbs_down_prompts_with_provenance_train_only_and_never_in_the_request_log(smol):
    from tuneloop.dataset_store import load_card, load_splits

    srv, env, ids = smol
    before, synth_before = logged_requests(srv), synthetic_counter(srv)
    common = ["--endpoint", srv.url + "/v1", "--model", "smollm2", "--window", "1h", "--temperature", "0"]
    r = run(env, "data", "synthesize", "--mode", "teacher", *common, "--name", "teach", "--max-tokens", "32", "--json")
    out = json.loads(r.stdout)
    card = out["card"]
    db = srv.db()
    dd = load_splits(db, out["dataset"])
    rows = list(dd["train"])
    # the three thumbs-down requests were answered again by the generator; each row keeps its request's lineage
    assert card["steps"]["seed_requests"] == 3 and card["steps"]["generated"] == 3
    assert sorted(r["request_id"] for r in rows) == sorted(ids[t] for t in (DRIFTED[0], USUAL[0], USUAL[1]))
    assert len(dd["validation"]) == 0 and len(dd["test"]) == 0  # synthetic rows are training rows only
    for row in rows:
        prov = json.loads(row["provenance"])
        assert row["origin"] == "synthetic" and prov["origin"] == "synthetic" and prov["mode"] == "teacher"
        assert prov["generator"] == "smollm2" and prov["seed"] == row["request_id"]
        assert row["messages"][-1]["role"] == "assistant" and row["messages"][-1]["content"].strip()
    assert card["origin"] == "synthetic" and card["generator"]["model"] == "smollm2"
    # the three generation requests were served, counted as synthetic, and kept out of the request log
    assert logged_requests(srv) == before
    assert synthetic_counter(srv) - synth_before == 3
    # the same run again: every row is already in an earlier set (greedy answers repeat), so nothing is written
    r = run(
        env, "data", "synthesize", "--mode", "teacher", *common, "--name", "teach2", "--max-tokens", "32", check=False
    )
    assert r.returncode == 2 and "no synthetic row survived" in r.stderr and "duplicates_earlier 3" in r.stderr
    assert load_card(db, out["dataset"])["rows"] == {"train": 3, "validation": 0, "test": 0}


def test_targeted_generation_is_seeded_by_the_drifted_slice_and_names_its_new_words(smol):
    from tuneloop.dataset_store import load_splits

    srv, env, ids = smol
    r = run(
        env, "data", "synthesize", "--mode", "targeted", "--endpoint", srv.url + "/v1", "--model", "smollm2",
        "--window", "1h", "--seeds", "2", "--count", "4", "--max-tokens", "96", "--name", "drifted", "--json",
    )  # fmt: skip
    out = json.loads(r.stdout)
    card = out["card"]
    # the two Kubernetes prompts are the farthest from the chit-chat training prompts: they are the seeds
    assert sorted(s["request_id"] for s in card["seeds"]) == sorted(ids[t] for t in DRIFTED)
    assert "kubernetes" in [w for w, _ in card["new_words"]]
    rows = list(load_splits(srv.db(), out["dataset"])["train"])
    answered = [r for r in rows if r["request_id"]]
    assert {r["request_id"] for r in answered} <= {ids[t] for t in DRIFTED}
    generated = [json.loads(r["provenance"]) for r in rows if not r["request_id"]]
    from tuneloop.feedback.synthesize import template_hash

    seeds = {s["request_id"] for s in card["seeds"]}
    assert all(p["template_sha256"] == template_hash("targeted") and p["seed"] in seeds for p in generated)
    steps = card["steps"]
    assert steps["generated"] + steps["generation_errors"] + steps["unparseable"] == 4
    assert steps["rows"] == len(rows) >= 2


def test_paraphrases_of_a_source_set_keep_their_seed_answers_and_every_surviving_row_is_judged(smol, tmp_path):
    from tuneloop.dataset_store import load_splits

    srv, env, _ = smol
    r = run(
        env, "data", "synthesize", "--mode", "paraphrase", "--source", "chat", "--endpoint", srv.url + "/v1",
        "--model", "smollm2", "--count", "6", "--max-tokens", "64", "--judge", "--judge-threshold", "1",
        "--name", "para", "--json",
    )  # fmt: skip
    out = json.loads(r.stdout)
    card = out["card"]
    steps = card["steps"]
    assert steps["seed_rows"] > 6 and steps["generated"] + steps["unparseable"] + steps["generation_errors"] == 6
    judged = steps["generated"] - steps["rule_rejected"] - steps["duplicates_within"] - steps["duplicates_earlier"]
    assert sum(steps["judge_scores"].values()) == judged  # every surviving row was scored 1-5 by the judge
    rows = list(load_splits(srv.db(), out["dataset"])["train"])
    assert len(rows) == steps["rows"] == judged - steps["judge_rejected"]
    src = {r["id"]: r for r in load_splits(srv.db(), "chat")["train"]}
    for row in rows:
        prov = json.loads(row["provenance"])
        assert 1 <= prov["judge_score"] <= 5 and prov["seed"] in src
        # a paraphrase keeps the seed's answer and rewrites its request
        assert row["messages"][-1]["content"] == src[prov["seed"]]["messages"][-1]["content"]
        assert row["messages"][-2]["content"] != src[prov["seed"]]["messages"][-2]["content"]
    assert card["templates"]["paraphrase"] and card["templates"]["judge"]


def test_bad_synthesize_requests_are_clear_errors_and_synthetic_rows_cannot_enter_a_test_split(cli, db, home):
    r = cli("data", "synthesize", "--mode", "self-instruct", "--source", "x", check=False)
    assert r.returncode == 2 and "--task" in r.stderr and "Traceback" not in r.stderr
    r = cli("data", "synthesize", "--mode", "paraphrase", check=False)
    assert r.returncode == 2 and "--source" in r.stderr
    r = cli("data", "synthesize", "--mode", "teacher", "--endpoint", "ftp://x", check=False)
    assert r.returncode == 2 and "--endpoint" in r.stderr
    from tuneloop.dataset_store import save_dataset
    from tuneloop.errors import UserError

    row = {"id": "a", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(UserError, match="training data only"):
        save_dataset(
            db, home, "bad", {"train": [row], "test": [{**row, "id": "b", "origin": "synthetic"}]}, "sft", {}, {}
        )


def test_a_loop_sample_with_a_synthetic_share_adds_targeted_rows_to_its_train_split_only(smol, monkeypatch):
    """``tuneloop loop --synthetic-share``: the sample step's SFT set gains targeted synthetic rows in train; its
    validation and test splits (what the gate measures) are the sample's own."""
    import math

    from tuneloop.dataset_store import load_splits
    from tuneloop.deploy.loop import LoopOptions, _do_sample
    from tuneloop.settings import load_settings
    from tuneloop.timeparse import utcnow

    srv, _, ids = smol
    for text in USUAL[2:]:  # corrected answers are training rows even when the served answer was cut
        httpx.post(
            srv.url + "/v1/feedback", json={"request_id": ids[text], "rating": "up", "correction": "Sure: " + text}
        ).raise_for_status()
    srv.flush_log()
    monkeypatch.setenv("TUNELOOP_HOME", str(srv.home))
    db = srv.db()
    opts = LoopOptions(
        window="1h", synthetic_share=0.5, synthetic_endpoint=srv.url + "/v1", synthetic_model="smollm2", progress=False
    )
    d = {"window": "1h", "since": None, "until": utcnow().isoformat()}
    out = _do_sample(db, load_settings(), opts, d, "cycle-synthetic-test")
    assert "sampled_dataset" in out, out.get("synthetic")
    sampled, mixed = load_splits(db, out["sampled_dataset"]), load_splits(db, out["dataset"])
    n_train = len(sampled["train"])
    syn = out["synthetic"]
    asked = math.ceil(n_train * 0.5 / (1 - 0.5))  # the share asked for: as many synthetic rows as sampled ones
    steps = syn["steps"]
    assert n_train >= 1 and steps["generated"] + steps["generation_errors"] + steps["unparseable"] == asked
    assert syn["rows"] >= 1 and len(mixed["train"]) == n_train + syn["rows"]
    origins = [r["origin"] for r in mixed["train"]]
    assert origins.count("synthetic") == syn["rows"]
    for split in ("validation", "test"):
        assert [r["id"] for r in mixed[split]] == [r["id"] for r in sampled[split]]
        assert all(r["origin"] != "synthetic" for r in mixed[split])
