"""The annotation queue's rules and assignment, on a real DuckDB file (no server, no browser: the browser tests in
tests/test_console.py drive the same queue through the page)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.test_sample import add_request, weather_version
from tuneloop import store_review
from tuneloop.db import utcnow
from tuneloop.errors import UserError
from tuneloop.server.console_queue import ReviewQueue, sampled
from tuneloop.settings import Settings, UISettings
from tuneloop.store_feedback import save_feedback


@pytest.fixture
def weather(home, db):
    """Version w1, trained on 20 weather questions; its log: near and far questions, a thumbs-down, a cut answer."""
    weather_version(db, home, system="You are a helpful weather bot for Example Corp.")
    ids = {
        "near": [
            add_request(db, f"what is the weather like in city {i} today", "sunny", version="w1") for i in range(6)
        ],
        "far": [
            add_request(db, f"explain quantum entanglement to a {w} student", "hmm", version="w1")
            for w in ("physics", "history", "poetry")
        ],
        "down": add_request(db, "what is the weather like in city 3", "rainy", version="w1", rating=-1),
        "cut": add_request(db, "what is the weather like in city 4", "sunny and", version="w1", finish="length"),
        "old": add_request(db, "explain quantum gravity", "?", version="w1", at=utcnow() - timedelta(days=30)),
    }
    return ids


def test_rules_fill_a_reviewers_queue_in_order_and_only_the_drifted_prompts_pass_the_drift_rule(db, weather):
    q = ReviewQueue(db, UISettings(queue_rules=["thumbs_down", "truncated", "drifted"], queue_batch=10))
    assert q.fill("alice") == 5
    items = store_review.open_items(db, "alice")
    got = [(i["request_id"], i["reason"]) for i in items]
    assert dict(got) == {
        weather["down"]: "thumbs_down",
        weather["cut"]: "truncated",
        **dict.fromkeys(weather["far"], "drifted"),
    }
    # the system prompt is left out of the likeness: the near questions are alike, the far ones are not
    assert not set(weather["near"]) & {rid for rid, _ in got}
    assert weather["old"] not in dict(got)  # outside ui.queue_window
    assert store_review.progress(db, "alice") == {"done": 0, "open": 5, "others_open": 0}


def test_a_request_is_held_by_one_reviewer_and_a_full_queue_takes_no_more(db, weather):
    q = ReviewQueue(
        db, UISettings(queue_rules=["thumbs_down", "truncated", "unreviewed"], queue_sample_share=1.0, queue_batch=3)
    )
    assert q.fill("alice") == 3
    assert q.fill("alice") == 0  # her queue is full
    assert q.fill("bob") == 3
    a = {i["request_id"] for i in store_review.open_items(db, "alice")}
    b = {i["request_id"] for i in store_review.open_items(db, "bob")}
    assert len(a) == len(b) == 3 and not a & b
    assert weather["down"] in a and weather["cut"] in a  # alice came first: the rules' first picks are hers
    # a review is a feedback row from the reviewer; the item is then done, and the queue tops up
    rid = weather["down"]
    save_feedback(db, rid, store_review.reviewer_source("alice"), {"rating": 1, "rating_kind": "thumbs"})
    store_review.mark_reviewed(db, rid, "alice")
    assert store_review.progress(db, "alice") == {"done": 1, "open": 2, "others_open": 3}
    assert q.fill("alice") == 1


def test_the_unreviewed_sample_is_stable_and_about_its_share():
    ids = [f"chatcmpl-{i:06d}" for i in range(4000)]
    share = sum(sampled(i, 0.1) for i in ids) / len(ids)
    assert 0.085 < share < 0.115
    assert [sampled(i, 0.1) for i in ids[:50]] == [sampled(i, 0.1) for i in ids[:50]]
    assert not any(sampled(i, 0.0) for i in ids) and all(sampled(i, 1.0) for i in ids)


def test_reviewer_sources_fit_the_feedback_apis_alphabet():
    assert store_review.reviewer_source("alice") == "review:alice"
    assert store_review.reviewer_source("Ann Lee (ops)") == "review:Ann-Lee-ops"
    assert len(store_review.reviewer_source("x" * 100)) == 64


def test_an_unknown_queue_rule_is_refused_when_the_console_is_built():
    from tuneloop.server.console import console_router

    s = Settings()
    s.ui.queue_rules = ["thumbs_down", "vibes"]
    with pytest.raises(UserError, match="unknown rule"):
        console_router(s, None)  # type: ignore[arg-type]  # refused before the database is needed


def test_the_drift_pages_clusters_separate_topics_and_say_which_is_unlike_the_training_prompts():
    from tuneloop.monitoring.likeness import prompt_clusters

    weather = [f"what is the weather like in city {i} today" for i in range(12)]
    physics = [f"explain quantum entanglement to a {w} student" for w in ("physics", "history", "poetry", "art")]
    clusters = prompt_clusters(weather + physics, [f"what is the weather like in city {i}" for i in range(20)], k=2)
    assert [c["size"] for c in clusters] == [12, 4]  # largest first
    assert "weather" in clusters[0]["words"] and "quantum" in clusters[1]["words"]
    assert clusters[1]["unlikeness"] > 0.9 > 0.5 > clusters[0]["unlikeness"]
    assert prompt_clusters([], []) == []
