"""Adapters and routing on a live server: by name, admin load/unload (also under load), aliases and canary split."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
from fixtures_server import read_requests

pytestmark = [pytest.mark.engine, pytest.mark.slow]

MSG = [{"role": "user", "content": "Say something nice."}]
CYCLES = 2  # load + unload cycles of the adapter churned under load


def chat(srv, model: str, **kw) -> httpx.Response:
    body = {"model": model, "messages": MSG, "max_tokens": 6, "temperature": 0, **kw}
    return httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120)


def admin(srv, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, srv.url + "/admin" + path, timeout=120, **kw)


def test_registered_adapter_version_loads_on_first_use(live_server):
    base = chat(live_server, live_server.base_name)
    r = chat(live_server, "tiny-a")
    assert r.status_code == 200, r.text
    assert r.headers["x-model-version"] == "tiny-a" and r.json()["model"] == "tiny-a"
    assert (
        r.json()["choices"][0]["message"]["content"] != base.json()["choices"][0]["message"]["content"]
    )  # the LoRA changes the output
    held = admin(live_server, "GET", "/adapters").json()
    assert any(a["name"] == "tiny-a" and a["version"] == "tiny-a" and a["rank"] == 8 for a in held["adapters"])


def test_admin_load_by_path_serve_and_unload(live_server, tiny_adapters):
    r = admin(live_server, "POST", "/adapters", json={"path": str(tiny_adapters["b"]), "name": "ad-b"})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "ad-b" and r.json()["rank"] == 8
    assert (
        admin(live_server, "POST", "/adapters", json={"path": str(tiny_adapters["b"]), "name": "ad-b"}).status_code
        == 200
    )
    assert "ad-b" in [m.id for m in live_server.openai().models.list().data]
    assert chat(live_server, "ad-b").status_code == 200
    r = admin(live_server, "DELETE", "/adapters/ad-b")
    assert r.status_code == 200 and r.json()["name"] == "ad-b"
    gone = chat(live_server, "ad-b")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert admin(live_server, "DELETE", "/adapters/ad-b").status_code == 404


def test_bad_adapters_are_refused_with_clear_errors(live_server, tiny_adapters, tmp_path):
    def load(**body):
        return admin(live_server, "POST", "/adapters", json=body)

    r = load(path=str(tmp_path / "missing"), name="x")
    assert r.status_code == 400 and "does not exist" in r.json()["error"]["message"]
    (tmp_path / "empty").mkdir()
    r = load(path=str(tmp_path / "empty"), name="x")
    assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"]
    r = load(path=str(tiny_adapters["wide"]), name="x")
    assert r.status_code == 400 and "max_lora_rank" in r.json()["error"]["message"]

    other_base = tmp_path / "other-base"
    other_base.mkdir()
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 256, "model_type": "llama"}
    (other_base / "config.json").write_text(json.dumps(cfg))
    wrong = tmp_path / "wrong-base"
    shutil.copytree(tiny_adapters["a"], wrong)
    ac = json.loads((wrong / "adapter_config.json").read_text())
    ac["base_model_name_or_path"] = str(other_base)
    (wrong / "adapter_config.json").write_text(json.dumps(ac))
    r = load(path=str(wrong), name="x")
    assert r.status_code == 400 and "trained on base model" in r.json()["error"]["message"]

    # lm_head is outside engine.lora_target_modules (vLLM's LoRA output layer crashes with prompt logprobs)
    head = tmp_path / "lm-head"
    shutil.copytree(tiny_adapters["a"], head)
    ac = json.loads((head / "adapter_config.json").read_text())
    ac["target_modules"] = ["q_proj", "v_proj", "lm_head"]
    (head / "adapter_config.json").write_text(json.dumps(ac))
    r = load(path=str(head), name="x")
    assert r.status_code == 400, r.text
    assert "lm_head" in r.json()["error"]["message"] and "lora_target_modules" in r.json()["error"]["message"]

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_adapters["a"], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    r = load(path=str(corrupt), name="x")
    assert r.status_code == 400 and "does not load" in r.json()["error"]["message"], r.text

    assert load(version="no-such-version").status_code == 404
    assert load(version="tiny-a", path=str(tiny_adapters["a"])).status_code == 400
    assert load(path=str(tiny_adapters["b"]), name="production").status_code == 409
    names = [a["name"] for a in admin(live_server, "GET", "/adapters").json()["adapters"]]
    assert "x" not in names
    assert chat(live_server, live_server.base_name).status_code == 200  # the engine is still healthy


@dataclass
class Call:
    """One HTTP request as the client saw it (monotonic times)."""

    what: str
    start: float
    end: float = math.inf
    status: int | None = None
    body: dict | None = None


def _spans(calls: list[Call], admin_call: Call) -> list[Call]:
    """The requests in flight for the whole of ``admin_call``: started before it was sent, ended after its answer."""
    return [c for c in calls if c.start < admin_call.start and c.end > admin_call.end]


def _is_openai_error(body: dict | None) -> bool:
    err = (body or {}).get("error")
    return isinstance(err, dict) and isinstance(err.get("message"), str) and "type" in err and "code" in err


def test_load_and_unload_under_load_fail_no_request(live_server, tiny_adapters):
    """Traffic on the base, ``tiny-a`` and the adapter being churned overlaps every load and unload; no request
    fails: those on other models and the streams in flight get a 200, those sent to the adapter while it is
    unloaded a 200 or a clean OpenAI-style 4xx, never a 5xx."""
    traffic: list[Call] = []  # base / tiny-a requests, sent throughout
    on_churn: list[Call] = []  # requests sent to the adapter while it is being unloaded
    admin_calls: list[Call] = []
    witnesses: list[asyncio.Future] = []
    stop = asyncio.Event()
    answered = asyncio.Condition()  # notified whenever a request gets its answer

    async def until(pred) -> None:
        async with answered:
            await asyncio.wait_for(answered.wait_for(pred), 120)

    async def finished(c: Call) -> Call:
        c.end = time.monotonic()
        async with answered:
            answered.notify_all()
        return c

    async def request(h: httpx.AsyncClient, model: str, i: int, stream: bool, log: list[Call], max_tokens=24):
        body = {"model": model, "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": max_tokens}
        c = Call(model, time.monotonic())
        log.append(c)
        if stream:
            async with h.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                text = await r.aread()
                c.status = r.status_code
                c.body = {"done": text.rstrip().endswith(b"data: [DONE]")} if r.status_code == 200 else json.loads(text)
        else:
            r = await h.post("/v1/chat/completions", json=body)
            c.status, c.body = r.status_code, r.json()
        return await finished(c)

    async def background(h: httpx.AsyncClient, worker: int) -> None:
        i = 0
        while not stop.is_set():
            model = live_server.base_name if (i + worker) % 2 else "tiny-a"
            await request(h, model, i, stream=bool(i % 3), log=traffic, max_tokens=32)
            i += 1

    async def hammer(h: httpx.AsyncClient, name: str, done: asyncio.Event, every_s: float, most: int = 1000) -> None:
        """A request to ``name`` every ``every_s`` seconds (not waiting for the answers) until ``done``."""
        sent, i = [], 0
        while not done.is_set() and i < most:
            sent.append(asyncio.ensure_future(request(h, name, i, stream=bool(i % 2), log=on_churn, max_tokens=4)))
            i += 1
            await asyncio.sleep(every_s)
        await asyncio.gather(*sent)

    async def timed(h: httpx.AsyncClient, what: str, coro) -> httpx.Response:
        """``coro`` (an admin call) made while a long base-model stream, already producing tokens, is in flight."""
        started, returned = asyncio.Event(), asyncio.Event()
        witness = asyncio.ensure_future(
            first_token(h, live_server.base_name, started, traffic, max_tokens=400, cut=returned)
        )
        await asyncio.wait_for(started.wait(), 120)
        c = Call(what, time.monotonic())
        admin_calls.append(c)
        async with answered:
            answered.notify_all()
        r = await coro
        c.end, c.status = time.monotonic(), r.status_code
        returned.set()
        witnesses.append(witness)
        return r

    async def first_token(
        h: httpx.AsyncClient,
        model: str,
        started: asyncio.Event,
        log: list[Call],
        max_tokens: int = 16,
        cut: asyncio.Event | None = None,
    ) -> Call:
        """A greedy streaming request (long: no early end of text) that sets ``started`` on its first token;
        with ``cut``, it is closed at the first token received once ``cut`` is set (it was still generating)."""
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
        body |= {"stream": True, "temperature": 0}
        c = Call(model, time.monotonic())
        log.append(c)
        async with h.stream("POST", "/v1/chat/completions", json=body) as r:
            c.status = r.status_code
            async for line in r.aiter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    started.set()
                    if cut is not None and cut.is_set():
                        c.body = {"done": True, "cut": True}
                        break
                c.body = {"done": line == "data: [DONE]"} if line else c.body
        started.set()
        return await finished(c)

    async def churn(h: httpx.AsyncClient) -> int:
        cycles = 0
        for _ in range(CYCLES):
            r = await timed(
                h, "load", h.post("/admin/adapters", json={"path": str(tiny_adapters["b"]), "name": "churn-b"})
            )
            assert r.status_code == 201, r.text
            # a stream on the adapter being unloaded, already producing tokens, must finish, not fail
            started, unloaded = asyncio.Event(), asyncio.Event()
            mark = len(on_churn)  # this cycle's requests: the held stream, then the hammers'
            held = asyncio.ensure_future(first_token(h, "churn-b", started, on_churn))
            await asyncio.wait_for(started.wait(), 120)
            # and requests sent to it before, during and after the unload: 200 or a clean 4xx
            hammers = asyncio.ensure_future(hammer(h, "churn-b", unloaded, every_s=0.1))
            await until(lambda m=mark: any(c.end < math.inf for c in on_churn[m + 1 :]))  # one answered before
            unload_done = asyncio.Event()
            unloading = asyncio.ensure_future(timed(h, "unload", h.delete("/admin/adapters/churn-b")))
            await until(lambda: admin_calls[-1].what == "unload")  # the DELETE is on its way: send more meanwhile
            during = asyncio.ensure_future(hammer(h, "churn-b", unload_done, every_s=0.02, most=5))
            r = await unloading
            unload_done.set()
            await during
            assert r.status_code == 200, r.text
            unload = admin_calls[-1]
            await until(lambda u=unload: any(c.start > u.end and c.end < math.inf for c in on_churn))  # one sent after
            unloaded.set()
            await hammers
            assert (await held).status == 200 and held.result().body == {"done": True}
            cycles += 1
        return cycles

    async def main():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=live_server.url, timeout=120, limits=limits) as h:
            workers = [asyncio.ensure_future(background(h, w)) for w in range(2)]
            try:
                # the background traffic is flowing before the first admin call
                await until(lambda: sum(c.end < math.inf for c in traffic) >= 2)
                return await churn(h)
            finally:
                stop.set()
                await asyncio.gather(*workers, *witnesses, return_exceptions=True)

    assert asyncio.run(main()) == CYCLES
    assert [c.what for c in admin_calls] == ["load", "unload"] * CYCLES
    assert {c.status for c in admin_calls} == {200, 201}
    bad = [c for c in traffic if c.status != 200 or not c.body or "error" in c.body or c.body.get("done") is False]
    assert not bad, bad  # no request on the base or tiny-a failed
    for call in admin_calls:
        assert _spans(traffic, call), f"no request in flight across the whole {call}"
        if call.what == "unload":  # requests to the adapter itself were sent while it was unloaded
            assert any(call.start < c.start < call.end for c in on_churn), call
    statuses = {c.status for c in on_churn}
    assert 200 in statuses and 404 in statuses, statuses  # served before the unload, refused after it
    for c in on_churn:
        assert c.status is not None and c.status < 500, c
        assert c.status == 200 or (400 <= c.status < 500 and _is_openai_error(c.body)), c
        if c.status == 404:
            assert c.body["error"]["code"] == "model_not_found", c


def test_aliases_and_sticky_canary_split(live_server, tiny_adapters):
    from tuneloop.db import utcnow
    from tuneloop.ids import hash_path, new_id
    from tuneloop.registry import ModelVersion, register_version, set_stage

    db = live_server.db()
    assert chat(live_server, "canary").status_code == 404  # no canary yet
    register_version(
        db,
        ModelVersion(
            name="tiny-b",
            kind="adapter",
            base_model=str(tiny_adapters["b"].parent.parent / "x"),
            path=str(tiny_adapters["b"]),
            content_hash=hash_path(tiny_adapters["b"]),
        ),
    )
    # a version trained on another base is refused with a clear error
    r = chat(live_server, "tiny-b")
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_servable"

    base_path = httpx.get(live_server.url + "/admin/state").json()["base_model"]
    register_version(
        db,
        ModelVersion(
            name="tiny-b2",
            kind="adapter",
            base_model=base_path,
            path=str(tiny_adapters["b"]),
            content_hash=hash_path(tiny_adapters["b"]) + "2",
        ),
    )
    set_stage(db, "tiny-a", "production", actor="test")
    try:
        st = admin(live_server, "POST", "/state/refresh").json()
        assert st["production"] == "tiny-a"
        r = chat(live_server, "production")
        assert r.status_code == 200 and r.headers["x-model-version"] == "tiny-a"

        canary_id = new_id()
        db.execute(
            "INSERT INTO canaries (id, candidate, production, share, status, started_at) VALUES (?, ?, ?, ?, 'running', ?)",
            [canary_id, "tiny-b2", "tiny-a", 0.5, utcnow()],
        )
        set_stage(db, "tiny-b2", "canary", actor="test")
        deadline = time.monotonic() + 10  # the server re-reads deploy state by itself (state_refresh_s=0.5)
        while admin(live_server, "GET", "/state").json()["canary"] != "tiny-b2" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert admin(live_server, "GET", "/state").json()["canary_share"] == 0.5
        assert chat(live_server, "canary").headers["x-model-version"] == "tiny-b2"
        assert admin(live_server, "DELETE", "/adapters/tiny-b2").status_code == 409  # in use by the canary

        def twice(u: int) -> tuple[httpx.Response, httpx.Response]:
            return tuple(chat(live_server, "production", user=f"user-{u}", max_tokens=1) for _ in range(2))

        served = {}
        with ThreadPoolExecutor(8) as pool:  # users in parallel, each user's two requests one after the other
            for u, (first, second) in enumerate(pool.map(twice, range(24))):
                assert first.status_code == second.status_code == 200
                assert first.headers["x-model-version"] == second.headers["x-model-version"]  # sticky per user
                served[f"user-{u}"] = (first.headers["x-model-version"], first.headers["x-request-id"])
        versions = [v for v, _ in served.values()]
        assert 3 <= versions.count("tiny-b2") <= 21 and "tiny-a" in versions  # ~half each

        live_server.flush_log()
        rows = {r["id"]: r for r in read_requests(live_server.db_path, "model = 'production'")}
        for user, (version, rid) in served.items():
            row = rows[rid]
            assert row["user_id"] == user and row["model_version"] == version
            assert row["arm"] == ("canary" if version == "tiny-b2" else "production")
    finally:
        db.execute("UPDATE canaries SET status = 'rolled_back' WHERE status = 'running'")
        for name in ("tiny-a", "tiny-b2"):
            set_stage(db, name, "candidate", actor="test")
        admin(live_server, "POST", "/state/refresh")
