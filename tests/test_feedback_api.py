"""POST/GET /v1/feedback over real HTTP (uvicorn on a free port) against a real DuckDB, registry, writer and Auth.

The app here holds only the feedback controller and the components it uses (the
controller answers the same way mounted in any app); the live server with the engine is tested by the server tests.
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import asynccontextmanager

import httpx
import pytest
from litestar import Litestar
from litestar.datastructures import State
from prometheus_client import CollectorRegistry

from tuneloop.db import utcnow
from tuneloop.ids import new_id
from tuneloop.monitoring.metrics import ServingMetrics
from tuneloop.monitoring.records import RequestRecord
from tuneloop.monitoring.requestlog import RequestLogWriter
from tuneloop.server.auth import Auth, create_key
from tuneloop.server.feedback_routes import FeedbackController
from tuneloop.settings import AuthSettings, LogSettings


class Api:
    """A running app: base URL, its state, and helpers to fake served requests through the real writer."""

    def __init__(self, db, log_settings: LogSettings):
        self.db = db
        self.registry = CollectorRegistry()
        self.metrics = ServingMetrics(self.registry)
        self.writer = RequestLogWriter(db, log_settings, self.metrics)
        self.auth = Auth(db, AuthSettings(), refresh_s=0.2, miss_refresh_s=0.05)

        @asynccontextmanager
        async def lifespan(app):
            self.writer.start()
            try:
                yield
            finally:
                self.writer.close()

        self.app = Litestar(
            route_handlers=[FeedbackController],
            lifespan=[lifespan],
            state=State(
                {
                    "db": db,
                    "registry": self.registry,
                    "metrics": self.metrics,
                    "log_writer": self.writer,
                    "auth": self.auth,
                }
            ),
        )

    def served(self, model_version: str = "v1", flush: bool = True) -> str:
        """Log one served request, as the chat route does, and return its id."""
        rid = new_id("chatcmpl-")
        self.writer.submit(
            RequestRecord(
                id=rid,
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
        if flush:
            self.writer.flush()
        return rid

    def feedback_count(self, rating: str, version: str) -> float:
        return (
            self.registry.get_sample_value("tuneloop_feedback_total", {"rating": rating, "model_version": version}) or 0
        )


def _serve(app) -> tuple[str, callable]:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)

    def stop():
        server.should_exit = True
        t.join(20)
        sock.close()

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture
def api(db):
    a = Api(db, LogSettings(flush_interval_s=60))  # rows reach the DB only when a test flushes
    url, stop = _serve(a.app)
    a.client = httpx.Client(base_url=url, timeout=30)
    try:
        yield a
    finally:
        a.client.close()
        stop()


def test_thumbs_down_with_a_correction_is_stored_with_the_serving_version(api):
    rid = api.served("chat-v2")
    r = api.client.post(
        "/v1/feedback",
        json={
            "request_id": rid,
            "rating": "down",
            "correction": "Paris is the capital of France.",
            "labels": ["wrong-fact", "wrong-fact", "short"],
        },
    )
    assert r.status_code == 201, r.text
    fb = r.json()
    assert fb["object"] == "feedback" and fb["request_id"] == rid and fb["source"] == "api"
    assert (fb["rating"], fb["rating_kind"], fb["model_version"]) == ("down", "thumbs", "chat-v2")
    assert fb["labels"] == ["wrong-fact", "short"] and fb["created_at"].endswith("Z")
    row = api.db.query("SELECT *, labels->>'$[0]' AS l0 FROM feedback")[0]
    assert (row["id"], row["rating"], row["rating_kind"], row["model_version"]) == (fb["id"], -1, "thumbs", "chat-v2")
    assert row["correction"] == "Paris is the capital of France." and row["l0"] == "wrong-fact"
    assert api.feedback_count("down", "chat-v2") == 1


def test_a_second_post_updates_the_same_record(api):
    rid = api.served()
    first = api.client.post("/v1/feedback", json={"request_id": rid, "rating": "down"})
    assert first.status_code == 201
    second = api.client.post("/v1/feedback", json={"request_id": rid, "correction": "better answer"})
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    assert second.json()["rating"] == "down" and second.json()["correction"] == "better answer"  # merged
    third = api.client.post("/v1/feedback", json={"request_id": rid, "rating": "up", "correction": None})
    assert third.status_code == 200 and third.json()["rating"] == "up" and third.json()["correction"] is None
    assert api.db.query("SELECT count(*) AS n FROM feedback")[0]["n"] == 1
    # the metric counted the first rating and the change, not the text-only update
    assert api.feedback_count("down", "v1") == 1 and api.feedback_count("up", "v1") == 1


def test_each_source_keeps_its_own_record_and_get_lists_them(api):
    rid = api.served()
    a = api.client.post("/v1/feedback", json={"request_id": rid, "rating": 4, "source": "reviewer"})
    b = api.client.post("/v1/feedback", json={"request_id": rid, "rating": "up"})
    assert a.status_code == b.status_code == 201 and a.json()["id"] != b.json()["id"]
    assert a.json()["rating"] == 4 and a.json()["rating_kind"] == "stars"
    got = api.client.get(f"/v1/feedback/{rid}")
    assert got.status_code == 200
    assert sorted(f["source"] for f in got.json()["data"]) == ["api", "reviewer"]
    assert api.feedback_count("4", "v1") == 1


def test_feedback_on_a_request_not_yet_flushed_is_accepted(api):
    rid = api.served(flush=False)
    assert api.db.query("SELECT count(*) AS n FROM requests")[0]["n"] == 0
    r = api.client.post("/v1/feedback", json={"request_id": rid, "rating": "up"})
    assert r.status_code == 201 and r.json()["model_version"] == "v1"


def test_unknown_request_is_a_404_and_writes_nothing(api):
    r = api.client.post("/v1/feedback", json={"request_id": "chatcmpl-nope", "rating": "up"})
    assert r.status_code == 404
    err = r.json()["error"]
    assert (
        err["code"] == "request_not_found" and err["param"] == "request_id" and err["type"] == "invalid_request_error"
    )
    assert api.client.get("/v1/feedback/chatcmpl-nope").status_code == 404
    assert api.db.query("SELECT count(*) AS n FROM feedback")[0]["n"] == 0


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
def test_bad_bodies_are_400_with_an_openai_style_error(api, body, param):
    rid = api.served()
    body = {**body, "request_id": rid} if "request_id" in body else body
    r = api.client.post("/v1/feedback", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param, err
    assert api.db.query("SELECT count(*) AS n FROM feedback")[0]["n"] == 0


def test_malformed_json_is_a_400(api):
    r = api.client.post("/v1/feedback", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_feedback_needs_a_key_once_keys_exist(api):
    rid = api.served()
    _, secret = create_key(api.db, "inference", "app")
    time.sleep(0.25)  # the server re-reads the key table every 0.2 s here
    r = api.client.post("/v1/feedback", json={"request_id": rid, "rating": "up"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = api.client.post(
        "/v1/feedback", json={"request_id": rid, "rating": "up"}, headers={"Authorization": f"Bearer {secret}"}
    )
    assert r.status_code == 201


def test_the_openai_client_can_post_feedback(api):
    import openai

    rid = api.served()
    client = openai.OpenAI(base_url=str(api.client.base_url) + "/v1", api_key="unused-while-no-keys-exist")
    fb = client.post("/feedback", body={"request_id": rid, "rating": 5, "comment": "great"}, cast_to=httpx.Response)
    assert fb.status_code == 201 and fb.json()["rating"] == 5


def test_a_bad_key_gets_the_same_401_on_chat_completions_and_feedback(home, db):
    """One error model: the real app answers a missing or wrong key alike on /v1/chat/completions and /v1/feedback."""
    from litestar.testing import TestClient

    from tuneloop.server.app import create_app
    from tuneloop.server.engine import Engine
    from tuneloop.settings import load_settings

    class IdleEngine(Engine):
        """A real Engine object that is never started: the guards refuse before anything reaches it."""

        @property
        def ready(self) -> bool:
            return True

        def shutdown(self) -> None:
            pass

    settings = load_settings(None, ["drift.interval_s=0", "deploy.canary_judge_interval_s=0"])
    create_key(db, "inference", "app")
    app = create_app(settings, db, engine=IdleEngine(home, settings.engine, "base"))
    chat_body = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}
    with TestClient(app) as client:
        for headers in ({}, {"Authorization": "Bearer tl-not-a-live-key"}):
            chat = client.post("/v1/chat/completions", json=chat_body, headers=headers)
            fb = client.post("/v1/feedback", json={"request_id": "chatcmpl-x", "rating": "up"}, headers=headers)
            assert chat.status_code == fb.status_code == 401
            c, f = chat.json()["error"], fb.json()["error"]
            assert c == f and set(c) == {"message", "type", "code", "param"}
            assert (c["type"], c["code"], c["param"]) == ("invalid_request_error", "invalid_api_key", None)
            assert chat.headers["www-authenticate"] == fb.headers["www-authenticate"] == 'Bearer realm="tuneloop"'
