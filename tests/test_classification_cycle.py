"""A classifier's whole cycle through the CLI and a live server, beside a chat model in production.

prepare {text, label} rows -> train a classifier -> promote it (stages are held per task: the chat production
stays) -> `tuneloop serve` on it answers `/v1/classify` for the alias `production` -> label feedback on what it
served -> `feedback sample --task classification` -> train the next classifier from the served one on that set ->
promote it -> roll the classifiers back. Real components throughout: the CLI as a user runs it, the DuckDB file,
transformers training steps on the tiny model, vLLM's pooling engine and HTTP.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from fixtures_server import read_requests, start_server
from test_classify_train import prepare, ticket_rows, write_rows

PRODUCTION = [
    (f"customer {i} writes: {words} (order {1000 + i})", label)
    for i, (words, label) in enumerate(
        [
            ("my invoice has a double charge", "billing"),
            ("the app crashed with an error", "bug"),
            ("thanks, I love it", "praise"),
        ]
        * 4
    )
][:10]
"""Production traffic: new texts (not in the training set, which sampling dedups against) and their true labels."""
TRAIN = ("task=classification", "method=full", "max_steps=3", "batch_size=4", "save_steps=0", "learning_rate=1e-3")


def stages(db) -> dict[str, tuple[str, str]]:
    from tuneloop.registry import list_versions

    return {v.name: (v.task, v.stage) for v in list_versions(db)}


@pytest.fixture
def chat_in_production(db, tiny_model) -> str:
    """A chat version (the tiny base itself) in production, which nothing in a classifier's cycle may move."""
    from tuneloop.ids import hash_path
    from tuneloop.registry import ModelVersion, register_version, set_stage

    register_version(
        db,
        ModelVersion(
            name="chat-v1",
            kind="base",
            base_model=str(tiny_model),
            path=str(tiny_model),
            content_hash=hash_path(tiny_model),
        ),
    )
    set_stage(db, "chat-v1", "production", reason="test")
    return "chat-v1"


def test_a_classifier_is_served_as_production_beside_the_chat_model_and_its_label_feedback_trains_the_next(
    cli, db, home, tiny_model, tmp_path, chat_in_production
):
    src = write_rows(tmp_path / "tickets.jsonl", ticket_rows())
    prepare(cli, tiny_model, src, "--name", "tickets", "--split", "60/20/20")
    cli("train", *TRAIN, f"base={tiny_model}", "dataset=tickets", "name=cls-v1", "--quiet")
    r = cli("deploy", "promote", "cls-v1", "--force", "--reason", "first classifier")
    assert "promoted cls-v1" in r.stdout
    assert stages(db) == {"chat-v1": ("chat", "production"), "cls-v1": ("classification", "production")}
    listed = {v["name"]: v for v in json.loads(cli("models", "list", "--json").stdout)}
    assert listed["cls-v1"]["task"] == "classification" and listed["chat-v1"]["task"] == "chat"
    status = json.loads(cli("deploy", "status", "--json").stdout)
    assert status["production"] == "chat-v1" and status["classification"]["production"] == "cls-v1"

    srv = start_server(home, Path("cls-v1"))
    try:
        texts = [t for t, _ in PRODUCTION]
        resp = httpx.post(srv.url + "/v1/classify", json={"model": "production", "input": texts}, timeout=120)
        assert resp.status_code == 200, resp.text
        data = resp.json()["data"]
        assert len(data) == len(texts) and {d["num_classes"] for d in data} == {3}
        predicted = [d["label"] for d in data]
        assert set(predicted) <= {"billing", "bug", "praise"}
        # the chat routes of this classifier server refuse, and its production is the classifier, not chat-v1
        chat = httpx.post(
            srv.url + "/v1/chat/completions",
            json={"model": "production", "messages": [{"role": "user", "content": "hi"}]},
            timeout=60,
        )
        assert chat.status_code == 400 and chat.json()["error"]["code"] == "model_is_classifier"
        rid = resp.json()["id"]
        ids = [f"{rid}-{i}" for i in range(len(texts))]
        # corrections: the true label of the first six, a thumbs-up on the seventh
        truth = {ids[i]: PRODUCTION[i][1] for i in range(len(texts))}
        for i in range(6):
            fb = httpx.post(srv.url + "/v1/feedback", json={"request_id": ids[i], "label": truth[ids[i]]}, timeout=30)
            assert fb.status_code in (200, 201), fb.text
        up = httpx.post(srv.url + "/v1/feedback", json={"request_id": ids[6], "rating": "up"}, timeout=30)
        assert up.status_code in (200, 201), up.text
    finally:
        srv.stop()  # drains the request log
    rows = {r["id"]: r for r in read_requests(home / "tuneloop.duckdb") if r["id"] in ids}
    assert len(rows) == len(ids)
    assert {r["model_version"] for r in rows.values()} == {"cls-v1"} and {r["arm"] for r in rows.values()} == {
        "production"
    }
    assert [rows[i]["response"] for i in ids] == predicted

    out = json.loads(
        cli("feedback", "sample", "--task", "classification", "--name", "tickets-fb", "--window", "1h", "--json").stdout
    )
    from tuneloop.dataset_store import load_splits
    from tuneloop.registry import get_dataset

    ds = get_dataset(db, "tickets-fb")
    assert ds.kind == "classification"
    sampled = [r for split in load_splits(db, ds.id).values() for r in split]
    by_request = {r["request_id"]: (r["label"], r["origin"]) for r in sampled}
    expected = {ids[i]: (truth[ids[i]], "feedback") for i in range(6)} | {ids[6]: (predicted[6], "production")}
    assert by_request == expected, out

    cli(
        "train",
        *TRAIN,
        "base=cls-v1",
        "parent=cls-v1",
        "dataset=tickets-fb",
        "name=cls-v2",
        "--quiet",
    )
    from tuneloop.registry import get_version

    v2 = get_version(db, "cls-v2")
    assert (v2.task, v2.kind, v2.parent_version, v2.dataset_id) == ("classification", "merged", "cls-v1", ds.id)
    cli("deploy", "promote", "cls-v2", "--force")
    assert stages(db) == {
        "chat-v1": ("chat", "production"),
        "cls-v1": ("classification", "retired"),
        "cls-v2": ("classification", "production"),
    }
    r = cli("deploy", "rollback", "--task", "classification")
    assert "rolled back cls-v2; cls-v1 is in production again" in r.stdout
    assert stages(db)["cls-v1"] == ("classification", "production") and stages(db)["chat-v1"] == ("chat", "production")
