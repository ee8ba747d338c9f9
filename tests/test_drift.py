"""Drift of a model version's production traffic against its training data, end to end on a real DuckDB file:
reference profile with the serving tokenizer, production windows in the real `requests` schema, the drift job,
its `drift_reports` rows and Prometheus gauges.

Same distribution: production windows are held-out chatterbot-corpus questions (the version was trained on the
rest) -> at most 5% false alarms over 40 windows. Real shift: chitchat-dataset prompts -> drift is detected."""

from __future__ import annotations

import importlib.util
import json
import random
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from tuneloop.db import utcnow
from tuneloop.ids import new_id
from tuneloop.monitoring.drift_job import DriftJob, run_once
from tuneloop.monitoring.profile import Profile, compute_profile, load_profile, store_profile
from tuneloop.registry import ModelVersion, register_version
from tuneloop.settings import DriftSettings, Settings


def _pkg_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locate package data without importing the package
    return Path(next(iter(spec.submodule_search_locations)))


def chatterbot_pairs() -> list[tuple[str, str]]:
    out = []
    for f in sorted((_pkg_dir("chatterbot_corpus") / "data" / "english").glob("*.yml")):
        for conv in yaml.safe_load(f.read_text()).get("conversations", []):
            if len(conv) >= 2 and isinstance(conv[0], str) and isinstance(conv[1], str):
                out.append((conv[0], conv[1]))
    return out


def chitchat_prompts(n: int, seed: int = 0) -> list[str]:
    data = json.loads((_pkg_dir("chitchat_dataset") / "dataset.json").read_text())
    firsts = [" ".join(m["text"] for m in conv["messages"][0]) for conv in data.values() if conv.get("messages")]
    return random.Random(seed).sample(firsts, n)


def insert_requests(db, version: str, rows: list[dict]) -> None:
    """Rows in the real `requests` schema (as the server's log writer stores them)."""
    import pyarrow as pa

    now = utcnow()
    cols = {
        k: [r.get(k) for r in rows]
        for k in ("prompt", "response", "finish_reason", "prompt_tokens", "completion_tokens")
    }
    t = pa.table(
        {
            "id": [new_id() for _ in rows],
            "received_at": [now - timedelta(seconds=60 + i) for i in range(len(rows))],
            "model_version": [version] * len(rows),
            "prompt": [json.dumps(p) for p in cols["prompt"]],
            "response": cols["response"],
            "finish_reason": cols["finish_reason"],
            "prompt_tokens": pa.array(cols["prompt_tokens"], pa.int32()),
            "completion_tokens": pa.array(cols["completion_tokens"], pa.int32()),
        }
    )
    with db.connect() as con:
        con.register("_rows", t)
        con.execute("""INSERT INTO requests (id, received_at, route, model, model_version, arm, prompt, response, finish_reason,
                           prompt_tokens, completion_tokens, ttft_s, latency_s, status, stream)
                       SELECT id, received_at, 'chat.completions', model_version, model_version, 'direct', prompt::JSON, response,
                              finish_reason, prompt_tokens, completion_tokens, 0.05, 0.2, 200, false FROM _rows""")
        con.unregister("_rows")


@pytest.fixture(scope="module")
def corpus():
    pairs = chatterbot_pairs()
    random.Random(0).shuffle(pairs)
    return pairs[:1600], pairs[1600:]


@pytest.fixture
def trained(db, home, tiny_model, corpus):
    """A registered version trained (by lineage) on 1,600 chatterbot pairs, with its dataset saved by the store."""
    from tuneloop.dataset_store import save_dataset

    train, _ = corpus
    rows = [
        {
            "id": str(i),
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            "request_id": None,
            "origin": "file",
        }
        for i, (q, a) in enumerate(train)
    ]
    ds = save_dataset(db, home, "chatterbot", {"train": rows}, "sft", card={}, source={"test": True})
    register_version(
        db,
        ModelVersion(
            name="chat-v1",
            kind="adapter",
            base_model=str(tiny_model),
            path=str(tiny_model),
            content_hash="0" * 64,
            dataset_id=ds.id,
        ),
    )
    return ds


def _production_rows(tok, prompts_answers, finish_length_share=0.0, seed=0):
    from tuneloop.chat import completion_ids, render_prompt

    rng = random.Random(seed)
    out = []
    for q, a in prompts_answers:
        msgs = [{"role": "user", "content": q}]
        out.append(
            {
                "prompt": msgs,
                "response": a,
                "prompt_tokens": len(render_prompt(tok, msgs)),
                "completion_tokens": len(completion_ids(tok, a)),
                "finish_reason": "length" if rng.random() < finish_length_share else "stop",
            }
        )
    return out


def test_profile_uses_the_serving_tokenizer_and_chat_template(db, trained, tiny_model, corpus):
    from transformers import AutoTokenizer

    from tuneloop.chat import render_prompt

    p = compute_profile(db, "chat-v1", DriftSettings(embeddings=False))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    q, _ = corpus[0][0]
    assert p.profile["n_rows"] == 1600 and p.dataset_id == trained.id
    lengths = dict(map(tuple, p.profile["prompt_length"]))
    assert len(render_prompt(tok, [{"role": "user", "content": q}])) in lengths
    assert sum(lengths.values()) == 1600
    assert 0 < p.profile["oov_expected"] < 0.5 and "what" in p.profile["vocab"][:20]
    assert load_profile(db, "chat-v1").profile == p.profile


@pytest.mark.slow
def test_same_distribution_raises_at_most_5_percent_false_alarms_over_40_windows(db, trained, tiny_model, corpus):
    from transformers import AutoTokenizer

    settings = DriftSettings(embeddings=False, window="1h")
    base = compute_profile(db, "chat-v1", settings)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    pool = _production_rows(tok, corpus[1])
    for seed in range(40):
        store_profile(db, Profile(f"w{seed}", base.dataset_id, base.profile))
        insert_requests(db, f"w{seed}", random.Random(seed).choices(pool, k=200))
    results = DriftJob(db, settings, None).run_once()
    assert len(results) == 40 and all(r.skipped is None and r.n_requests == 200 for r in results)
    overall = sum(r.drifted for r in results)
    per_feature = {f.feature: sum(r.feature(f.feature).drifted for r in results) for f in results[0].features}
    assert overall <= 2, per_feature
    assert all(v <= 2 for v in per_feature.values()), per_feature
    n_rows = db.query("SELECT count(*) AS n, count(DISTINCT id) AS runs FROM drift_reports WHERE feature = 'overall'")[
        0
    ]
    assert n_rows == {"n": 40, "runs": 40}


@pytest.mark.slow
def test_chitchat_traffic_on_a_chatterbot_model_is_detected_with_gauges_and_reports(db, trained, tiny_model):
    from prometheus_client import CollectorRegistry
    from transformers import AutoTokenizer

    settings = DriftSettings(window="1h", embedding_sample=128, permutations=100)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompts = chitchat_prompts(200)
    rows = _production_rows(tok, [(p, "ok") for p in prompts], finish_length_share=0.3)
    insert_requests(db, "chat-v1", rows)
    ids = [r["id"] for r in db.query("SELECT id FROM requests ORDER BY id LIMIT 40")]
    with db.connect() as con:
        for i, rid in enumerate(ids):
            con.execute(
                "INSERT INTO feedback (id, request_id, rating, rating_kind, model_version, created_at) VALUES (?, ?, ?, 'thumbs', 'chat-v1', now())",
                [new_id(), rid, -1 if i < 30 else 1],
            )
    registry = CollectorRegistry()
    [res] = DriftJob(db, settings, registry).run_once()  # profile computed on demand (with embeddings)
    feats = {f.feature: f for f in res.features}
    assert res.drifted and res.score >= settings.overall_threshold
    for name in ("vocabulary", "oov", "embedding", "finish_length", "negative_feedback", "response_length"):
        assert feats[name].drifted, (name, feats[name])
    assert feats["embedding"].details["pvalue"] < 0.01 and feats["negative_feedback"].value == pytest.approx(0.75)
    assert any(w for w, _ in res.new_words)
    labels = {"feature": "overall", "model_version": "chat-v1"}
    assert registry.get_sample_value("tuneloop_drifted", labels) == 1.0
    assert registry.get_sample_value("tuneloop_drift_score", labels) == pytest.approx(res.score)
    assert registry.get_sample_value(
        "tuneloop_drift_score", {"feature": "vocabulary", "model_version": "chat-v1"}
    ) == pytest.approx(feats["vocabulary"].value)
    stored = db.query(
        "SELECT feature, statistic, value, threshold, drifted FROM drift_reports WHERE id = ? ORDER BY feature",
        [res.id],
    )
    assert {r["feature"] for r in stored} == set(feats) | {"overall"}
    # the one-call form the demo uses returns the same verdict as a dict
    d = run_once(db, Settings(drift=settings), "chat-v1")
    assert d["drifted"] and d["features"]["vocabulary"]["drifted"]


def test_a_thin_window_is_skipped_and_writes_nothing(db, trained, tiny_model, corpus):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    insert_requests(db, "chat-v1", _production_rows(tok, corpus[1][:10]))
    [res] = DriftJob(db, DriftSettings(embeddings=False), None).run_once("chat-v1")
    assert res.skipped and "min_requests" in res.skipped
    assert db.query("SELECT count(*) AS n FROM drift_reports")[0]["n"] == 0


def test_a_version_without_training_data_is_skipped_with_the_reason(db, tiny_model):
    register_version(
        db,
        ModelVersion(name="raw", kind="base", base_model=str(tiny_model), path=str(tiny_model), content_hash="1" * 64),
    )
    [res] = DriftJob(db, DriftSettings(embeddings=False), None).run_once("raw")
    assert res.skipped and "no training dataset" in res.skipped


def test_a_large_window_counts_words_on_a_deterministic_sample_that_agrees_with_the_full_count(
    db, trained, tiny_model, corpus
):
    from transformers import AutoTokenizer

    from tuneloop.monitoring.drift import compare, parse_window, production_stats

    settings = DriftSettings(embeddings=False)
    prof = compute_profile(db, "chat-v1", settings)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    shifted = [(p, "ok") for p in chitchat_prompts(1000, seed=1)]
    rows = _production_rows(tok, shifted + corpus[1])  # 1,000 chitchat + 426 held-out chatterbot prompts
    insert_requests(db, "chat-v1", rows)
    now, vocab = utcnow(), prof.profile["vocab"]

    def stats(word_sample):
        with db.connect() as con:
            return production_stats(con, "chat-v1", parse_window("1h"), vocab, now, word_sample=word_sample)

    full, sampled, again = stats(0), stats(500), stats(500)
    assert full.n_requests == sampled.n_requests == full.word_requests == len(rows)
    assert 350 <= sampled.word_requests <= 650 and sampled.total_tokens < full.total_tokens / 2
    assert (sampled.word_requests, sampled.total_tokens, sampled.new_words) == (
        again.word_requests,
        again.total_tokens,
        again.new_words,
    )
    assert sampled.prompt_len[1].sum() == full.prompt_len[1].sum() == len(rows)  # lengths always use every request
    # tolerances from 40 runs with fresh (random) request ids, i.e. 40 different samples: the sampled OOV share
    # was off by sd 0.011 (max 0.026); the sampled JS by +0.012 on average (a smaller window's JS is biased
    # upwards), sd 0.009 (max 0.028). The former 0.03 / 0.03 failed 2 of 13 runs here; these are ~4 sd.
    assert sampled.oov_tokens / sampled.total_tokens == pytest.approx(full.oov_tokens / full.total_tokens, abs=0.045)
    f_full, f_sampled = (compare(prof.profile, s, settings, "t").feature("vocabulary") for s in (full, sampled))
    assert f_sampled.details["word_requests"] == sampled.word_requests
    assert f_sampled.value == pytest.approx(f_full.value + 0.012, abs=0.036) and f_sampled.drifted and f_full.drifted
