"""POST/GET /v1/feedback on the real app.

Most tests talk over real HTTP to the session's live ``tuneloop serve`` (real engine, request log, DuckDB,
metrics): the request a feedback item rates is a real chat completion it served. Two behaviours cannot be
shown on a shared live server without disturbing the other tests, so they run on the same real app built by
:func:`tuneloop.server.app.create_app` (an engine that is never started, Litestar's TestClient): feedback on
a row still in the log writer's queue (needs a writer that does not flush) and feedback once API keys exist
(creating a key would lock every later test out of the live server). The same app over a real PostgreSQL
database (``pg_app_client``) shows the feedback routes on the shared backend, with the request logged by
another handle (another replica).
"""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tuneloop.db import utcnow
from tuneloop.ids import new_id
from tuneloop.monitoring.records import RequestRecord
from tuneloop.server.auth import create_key

# ---- the live server ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http(live_server):
    with live_server.http() as c:
        yield c


def served(http, model: str) -> str:
    """Have the live server answer one chat completion for ``model``; the request id feedback refers to."""
    r = http.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": "what is the capital of France?"}],
            "max_tokens": 2,
        },
    )
    assert r.status_code == 200, r.text
    return r.json()["id"]


@pytest.fixture(scope="module")
def rid(http, live_server) -> str:
    """One served request for the tests that must write nothing."""
    return served(http, live_server.base_name)


def feedback_rows(live_server, request_id: str) -> list[dict]:
    return live_server.db().query(
        "SELECT *, labels->>'$[0]' AS l0 FROM feedback WHERE request_id = ? ORDER BY created_at, source", [request_id]
    )


def feedback_counts(live_server) -> dict[tuple[str, str], float]:
    """tuneloop_feedback_total by (rating, model_version), read from the live server's /metrics."""
    text = httpx.get(live_server.url + "/metrics", timeout=30).text
    return {
        (s.labels["rating"], s.labels["model_version"]): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "tuneloop_feedback_total"
    }


def counted(before: dict, after: dict) -> dict[tuple[str, str], float]:
    """What the feedback counter gained between two reads (series that did not move left out)."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


@pytest.mark.engine
def test_thumbs_down_with_a_correction_is_stored_with_the_serving_version(http, live_server):
    request_id = served(http, "tiny-a")  # the registered adapter version answers
    before = feedback_counts(live_server)
    r = http.post(
        "/v1/feedback",
        json={
            "request_id": request_id,
            "rating": "down",
            "correction": "Paris is the capital of France.",
            "labels": ["wrong-fact", "wrong-fact", "short"],
        },
    )
    assert r.status_code == 201, r.text
    fb = r.json()
    assert fb["object"] == "feedback" and fb["request_id"] == request_id and fb["source"] == "api"
    assert (fb["rating"], fb["rating_kind"], fb["model_version"]) == ("down", "thumbs", "tiny-a")
    assert fb["labels"] == ["wrong-fact", "short"] and fb["created_at"].endswith("Z")
    (row,) = feedback_rows(live_server, request_id)
    assert (row["id"], row["rating"], row["rating_kind"], row["model_version"]) == (fb["id"], -1, "thumbs", "tiny-a")
    assert row["correction"] == "Paris is the capital of France." and row["l0"] == "wrong-fact"
    assert counted(before, feedback_counts(live_server)) == {("down", "tiny-a"): 1}


@pytest.mark.engine
def test_a_second_post_updates_the_same_record(http, live_server):
    request_id, version = served(http, live_server.base_name), live_server.base_name
    before = feedback_counts(live_server)
    first = http.post("/v1/feedback", json={"request_id": request_id, "rating": "down"})
    assert first.status_code == 201
    second = http.post("/v1/feedback", json={"request_id": request_id, "correction": "better answer"})
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    assert second.json()["rating"] == "down" and second.json()["correction"] == "better answer"  # merged
    third = http.post("/v1/feedback", json={"request_id": request_id, "rating": "up", "correction": None})
    assert third.status_code == 200 and third.json()["rating"] == "up" and third.json()["correction"] is None
    assert len(feedback_rows(live_server, request_id)) == 1
    # the metric counted the first rating and the change, not the text-only update
    assert counted(before, feedback_counts(live_server)) == {("down", version): 1, ("up", version): 1}


@pytest.mark.engine
def test_each_source_keeps_its_own_record_and_get_lists_them(http, live_server):
    request_id, version = served(http, live_server.base_name), live_server.base_name
    before = feedback_counts(live_server)
    a = http.post("/v1/feedback", json={"request_id": request_id, "rating": 4, "source": "reviewer"})
    b = http.post("/v1/feedback", json={"request_id": request_id, "rating": "up"})
    assert a.status_code == b.status_code == 201 and a.json()["id"] != b.json()["id"]
    assert a.json()["rating"] == 4 and a.json()["rating_kind"] == "stars"
    got = http.get(f"/v1/feedback/{request_id}")
    assert got.status_code == 200
    assert sorted(f["source"] for f in got.json()["data"]) == ["api", "reviewer"]
    assert counted(before, feedback_counts(live_server)) == {("4", version): 1, ("up", version): 1}


@pytest.mark.engine
def test_unknown_request_is_a_404_and_writes_nothing(http, live_server):
    r = http.post("/v1/feedback", json={"request_id": "chatcmpl-nope", "rating": "up"})
    assert r.status_code == 404
    err = r.json()["error"]
    assert (
        err["code"] == "request_not_found" and err["param"] == "request_id" and err["type"] == "invalid_request_error"
    )
    assert http.get("/v1/feedback/chatcmpl-nope").status_code == 404
    assert feedback_rows(live_server, "chatcmpl-nope") == []


@pytest.mark.engine
@pytest.mark.parametrize(
    "body,param",
    [
        ({"request_id": "x", "rating": "meh"}, "rating"),
        ({"request_id": "x", "rating": 0}, "rating"),
        ({"request_id": "x", "rating": 6}, "rating"),
        ({"request_id": "x", "rating": True}, "rating"),
        ({"request_id": "x", "rating": "up", "labels": "oops"}, "labels"),
        ({"request_id": "x", "rating": "up", "labels": [""]}, "labels"),
        ({"request_id": "x", "rating": "up", "source": "has spaces"}, "source"),
        ({"request_id": "x", "rating": "up", "extra": 1}, "extra"),
        ({"rating": "up"}, "request_id"),
        ({"request_id": "x"}, "rating"),
    ],
)
def test_bad_bodies_are_400_with_an_openai_style_error(http, live_server, rid, body, param):
    body = {**body, "request_id": rid} if "request_id" in body else body
    r = http.post("/v1/feedback", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    assert feedback_rows(live_server, rid) == []


@pytest.mark.engine
def test_malformed_json_is_a_400(http, live_server, rid):
    r = http.post("/v1/feedback", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert feedback_rows(live_server, rid) == []


@pytest.mark.engine
def test_the_openai_client_can_post_feedback(http, live_server):
    request_id = served(http, live_server.base_name)
    fb = live_server.openai().post(
        "/feedback", body={"request_id": request_id, "rating": 5, "comment": "great"}, cast_to=httpx.Response
    )
    assert fb.status_code == 201 and fb.json()["rating"] == 5
    (row,) = feedback_rows(live_server, request_id)
    assert row["rating"] == 5 and row["rating_kind"] == "stars" and row["comment"] == "great"


# ---- the same real app without a started engine ---------------------------------------------------------------


@pytest.fixture
def app_client(home, db):
    """The real app (create_app) over an engine that is never started, a log writer that never flushes by
    itself, and Litestar's TestClient."""
    yield from _app_client(home, db)


@pytest.fixture
def pg_app_client(home, pg_url):
    """:func:`app_client` over a shared PostgreSQL database (a real server, tests/fixtures_postgres.py)."""
    from tuneloop.db import open_database

    db = open_database(pg_url, lock_timeout_s=10.0)
    try:
        yield from _app_client(home, db)
    finally:
        db.close()


def _app_client(home, db):
    from litestar.testing import TestClient

    from tuneloop.server.app import create_app
    from tuneloop.server.engine import Engine
    from tuneloop.settings import load_settings

    class IdleEngine(Engine):
        """A real Engine object that is never started: the feedback and auth paths never reach it."""

        @property
        def ready(self) -> bool:
            return True

        def shutdown(self) -> None:
            pass

    settings = load_settings(
        None, ["drift.interval_s=0", "deploy.canary_judge_interval_s=0", "log.flush_interval_s=3600"]
    )
    app = create_app(settings, db, engine=IdleEngine(home, settings.engine, "base"))
    with TestClient(app) as client:
        client.db = db
        yield client


def log_served(client, model_version: str = "v1") -> str:
    """Submit one served request to the app's own log writer, as the chat route does (not flushed)."""
    request_id = new_id("chatcmpl-")
    client.app.state.log_writer.submit(
        RequestRecord(
            id=request_id,
            received_at=utcnow(),
            route="chat.completions",
            status=200,
            model="production",
            model_version=model_version,
            arm="production",
            prompt=[{"role": "user", "content": "hi"}],
            response="hello",
            prompt_tokens=3,
            completion_tokens=2,
            latency_s=0.1,
        )
    )
    return request_id


def test_feedback_on_a_request_not_yet_flushed_is_accepted(app_client):
    request_id = log_served(app_client)
    assert app_client.db.query("SELECT count(*) AS n FROM requests")[0]["n"] == 0
    r = app_client.post("/v1/feedback", json={"request_id": request_id, "rating": "up"})
    assert r.status_code == 201, r.text
    assert r.json()["model_version"] == "v1"
    assert app_client.db.query("SELECT request_id, model_version FROM feedback") == [
        {"request_id": request_id, "model_version": "v1"}
    ]


def test_feedback_needs_a_key_once_keys_exist(app_client):
    request_id = log_served(app_client)
    _, secret = create_key(app_client.db, "inference", "app")
    deadline = time.monotonic() + 10  # the app re-reads the key table every few seconds
    while (r := app_client.post("/v1/feedback", json={"request_id": request_id, "rating": "up"})).status_code != 401:
        assert r.status_code in (200, 201) and time.monotonic() < deadline, (r.status_code, r.text)
        time.sleep(0.1)
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = app_client.post(
        "/v1/feedback", json={"request_id": request_id, "rating": "up"}, headers={"Authorization": f"Bearer {secret}"}
    )
    assert r.status_code in (200, 201), r.text  # 200 when the post before the key was read had stored it


def test_a_bad_key_gets_the_same_401_on_chat_completions_and_feedback(app_client):
    """One error model: the real app answers a missing or wrong key alike on /v1/chat/completions and /v1/feedback."""
    create_key(app_client.db, "inference", "app")
    chat_body = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}
    deadline = time.monotonic() + 10
    while app_client.post("/v1/feedback", json={"request_id": "chatcmpl-x", "rating": "up"}).status_code != 401:
        assert time.monotonic() < deadline, "the app never noticed the key"
        time.sleep(0.1)
    for headers in ({}, {"Authorization": "Bearer tl-not-a-live-key"}):
        chat = app_client.post("/v1/chat/completions", json=chat_body, headers=headers)
        fb = app_client.post("/v1/feedback", json={"request_id": "chatcmpl-x", "rating": "up"}, headers=headers)
        assert chat.status_code == fb.status_code == 401
        c, f = chat.json()["error"], fb.json()["error"]
        assert c == f and set(c) == {"message", "type", "code", "param"}
        assert (c["type"], c["code"], c["param"]) == ("invalid_request_error", "invalid_api_key", None)
        assert chat.headers["www-authenticate"] == fb.headers["www-authenticate"] == 'Bearer realm="tuneloop"'


def test_feedback_on_a_shared_postgres_database(pg_app_client):
    """On PostgreSQL: a logged request is rated (201), rated again by the same source (200, merged, same record),
    by another source (201, a second record); an unknown request is a 404 and writes nothing."""
    from tuneloop.db import open_database

    db = pg_app_client.db
    other = open_database(db.url)  # another replica logged this request
    try:
        request_id = new_id("chatcmpl-")
        other.execute(
            "INSERT INTO requests (id, received_at, route, model_version, status) VALUES (?, ?, 'chat.completions', ?, 200)",
            [request_id, utcnow(), "v9"],
        )
    finally:
        other.close()
    first = pg_app_client.post("/v1/feedback", json={"request_id": request_id, "rating": "down", "labels": ["x"]})
    assert first.status_code == 201, first.text
    assert first.json()["model_version"] == "v9"
    second = pg_app_client.post("/v1/feedback", json={"request_id": request_id, "correction": "better"})
    assert second.status_code == 200, second.text
    assert second.json()["id"] == first.json()["id"]
    assert (second.json()["rating"], second.json()["labels"], second.json()["correction"]) == ("down", ["x"], "better")
    third = pg_app_client.post("/v1/feedback", json={"request_id": request_id, "rating": 5, "source": "reviewer"})
    assert third.status_code == 201 and third.json()["id"] != first.json()["id"]
    got = pg_app_client.get(f"/v1/feedback/{request_id}")
    assert sorted(f["source"] for f in got.json()["data"]) == ["api", "reviewer"]

    missing = pg_app_client.post("/v1/feedback", json={"request_id": "chatcmpl-nope", "rating": "up"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "request_not_found"
    assert pg_app_client.get("/v1/feedback/chatcmpl-nope").status_code == 404
    assert db.query("SELECT count(*) AS n FROM feedback")[0]["n"] == 2
