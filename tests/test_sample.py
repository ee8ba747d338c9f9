"""`tuneloop feedback sample`: production requests + feedback become registered training sets.

Every test writes synthetic request-log and feedback rows into a real DuckDB
file and reads the written datasets back from disk through the dataset store.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from tuneloop.db import dumps, utcnow
from tuneloop.feedback.sample import SampleConfig, SampleError, sample
from tuneloop.feedback.strategies import parse_strategies
from tuneloop.ids import new_id
from tuneloop.lineage import lineage
from tuneloop.registry import ModelVersion, RegistryError, get_dataset, register_version


def add_request(
    db,
    prompt,
    response,
    *,
    version="v1",
    status=200,
    finish="stop",
    at=None,
    rid=None,
    rating=None,
    kind="thumbs",
    correction=None,
    arm="production",
    messages=None,
    params=None,
):
    rid = rid or new_id("chatcmpl-")
    at = at or utcnow() - timedelta(minutes=5)
    with db.connect() as con:
        con.execute(
            """INSERT INTO requests (id, received_at, route, model, model_version, arm, prompt, response, finish_reason,
               prompt_tokens, completion_tokens, ttft_s, latency_s, status, error, stream, params, user_id, key_id)
               VALUES (?, ?, 'chat.completions', 'production', ?, ?, ?, ?, ?, ?, ?, 0.1, 0.5, ?, NULL, false, ?, NULL, NULL)""",
            [
                rid,
                at,
                version,
                arm,
                dumps(messages or [{"role": "user", "content": prompt}]),
                response,
                finish,
                len(prompt.split()),
                len(response.split()),
                status,
                dumps(params or {}),
            ],
        )
        if rating is not None or correction is not None:
            con.execute(
                "INSERT INTO feedback (id, request_id, rating, rating_kind, correction, model_version, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [new_id(), rid, rating, kind if rating is not None else None, correction, version, utcnow()],
            )
    return rid


def rows(home, db, rec):
    from tuneloop.dataset_store import load_splits

    dd = load_splits(db, rec.id)
    return {s: [dict(r) for r in dd[s]] for s in dd}


def all_rows(home, db, rec):
    return [r for split in rows(home, db, rec).values() for r in split]


def test_filters_drop_errors_aborts_truncations_and_unfixed_thumbs_down(home, db):
    good = add_request(db, "what is the capital of france", "Paris.")
    add_request(db, "this one failed", "", status=500)
    add_request(db, "client went away", "partial", status=499)
    add_request(db, "long answer was cut", "and then and then", finish="length")
    add_request(db, "disliked answer", "bad answer", rating=-1)
    fixed = add_request(db, "cut but corrected", "and then", finish="length", correction="A complete answer.")
    res = sample(db, home, SampleConfig(name="s", strategies={"random": 1.0}, dedup_against=[]), progress=False)
    c = res.card["counts"]
    assert (c["requests_in_window"], c["error"], c["aborted"], c["truncated"], c["negative_feedback"]) == (
        6,
        1,
        1,
        1,
        1,
    )
    got = {r["request_id"]: r for r in all_rows(home, db, res.sft)}
    assert set(got) == {good, fixed}
    assert got[fixed]["messages"][-1] == {"role": "assistant", "content": "A complete answer."}


def test_a_correction_becomes_the_sft_target_and_a_dpo_pair(home, db):
    for i in range(6):
        add_request(
            db, f"question number {i} about tea", f"wrong answer {i}", rating=-1, correction=f"right answer {i}"
        )
    liked = add_request(db, "what colour is the sky", "Blue.", rating=1)
    res = sample(db, home, SampleConfig(name="fb", strategies={"feedback": 1.0}, dedup_against=[]), progress=False)
    sft = {r["request_id"]: r for r in all_rows(home, db, res.sft)}
    assert len(sft) == 7 and sft[liked]["messages"][-1]["content"] == "Blue." and sft[liked]["origin"] == "feedback"
    pairs = all_rows(home, db, res.preference)
    assert res.preference.kind == "preference" and len(pairs) == 6
    for p in pairs:
        n = p["prompt"][-1]["content"].split()[2]
        assert p["chosen"] == [{"role": "assistant", "content": f"right answer {n}"}]
        assert p["rejected"] == [{"role": "assistant", "content": f"wrong answer {n}"}]
        assert sft[p["request_id"]]["messages"][-1]["content"] == f"right answer {n}"


def test_pii_is_scrubbed_from_prompts_responses_and_corrections(home, db):
    add_request(
        db,
        "mail me at jane.doe@example.com",
        "Sure, I will write to jane.doe@example.com.",
        correction="I cannot email 10.0.0.1 or anyone.",
    )
    res = sample(db, home, SampleConfig(name="pii", strategies={"random": 1.0}, dedup_against=[]), progress=False)
    text = json.dumps(all_rows(home, db, res.sft)) + json.dumps(all_rows(home, db, res.preference))
    assert "jane.doe@example.com" not in text and "10.0.0.1" not in text
    assert "<EMAIL>" in text and "<IP>" in text
    assert res.card["counts"]["pii_email"] == 2 and res.card["counts"]["pii_ip"] >= 1


def test_duplicates_are_removed_within_the_sample_and_against_earlier_training_sets(home, db):
    add_request(db, "How do I reset my password?", "Click 'forgot password'.")
    corrected = add_request(
        db, "how do i reset my  password", "No idea.", correction="Use the reset link on the login page."
    )
    add_request(db, "What are your opening hours?", "9 to 5.")
    first = sample(db, home, SampleConfig(name="d1", strategies={"random": 1.0}), progress=False)
    got = {r["request_id"]: r for r in all_rows(home, db, first.sft)}
    assert len(got) == 2 and corrected in got  # the corrected duplicate wins
    assert first.card["counts"]["duplicates_within"] == 1
    new = add_request(db, "Do you ship to Canada?", "Yes, we do.")
    second = sample(db, home, SampleConfig(name="d2", strategies={"random": 1.0}), progress=False)
    assert [r["request_id"] for r in all_rows(home, db, second.sft)] == [new]
    assert second.card["counts"]["duplicates_of_earlier_sets"] == 2 and first.sft.id in second.card["dedup_against"]
    with pytest.raises(SampleError, match="nothing to sample"):
        sample(db, home, SampleConfig(name="d3", strategies={"random": 1.0}), progress=False)


def test_prompts_differing_only_in_tools_or_tool_calls_are_not_duplicates_but_the_same_tool_request_is(home, db):
    def tools(name):
        return {"tools": [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}]}

    def called(args):
        call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": args}}
        return [
            {"role": "user", "content": "find order 7"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "shipped"},
            {"role": "user", "content": "and now?"},
        ]

    q = "find order 7"
    a = add_request(db, q, "<tool_call>a</tool_call>", params=tools("lookup"))
    b = add_request(db, q, "<tool_call>b</tool_call>", params=tools("search"))  # other tools: another prompt
    c = add_request(db, q, "plain answer")  # no tools: another prompt
    d = add_request(db, q, "after call 1", messages=called('{"id": 7}'), params=tools("lookup"))
    e = add_request(db, q, "after call 2", messages=called('{"id": 8}'), params=tools("lookup"))
    f = add_request(db, q, "<tool_call>a2</tool_call>", params=tools("lookup"))  # a newer duplicate of a
    res = sample(db, home, SampleConfig(name="tl", strategies={"random": 1.0}, dedup_against=[]), progress=False)
    got = {r["request_id"]: r for r in all_rows(home, db, res.sft)}
    assert set(got) == {b, c, d, e, f} and a not in got
    assert res.card["counts"]["duplicates_within"] == 1
    assert json.loads(got[b]["tools"])[0]["function"]["name"] == "search" and got[c]["tools"] is None


def test_quotas_split_the_sample_between_strategies(home, db):
    for i in range(10):
        add_request(db, f"corrected question {i} on billing", f"meh {i}", correction=f"good answer {i}")
    for i in range(40):
        add_request(db, f"plain question {i} about topic {i % 7}", f"answer {i}")
    cfg = SampleConfig(
        name="q", strategies=parse_strategies(["feedback=0.25", "random=0.75"]), limit=20, dedup_against=[]
    )
    res = sample(db, home, cfg, progress=False)
    ps = res.card["per_strategy"]
    assert ps["feedback"] == {"quota": 5, "carried_in": 0, "picked": 5}
    assert ps["random"] == {"quota": 15, "carried_in": 0, "picked": 15}
    out = all_rows(home, db, res.sft)
    assert len(out) == 20 and sum(r["origin"] == "feedback" for r in out) >= 5


def test_a_strategy_that_runs_short_passes_its_quota_on(home, db):
    add_request(db, "the only corrected one", "x", correction="y")
    for i in range(30):
        add_request(db, f"plain question {i}", f"answer {i}")
    cfg = SampleConfig(name="c", strategies={"feedback": 0.5, "random": 0.5}, limit=10, dedup_against=[])
    ps = sample(db, home, cfg, progress=False).card["per_strategy"]
    assert ps["feedback"]["picked"] == 1 and ps["random"] == {"quota": 5, "carried_in": 4, "picked": 9}


def test_stratified_sampling_balances_model_versions(home, db):
    for i in range(60):
        add_request(db, f"common question {i} about shipping", f"answer {i}", version="v1")
    for i in range(6):
        add_request(db, f"rare question {i} about returns", f"answer {i}", version="v2")
    res = sample(
        db,
        home,
        SampleConfig(name="st", strategies={"stratified": 1.0}, limit=12, topics=2, dedup_against=[]),
        progress=False,
    )
    ids = {r["request_id"] for r in all_rows(home, db, res.sft)}
    v2 = {r["id"] for r in db.query("SELECT id FROM requests WHERE model_version = 'v2'")}
    assert len(ids) == 12
    assert len(ids & v2) == 6  # uniform sampling would give ~1 of 12; balanced strata give v2 all its rows


def weather_version(db, home, system: str | None = None) -> str:
    """Version ``w1``, registered with a saved dataset of 20 weather questions ("what is the weather like in
    city N"), each after ``system`` when given; its name."""
    from tuneloop.dataset_store import save_dataset

    head = [{"role": "system", "content": system}] if system else []
    train = [
        {
            "id": f"t{i}",
            "messages": [
                *head,
                {"role": "user", "content": f"what is the weather like in city {i}"},
                {"role": "assistant", "content": "sunny"},
            ],
            "request_id": None,
            "origin": "file",
        }
        for i in range(20)
    ]
    ds = save_dataset(db, home, "weather", {"train": train, "validation": train[:2], "test": train[2:4]}, "sft", {}, {})
    register_version(
        db, ModelVersion(name="w1", kind="adapter", base_model="/b", path="/p", content_hash="h", dataset_id=ds.id)
    )
    return "w1"


def test_drift_targeted_sampling_prefers_requests_unlike_the_training_data(home, db):
    weather_version(db, home)
    near = {add_request(db, f"what is the weather like in city {i} today", "sunny", version="w1") for i in range(30)}
    far = {
        add_request(db, f"explain quantum entanglement to a {w} student", "hmm", version="w1")
        for w in ["physics", "chemistry", "history", "art", "music", "math", "biology", "law", "medicine", "poetry"]
    }
    res = sample(
        db, home, SampleConfig(name="dr", strategies={"drift": 1.0}, limit=10, dedup_against=[]), progress=False
    )
    got = {r["request_id"] for r in all_rows(home, db, res.sft)}
    assert len(got & far) >= 8, f"drift-targeted picked only {len(got & far)} of 10 far requests"
    assert len(got & near) <= 2


def test_replay_mixes_in_earlier_training_rows_only_into_train(home, db):
    from tuneloop.dataset_store import save_dataset

    old = [
        {
            "id": f"o{i}",
            "messages": [{"role": "user", "content": f"old question {i}"}, {"role": "assistant", "content": "old"}],
            "request_id": None,
            "origin": "file",
        }
        for i in range(50)
    ]
    base = save_dataset(db, home, "base-set", {"train": old, "validation": old[:3], "test": old[3:6]}, "sft", {}, {})
    for i in range(20):
        add_request(db, f"new question {i} on a new topic", f"new answer {i}")
    res = sample(
        db,
        home,
        SampleConfig(
            name="rp", strategies={"random": 1.0}, replay_from="base-set", replay_fraction=0.2, dedup_against=[]
        ),
        progress=False,
    )
    sp = rows(home, db, res.sft)
    replay = [r for r in sp["train"] if r["origin"] == "replay"]
    assert len(replay) == round(len([r for r in sp["train"] if r["origin"] != "replay"]) * 0.2 / 0.8) > 0
    assert all(r["origin"] != "replay" for s in ("validation", "test") for r in sp[s])
    assert res.sft.parent_ids == [base.id] or get_dataset(db, res.sft.id).parent_ids == [base.id]


def test_the_same_data_and_seed_give_the_same_dataset(home, db):
    for i in range(15):
        add_request(db, f"question {i}", f"answer {i}", rating=1 if i % 3 == 0 else None)
    cfg = SampleConfig(name="det", strategies={"feedback": 0.3, "stratified": 0.7}, limit=10, dedup_against=[])
    a = sample(db, home, cfg, progress=False)
    b = sample(db, home, cfg, progress=False)
    assert a.sft.id == b.sft.id
    sp = rows(home, db, a.sft)
    assert len(sp["test"]) >= 1 and len(sp["validation"]) >= 1


def test_time_window_limits_the_requests(home, db):
    add_request(db, "old request", "old", at=utcnow() - timedelta(hours=3))
    recent = add_request(db, "recent request", "new", at=utcnow() - timedelta(minutes=10))
    res = sample(
        db, home, SampleConfig(name="tw", strategies={"random": 1.0}, window="1h", dedup_against=[]), progress=False
    )
    assert [r["request_id"] for r in all_rows(home, db, res.sft)] == [recent]
    with pytest.raises(SampleError, match="bad duration"):
        sample(db, home, SampleConfig(name="tw", window="an hour"), progress=False)


def test_lineage_runs_from_a_request_to_the_version_trained_on_it_and_back(home, db):
    register_version(db, ModelVersion(name="v1", kind="adapter", base_model="/b", path="/p1", content_hash="h1"))
    src = [add_request(db, f"question {i}", f"answer {i}", version="v1") for i in range(5)]
    res = sample(db, home, SampleConfig(name="lin", strategies={"random": 1.0}, dedup_against=[]), progress=False)
    register_version(
        db,
        ModelVersion(
            name="v2",
            kind="adapter",
            base_model="/b",
            path="/p2",
            content_hash="h2",
            dataset_id=res.sft.id,
            parent_version="v1",
        ),
    )
    served = add_request(db, "a question for v2", "an answer from v2", version="v2")
    # backwards: a response served by v2 -> v2 -> its dataset -> the requests it was built from -> v1
    back = lineage(db, served)
    assert back["served_by"][0]["version"] == "v2"
    assert sorted(back["served_by"][0]["dataset"]["source_requests"]) == sorted(src)
    assert back["served_by"][1]["version"] == "v1"
    # forwards: a source request -> the dataset that includes it -> the version trained on it
    fwd = lineage(db, src[0])
    assert [u["dataset_id"] for u in fwd["used_in_datasets"]] == [res.sft.id]
    assert [v["name"] for v in fwd["trained_versions"]] == ["v2"]
    assert lineage(db, "v2")["chain"][0]["dataset"]["id"] == res.sft.id
    with pytest.raises(RegistryError, match="neither"):
        lineage(db, "nope")


def test_cli_sample_and_lineage_as_a_user_runs_them(cli, db, home):
    for i in range(8):
        add_request(db, f"cli question {i}", f"cli answer {i}", correction="better" if i == 0 else None)
    r = cli(
        "feedback",
        "sample",
        "--name",
        "cli-set",
        "--window",
        "1h",
        "--strategy",
        "feedback=0.5",
        "--strategy",
        "random",
    )
    assert "dataset cli-set@" in r.stdout and "strategies: feedback 1/4, random 7/4" in r.stdout
    ds = get_dataset(db, "cli-set")
    assert ds.rows_train + ds.rows_validation + ds.rows_test == 8
    rid = db.query("SELECT request_id FROM dataset_rows WHERE dataset_id = ? LIMIT 1", [ds.id])[0]["request_id"]
    out = cli("lineage", rid)
    assert ds.id in out.stdout
    bad = cli("feedback", "sample", "--strategy", "bogus", check=False)
    assert bad.returncode == 2 and "error: unknown strategy 'bogus'" in bad.stderr and "Traceback" not in bad.stderr
    bad = cli("feedback", "sample", "--window", "1h", "--name", "again", check=False)
    assert bad.returncode == 2 and "nothing to sample" in bad.stderr
    bad = cli("lineage", "no-such-thing", check=False)
    assert bad.returncode == 2 and "neither" in bad.stderr
