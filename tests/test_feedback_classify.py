"""Feedback on classifier traffic: ``label`` on ``POST /v1/feedback`` and ``tuneloop feedback sample --task
classification``.

Classify requests are logged the way the server logs them: through the request-log writer
(``RequestLogWriter``), one row per input with route ``classify``, ``prompt`` the input text (a JSON string),
``response`` the predicted label and ``scores`` ``{label: probability}``. The feedback goes over real HTTP to the
session's live ``tuneloop serve`` (its DuckDB file holds those rows), and the dataset is written by the real
``tuneloop`` console script. The sampling rules that need no server (chat sampling ignores classify rows, the
low-confidence strategy, dedup and replay across classification sets) run on a DuckDB file of their own.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import CLI
from test_classify_serve import cls_server, reference_probs, tiny_classifier  # noqa: F401 (fixtures)

from tuneloop.db import Database, utcnow
from tuneloop.feedback.sample import SampleConfig, SampleError, sample
from tuneloop.ids import new_id
from tuneloop.monitoring.records import RequestRecord
from tuneloop.monitoring.requestlog import RequestLogWriter
from tuneloop.settings import LogSettings

LABELS = ("billing", "other", "shipping")


def scores(predicted: str, p: float) -> dict[str, float]:
    """Class probabilities with ``p`` on ``predicted`` and the rest shared by the other labels."""
    rest = (1 - p) / (len(LABELS) - 1)
    return {label: (p if label == predicted else rest) for label in LABELS}


OUTSIDE_THE_SERVER = "written-by-a-test"
"""The ``replica`` of rows this module writes into a live server's database itself (tests/test_server_logging.py
compares the server's own rows with its metrics)."""


class ClassifyTraffic:
    """Classify requests logged through the request-log writer, as the classify route logs them."""

    def __init__(self, db: Database, version: str):
        self.version = version
        self.writer = RequestLogWriter(db, LogSettings(flush_interval_s=3600))

    def served(self, text: str, predicted: str | None, p: float = 0.9, *, ago: float = 5.0, status: int = 200) -> str:
        rid = new_id("classify-")
        self.writer.submit(
            RequestRecord(
                id=rid,
                received_at=utcnow() - timedelta(minutes=ago),
                route="classify",
                status=status,
                model=self.version,
                model_version=self.version,
                arm="direct",
                prompt=text,
                response=predicted,
                prompt_tokens=len(text.split()),
                completion_tokens=0,
                latency_s=0.01,
                stream=False,
                scores=scores(predicted, p) if predicted else None,
                error="engine failed" if status >= 400 else None,
                replica=OUTSIDE_THE_SERVER,
            )
        )
        return rid

    def flush(self) -> None:
        """Write every queued row (the writer's shutdown drain)."""
        assert self.writer.close(timeout_s=60) == 0


# ---- the live server: feedback with a label --------------------------------------------------------------------


@pytest.fixture(scope="module")
def http(live_server):
    with live_server.http() as c:
        yield c


@pytest.fixture(scope="module")
def logged(live_server) -> dict[str, str]:
    """Two classify requests of a classifier version, written into the live server's database."""
    traffic = ClassifyTraffic(live_server.db(), f"intents-{new_id()[-8:]}")
    ids = {
        "refund": traffic.served("I want my money back for order 7", "billing", 0.8),
        "parcel": traffic.served("where is my parcel", "other", 0.5),
    }
    traffic.flush()
    return ids


def feedback_rows(live_server, request_id: str) -> list[dict]:
    return live_server.db().query(
        "SELECT source, rating, label FROM feedback WHERE request_id = ? ORDER BY source", [request_id]
    )


@pytest.mark.engine
def test_a_label_on_a_classify_request_is_stored_in_the_feedback_row(http, live_server, logged):
    rid = logged["parcel"]
    r = http.post("/v1/feedback", json={"request_id": rid, "label": "shipping"})
    assert r.status_code == 201, r.text
    assert (r.json()["label"], r.json()["rating"]) == ("shipping", None)
    assert feedback_rows(live_server, rid) == [{"source": "api", "rating": None, "label": "shipping"}]
    # the same source rates it later: the label stays, the rating joins it; GET shows both
    r = http.post("/v1/feedback", json={"request_id": rid, "rating": "down"})
    assert r.status_code == 200 and r.json()["label"] == "shipping"
    (shown,) = http.get(f"/v1/feedback/{rid}").json()["data"]
    assert (shown["label"], shown["rating"]) == ("shipping", "down")
    assert feedback_rows(live_server, rid) == [{"source": "api", "rating": -1, "label": "shipping"}]


@pytest.mark.engine
def test_the_predicted_label_is_accepted_as_a_confirmation(http, live_server, logged):
    rid = logged["refund"]
    r = http.post("/v1/feedback", json={"request_id": rid, "label": "billing", "source": "reviewer"})
    assert r.status_code == 201, r.text
    assert feedback_rows(live_server, rid) == [{"source": "reviewer", "rating": None, "label": "billing"}]


@pytest.mark.engine
def test_a_label_on_a_chat_request_is_a_400_saying_labels_are_for_classify_requests(http, live_server):
    chat = http.post(
        "/v1/chat/completions",
        json={"model": live_server.base_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert chat.status_code == 200, chat.text
    rid = chat.json()["id"]
    r = http.post("/v1/feedback", json={"request_id": rid, "label": "billing", "rating": "down"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["type"], err["code"], err["param"]) == ("invalid_request_error", "invalid_label", "label")
    assert "classify request" in err["message"] and "chat.completions" in err["message"]
    assert feedback_rows(live_server, rid) == []


@pytest.mark.engine
def test_an_unknown_label_is_a_400_naming_the_valid_labels(http, live_server, logged):
    rid = logged["refund"]
    r = http.post("/v1/feedback", json={"request_id": rid, "label": "refunds", "source": "web"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == ("invalid_label", "label")
    assert "'refunds'" in err["message"] and "'billing', 'other', 'shipping'" in err["message"]
    assert all(row["source"] != "web" for row in feedback_rows(live_server, rid))


@pytest.mark.engine
def test_a_label_on_an_unknown_request_is_a_404(http):
    r = http.post("/v1/feedback", json={"request_id": "classify-nope", "label": "billing"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "request_not_found"


# ---- the live server: `tuneloop feedback sample --task classification` -----------------------------------------


@pytest.mark.engine
def test_feedback_sample_turns_labels_and_thumbs_up_into_a_classification_dataset(http, live_server, tmp_path):
    version = f"intents-{new_id()[-8:]}"
    t = ClassifyTraffic(live_server.db(), version)
    req = {
        "confirmed": t.served("I was charged twice for my order", "billing", 0.9),
        "corrected": t.served("my parcel never came", "other", 0.5),
        "thumbs_up": t.served("refund for the duplicate payment", "billing", 0.8, ago=4),
        "older_duplicate": t.served("Refund for the duplicate payment!", "billing", 0.7, ago=6),
        "stars": t.served("my package arrived broken", "shipping", 0.6),
        "thumbs_down": t.served("cancel my subscription please", "shipping", 0.4),
        "unrated": t.served("hello there", "other", 0.7),
        "down_but_labelled": t.served("what are your opening hours", "other", 0.55),
        "pii": t.served("email jane.doe@example.com about my invoice", "billing", 0.95),
        "error": t.served("this one failed", None, status=500),
    }
    t.flush()
    posts = [
        {"request_id": req["confirmed"], "label": "billing"},
        {"request_id": req["corrected"], "label": "shipping", "rating": "down"},
        {"request_id": req["thumbs_up"], "rating": "up"},
        {"request_id": req["older_duplicate"], "rating": "up"},
        {"request_id": req["stars"], "rating": 5},
        {"request_id": req["thumbs_down"], "rating": "down"},
        {"request_id": req["down_but_labelled"], "rating": "down"},
        {"request_id": req["down_but_labelled"], "label": "other", "source": "reviewer"},
        {"request_id": req["pii"], "label": "billing"},
    ]
    for body in posts:
        r = http.post("/v1/feedback", json=body)
        assert r.status_code == 201, r.text

    cli = CLI(tmp_path, dict(os.environ, TUNELOOP_HOME=str(live_server.home)))
    out = json.loads(
        cli(
            "feedback", "sample", "--task", "classification", "--version", version, "--name", "intents", "--json"
        ).stdout
    )
    db = live_server.db()
    from tuneloop.dataset_store import load_splits
    from tuneloop.registry import get_dataset

    rec = get_dataset(db, out["dataset"])
    assert rec.kind == "classification" and out["preference_dataset"] is None
    dd = load_splits(db, rec.id)
    got = {s: [dict(r) for r in dd[s]] for s in dd}
    rows = {r["request_id"]: r for split in got.values() for r in split}
    assert {rid: (r["text"], r["label"], r["origin"]) for rid, r in rows.items()} == {
        req["confirmed"]: ("I was charged twice for my order", "billing", "feedback"),
        req["corrected"]: ("my parcel never came", "shipping", "feedback"),
        req["thumbs_up"]: ("refund for the duplicate payment", "billing", "production"),
        req["stars"]: ("my package arrived broken", "shipping", "production"),
        req["down_but_labelled"]: ("what are your opening hours", "other", "feedback"),
        req["pii"]: ("email <EMAIL> about my invoice", "billing", "feedback"),
    }
    assert all(r["id"] == f"req-{rid}" for rid, r in rows.items())

    card = out["card"]
    on_disk = json.loads((Path(rec.path) / "card.json").read_text())
    assert {k: on_disk[k] for k in card} == card and on_disk["id"] == rec.id
    c = card["counts"]
    assert {k: c[k] for k in ("requests_in_window", "error", "aborted", "redacted", "empty")} == {
        "requests_in_window": 10,
        "error": 1,
        "aborted": 0,
        "redacted": 0,
        "empty": 0,
    }
    assert (c["negative_feedback"], c["unrated"], c["after_filters"]) == (1, 1, 7)
    assert (c["duplicates_within"], c["duplicates_of_earlier_sets"], c["eligible"]) == (1, 0, 6)
    assert (c["picked"], c["replay"], c["pii_email"], c["rows_with_pii"]) == (6, 0, 1, 1)
    assert card["excluded"] == {"thumbs_down_without_label": 1, "unrated": 1}
    assert card["feedback"] == {"labels_given": 4, "labels_confirmed": 3, "labels_corrected": 1, "thumbs_up": 2}
    assert card["origins"] == {"feedback": 4, "production": 2}
    assert card["splits"] == {s: len(got[s]) for s in ("train", "validation", "test")}
    assert sum(card["splits"].values()) == 6 and card["splits"]["test"] >= 1
    assert card["label_names"] == list(LABELS)
    assert card["labels"] == {n: Counter(r["label"] for r in got["train"]).get(n, 0) for n in LABELS}
    assert sum(p["picked"] for p in card["per_strategy"].values()) == 6
    assert card["confidence"]["min"] == pytest.approx(0.5)
    assert (rec.rows_train, rec.rows_validation, rec.rows_test) == tuple(
        len(got[s]) for s in ("train", "validation", "test")
    )


# ---- sampling rules on a database of their own ----------------------------------------------------------------


def label(db: Database, rid: str, value: str | None = None, rating: str | None = None) -> None:
    """Post feedback through the feedback API's own validation and storage."""
    import msgspec

    from tuneloop.server.feedback_routes import FeedbackIn, normalise, upsert_feedback

    body = msgspec.convert(
        {"request_id": rid, **({"label": value} if value else {}), **({"rating": rating} if rating else {})},
        FeedbackIn,
    )
    upsert_feedback(db, rid, body.source, normalise(body))


def chat_request(db: Database, prompt: str, response: str) -> str:
    w = RequestLogWriter(db, LogSettings(flush_interval_s=3600))
    rid = new_id("chatcmpl-")
    w.submit(
        RequestRecord(
            id=rid,
            received_at=utcnow() - timedelta(minutes=5),
            route="chat.completions",
            status=200,
            model_version="chat-v1",
            prompt=[{"role": "user", "content": prompt}],
            response=response,
            finish_reason="stop",
        )
    )
    assert w.close() == 0
    return rid


def test_chat_sampling_reads_no_classify_request(home, db):
    chat = chat_request(db, "what is the capital of france", "Paris.")
    t = ClassifyTraffic(db, "intents-v1")
    liked = t.served("where is my parcel", "shipping")
    t.flush()
    label(db, liked, rating="up")
    res = sample(db, home, SampleConfig(name="chat", strategies={"random": 1.0}, dedup_against=[]), progress=False)
    assert res.card["counts"]["requests_in_window"] == 1
    from tuneloop.dataset_store import load_splits

    dd = load_splits(db, res.sft.id)
    assert [r["request_id"] for s in dd for r in dd[s]] == [chat]
    with pytest.raises(SampleError, match="--task classification"):
        sample(db, home, SampleConfig(name="chat", strategies={"low-confidence": 1.0}), progress=False)


def test_the_low_confidence_strategy_picks_the_least_confident_predictions_first(home, db):
    t = ClassifyTraffic(db, "intents-v1")
    ids = {p: t.served(f"request number {i} about orders", "billing", p) for i, p in enumerate((0.9, 0.4, 0.7, 0.5))}
    t.flush()
    for rid in ids.values():
        label(db, rid, rating="up")
    cfg = SampleConfig(
        name="unsure",
        task="classification",
        strategies={"low-confidence": 1.0},
        limit=2,
        validation_fraction=0,
        test_fraction=0,
        dedup_against=[],
    )
    res = sample(db, home, cfg, progress=False)
    from tuneloop.dataset_store import load_splits

    picked = {r["request_id"] for r in load_splits(db, res.sft.id)["train"]}
    assert picked == {ids[0.4], ids[0.5]}
    assert res.card["per_strategy"] == {"low-confidence": {"quota": 2, "carried_in": 0, "picked": 2}}
    assert res.card["confidence"] == {"min": pytest.approx(0.4), "mean": pytest.approx(0.45)}


def test_a_second_sample_skips_rows_already_trained_on_and_replays_the_first_set(home, db):
    t = ClassifyTraffic(db, "intents-v1")
    first_ids = [t.served(f"old question {i} about a refund", "billing", 0.8, ago=30) for i in range(4)]
    t.flush()
    for rid in first_ids:
        label(db, rid, rating="up")
    first = sample(db, home, SampleConfig(name="c1", task="classification", test_fraction=0), progress=False)
    assert first.sft.kind == "classification" and first.card["labels"] == {
        "billing": first.sft.rows_train,
        "other": 0,
        "shipping": 0,
    }
    t2 = ClassifyTraffic(db, "intents-v1")
    again = t2.served("old question 0 about a refund", "billing", 0.8)  # same text, same label: trained on already
    fixed = t2.served("old question 1 about a refund", "billing", 0.6)  # same text, a new label from feedback
    t2.flush()
    label(db, again, rating="up")
    label(db, fixed, "other")
    second = sample(
        db,
        home,
        SampleConfig(
            name="c2",
            task="classification",
            since=utcnow() - timedelta(minutes=10),
            replay_from=first.sft.id,
            replay_fraction=0.5,
            validation_fraction=0,
            test_fraction=0,
        ),
        progress=False,
    )
    assert second.card["counts"]["duplicates_of_earlier_sets"] == 1 and first.sft.id in second.card["dedup_against"]
    from tuneloop.dataset_store import load_splits

    train = load_splits(db, second.sft.id)["train"]
    assert Counter(r["origin"] for r in train) == {"feedback": 1, "replay": 1}
    assert [r["request_id"] for r in train if r["origin"] == "feedback"] == [fixed]
    assert second.sft.parent_ids == [first.sft.id]


# ---- a classify request still in the server's log queue --------------------------------------------------------


@pytest.fixture
def app_client(home, db):
    """The real app over an engine that is never started and a log writer that never flushes by itself."""
    from test_feedback_api import _app_client

    yield from _app_client(home, db)


def test_a_label_on_a_classify_request_not_yet_flushed_is_checked_against_its_queued_scores(app_client):
    rid = new_id("classify-")
    app_client.app.state.log_writer.submit(
        RequestRecord(
            id=rid,
            received_at=utcnow(),
            route="classify",
            status=200,
            model_version="intents-v1",
            prompt="where is my parcel",
            response="other",
            scores=scores("other", 0.5),
        )
    )
    bad = app_client.post("/v1/feedback", json={"request_id": rid, "label": "parcel"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_label"
    assert "'billing', 'other', 'shipping'" in bad.json()["error"]["message"]
    ok = app_client.post("/v1/feedback", json={"request_id": rid, "label": "shipping"})
    assert ok.status_code == 201, ok.text
    assert (ok.json()["label"], ok.json()["model_version"]) == ("shipping", "intents-v1")
    assert app_client.db.query("SELECT request_id, label FROM feedback") == [{"request_id": rid, "label": "shipping"}]


# ---- both backends -------------------------------------------------------------------------------------------


def test_a_label_is_stored_and_the_classifier_scores_are_read_back_on_both_backends(any_db, home):
    """The feedback storage keeps ``label`` and reads a logged request's route and scores on DuckDB and
    PostgreSQL; a classification sample reads them there (PostgreSQL: through the analytics copy)."""
    from tuneloop import store_feedback

    t = ClassifyTraffic(any_db, "intents-v1")
    rid = t.served("where is my parcel", "other", 0.5)
    up = t.served("my package arrived broken", "shipping", 0.6)
    t.flush()
    info = store_feedback.request_info(any_db, rid)
    assert info is not None and (info.route, info.model_version) == ("classify", "intents-v1")
    assert info.scores == pytest.approx(scores("other", 0.5))
    assert store_feedback.request_info(any_db, "classify-nope") is None
    saved = store_feedback.save_feedback(any_db, rid, "api", {"label": "shipping"})
    assert saved.created and saved.feedback.label == "shipping"
    again = store_feedback.save_feedback(any_db, rid, "api", {"rating": -1, "rating_kind": "thumbs"})
    assert (again.created, again.feedback.label, again.feedback.rating) == (False, "shipping", -1)
    assert [f.label for f in store_feedback.list_feedback(any_db, rid)] == ["shipping"]
    label(any_db, up, rating="up")
    cfg = SampleConfig(name="both", task="classification", validation_fraction=0, test_fraction=0)
    res = sample(any_db, home, cfg, progress=False)
    from tuneloop.dataset_store import load_splits

    train = sorted((r["text"], r["label"], r["origin"]) for r in load_splits(any_db, res.sft.id)["train"])
    assert train == [
        ("my package arrived broken", "shipping", "production"),
        ("where is my parcel", "shipping", "feedback"),
    ]
    assert (res.card["counts"]["requests_in_window"], res.card["feedback"]["labels_corrected"]) == (2, 1)


# ---- end to end: a served classifier, its feedback, the next training set ---------------------------------------


@pytest.mark.engine
def test_a_served_classifiers_feedback_becomes_its_next_classification_set(request, tmp_path):
    """POST /v1/classify on a live classifier server (tests/test_classify_serve.py's), feedback on each input of
    the batch, `tuneloop feedback sample --task classification` over that server's home."""
    import httpx

    srv = request.getfixturevalue("cls_server")

    def fb(body: dict) -> httpx.Response:
        return httpx.post(srv.url + "/v1/feedback", json=body, timeout=60)

    texts = ["my order is late again", "the parcel looks fine", "refund me now please", "hello"]
    r = httpx.post(srv.url + "/v1/classify", json={"input": texts}, timeout=120)
    assert r.status_code == 200, r.text
    rid, data = r.json()["id"], r.json()["data"]
    predicted = [d["label"] for d in data]
    wrong = next(x for x in ("a", "b", "c") if x != predicted[0])
    bad = fb({"request_id": f"{rid}-0", "label": "z"})
    assert bad.status_code == 400 and "'a', 'b', 'c'" in bad.json()["error"]["message"]
    assert fb({"request_id": f"{rid}-0", "label": wrong}).status_code == 201
    assert fb({"request_id": f"{rid}-1", "rating": "up"}).status_code == 201
    assert fb({"request_id": f"{rid}-2", "rating": "down"}).status_code == 201
    srv.flush_log()

    cli = CLI(tmp_path, dict(os.environ, TUNELOOP_HOME=str(srv.home)))
    out = json.loads(
        cli("feedback", "sample", "--task", "classification", "--name", "next", "--no-dedup-against", "--json").stdout
    )
    from tuneloop.dataset_store import load_splits

    dd = load_splits(srv.db(), out["dataset"])
    rows = sorted((r["request_id"], r["text"], r["label"], r["origin"]) for s in dd for r in dd[s])
    assert rows == [
        (f"{rid}-0", texts[0], wrong, "feedback"),
        (f"{rid}-1", texts[1], predicted[1], "production"),
    ]
    c = out["card"]["counts"]
    assert (c["negative_feedback"], c["unrated"], c["picked"]) == (1, 1, 2)
    assert out["card"]["label_names"] == ["a", "b", "c"]
    assert out["card"]["feedback"]["labels_corrected"] == 1
