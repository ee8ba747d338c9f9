"""Short-lived servers, engine core in its own process as shipped (asserted):
SIGTERM finishes the streams in flight and logs every request; SIGKILL loses at most the last flush interval of
the log, leaves a database that opens and no engine process behind; keys guard the API; health and readiness."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import httpx
import psutil
import pytest
from fixtures_server import descendants, start_server

pytestmark = [pytest.mark.engine, pytest.mark.slow]

FLUSH_INTERVAL_S = 0.2
# A flush commits after its interval has elapsed: the time one flush takes (open, insert, commit). The suite runs
# two pytest workers on two cores, so the server shares its core with another test's work: a steady-state flush
# (the first one, which opens the file, is waited for before the measurement) is given 1 s. A response is durable
# once `FLUSH_INTERVAL_S + COMMIT_S` have passed since it was received.
COMMIT_S = 1.0
MSG = [{"role": "user", "content": "hi"}]


def _keys(home) -> tuple[dict, dict]:
    """(admin key, inference key) as dicts with their id and secret, created in the server's database."""
    from tuneloop.db import open_database
    from tuneloop.server.auth import create_key

    db = open_database(home / "tuneloop.duckdb")
    out = []
    for scope in ("admin", "inference"):
        key, secret = create_key(db, scope, f"{scope}-key")
        out.append({"id": key.id, "secret": secret})
    return out[0], out[1]


def _engine_children(srv) -> list[psutil.Process]:
    """The server's descendant processes, among them vLLM's engine core (asserted)."""
    kids = descendants(srv.proc.pid)
    assert any("EngineCore" in k.name() for k in kids), f"no engine core child in {kids}"
    return kids


def test_sigterm_answers_in_flight_requests_and_logs_every_one(tiny_model, tmp_path):
    from tuneloop.db import open_database

    home = tmp_path / "home"
    home.mkdir()
    admin_key, infer_key = _keys(home)
    # a long flush interval: the rows reach the database only through the drain on shutdown
    srv = start_server(home, tiny_model, env={"TUNELOOP_LOG__FLUSH_INTERVAL_S": "600"})
    kids = _engine_children(srv)
    try:
        base = srv.base_name
        # keys: none -> 401, inference key on admin -> 403, admin key -> 200
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": base, "messages": MSG})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.get(srv.url + "/admin/adapters", headers={"Authorization": f"Bearer {infer_key['secret']}"})
        assert r.status_code == 403
        r = httpx.get(srv.url + "/admin/adapters", headers={"Authorization": f"Bearer {admin_key['secret']}"})
        assert r.status_code == 200

        auth = {"Authorization": f"Bearer {infer_key['secret']}"}
        n_streams, max_tokens = 4, 200

        async def short(h: httpx.AsyncClient) -> str:
            r = await h.post("/v1/chat/completions", json={"model": base, "messages": MSG, "max_tokens": 8})
            assert r.status_code == 200, r.text
            return r.json()["id"]

        async def stream(h: httpx.AsyncClient, first_chunk: asyncio.Event, state: dict) -> None:
            # greedy over a random model: the same long answer every run, cut by max_tokens (finish_reason length)
            body = {"model": base, "messages": MSG, "max_tokens": max_tokens, "temperature": 0, "stream": True}
            async with h.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    payload = line[len("data: ") :]
                    if payload == "[DONE]":
                        state["done"] = True
                        continue
                    chunk = json.loads(payload)
                    state["id"] = chunk["id"]
                    first_chunk.set()
                    for c in chunk["choices"]:
                        if c.get("delta", {}).get("content"):
                            state["chunks"] += 1
                            state["after_term"] += state["term"].is_set()
                        if c.get("finish_reason"):
                            state["finish_reason"] = c["finish_reason"]

        async def traffic():
            async with httpx.AsyncClient(base_url=srv.url, headers=auth, timeout=120) as h:
                short_ids = await asyncio.gather(*(short(h) for _ in range(12)))
                term = asyncio.Event()
                firsts = [asyncio.Event() for _ in range(n_streams)]
                states = [
                    {"chunks": 0, "after_term": 0, "done": False, "finish_reason": None, "term": term}
                    for _ in range(n_streams)
                ]
                tasks = [asyncio.ensure_future(stream(h, f, s)) for f, s in zip(firsts, states, strict=True)]
                # every stream has delivered its first chunk: all four are in flight
                await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 120)
                assert not any(t.done() for t in tasks)
                srv.proc.send_signal(signal.SIGTERM)
                term.set()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                return short_ids, states, results

        short_ids, states, results = asyncio.run(traffic())
        assert not [r for r in results if isinstance(r, BaseException)], results  # in-flight streams were answered
        for s in states:
            assert s["done"] and s["finish_reason"] == "length", s  # each ran to its end and said [DONE]
            assert s["after_term"] > 0, s  # ... and was still streaming when SIGTERM arrived
        assert srv.proc.wait(120) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown
        _, alive = psutil.wait_procs(kids, timeout=60)
        assert not alive, f"engine processes left after SIGTERM: {alive}"
    finally:
        srv.stop(signal.SIGKILL)
    rows = open_database(srv.db_path).query("SELECT id, status, key_id, stream, completion_tokens FROM requests")
    assert len(rows) == 1 + 12 + n_streams  # the 401 is a request too (on an inference route)
    by_id = {r["id"]: r for r in rows}
    assert set(short_ids) <= set(by_id)
    for s in states:
        row = by_id[s["id"]]
        assert row["status"] == 200 and row["stream"] is True and row["completion_tokens"] == max_tokens
    assert sorted(r["status"] for r in rows).count(200) == 12 + n_streams
    assert {r["key_id"] for r in rows if r["status"] == 200} == {infer_key["id"]}  # the key id, never the secret
    assert not any(infer_key["secret"] in json.dumps(r, default=str) for r in rows)


def _wait_first_flush(srv, timeout_s: float = 60) -> str:
    """One request, then wait until the writer has written a row (its first flush opens the database file)."""
    r = httpx.post(
        srv.url + "/v1/completions", json={"model": srv.base_name, "prompt": "Hi", "max_tokens": 1}, timeout=60
    )
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = httpx.get(srv.url + "/metrics", timeout=30).text
        written = [ln for ln in text.splitlines() if ln.startswith("tuneloop_log_rows_written_total")]
        if written and float(written[0].split()[-1]) >= 1:
            return r.headers["x-request-id"]
        time.sleep(0.1)
    raise AssertionError("the request log wrote nothing within 60 s")


def test_sigkill_loses_at_most_the_last_flush_interval_and_leaves_no_engine_process(tiny_model, tmp_path):
    from tuneloop.db import open_database

    srv = start_server(tmp_path / "home", tiny_model, env={"TUNELOOP_LOG__FLUSH_INTERVAL_S": str(FLUSH_INTERVAL_S)})
    kids = _engine_children(srv)
    warm_up = _wait_first_flush(srv)
    received: list[tuple[float, str]] = []  # (client-side monotonic receive time, request id) of each 200
    others: list[int] = []
    cond, stop = threading.Condition(), threading.Event()

    def traffic():
        with httpx.Client(base_url=srv.url, timeout=30) as h:
            while not stop.is_set():
                try:
                    r = h.post("/v1/completions", json={"model": srv.base_name, "prompt": "Hello", "max_tokens": 4})
                except httpx.HTTPError:
                    return
                t = time.monotonic()
                with cond:
                    if r.status_code == 200 and r.json()["id"] == r.headers["x-request-id"]:
                        received.append((t, r.headers["x-request-id"]))
                    else:
                        others.append(r.status_code)
                    cond.notify_all()

    def durable() -> int:
        cutoff = time.monotonic() - FLUSH_INTERVAL_S - COMMIT_S
        return sum(t < cutoff for t, _ in received)

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for t in threads:
        t.start()
    leftovers: list[psutil.Process] = []
    try:
        with cond:  # kill once 30 responses are older than the durability bound (and traffic still flows)
            assert cond.wait_for(lambda: durable() >= 30 or not any(t.is_alive() for t in threads), timeout=120)
        assert all(t.is_alive() for t in threads), others
        kill_t = time.monotonic()
        os.kill(srv.proc.pid, signal.SIGKILL)  # the server process alone, mid-traffic, as an OOM killer would
        assert srv.proc.wait(30) == -signal.SIGKILL
        _, leftovers = psutil.wait_procs(kids, timeout=30)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        for p in leftovers:
            p.kill()
        srv.stop(signal.SIGKILL)
    assert not leftovers, f"engine processes orphaned by SIGKILL of the server: {leftovers}"
    assert not others
    rows = open_database(srv.db_path).query("SELECT id, status FROM requests")  # the file opens after the kill
    stored = {r["id"] for r in rows}
    cutoff = kill_t - FLUSH_INTERVAL_S - COMMIT_S
    must = {rid for t, rid in received if t < cutoff}
    assert len(must) >= 30
    assert not must - stored, f"{len(must - stored)} of {len(must)} responses older than the bound were lost"
    answered = {warm_up} | {rid for _, rid in received}
    assert len(stored - answered) <= 4  # only requests in flight at the kill (one per client) lack a response
    assert all(r["status"] == 200 for r in rows)


def test_health_and_readiness_of_a_fresh_server_with_its_engine_core_in_its_own_process(default_server):
    """The shipped mode: the engine core is a child process; the server is live, ready and serves through it."""
    srv = default_server
    kids = descendants(srv.proc.pid)
    assert any("EngineCore" in k.name() for k in kids), kids
    assert all(k.is_running() for k in kids)
    assert httpx.get(srv.url + "/healthz").json()["status"] == "ok"
    assert httpx.get(srv.url + "/readyz").json()["status"] == "ready"
    r = httpx.post(
        srv.url + "/v1/chat/completions",
        json={"model": srv.base_name, "messages": MSG, "max_tokens": 4},
        timeout=120,
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(srv.url + "/v1/models").json()["data"][0]["id"] == srv.base_name
