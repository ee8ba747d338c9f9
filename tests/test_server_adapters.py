"""Adapters and routing on a live server: by name, admin load/unload (also under load), aliases and canary split."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import httpx
import pytest
from fixtures_server import read_requests

pytestmark = [pytest.mark.engine, pytest.mark.slow]

MSG = [{"role": "user", "content": "Say something nice."}]


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


def test_load_and_unload_under_load_fail_no_request(live_server, tiny_adapters):
    client = live_server.async_openai()

    async def one(model: str, i: int, stream: bool) -> str:
        if stream:
            s = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=24, stream=True
            )
            text = ""
            async for c in s:
                text += (c.choices[0].delta.content or "") if c.choices else ""
            return text
        r = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=24
        )
        return r.choices[0].message.content

    async def stream_until_done(model: str, started: asyncio.Event) -> int:
        s = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=48, stream=True
        )
        n = 0
        async for c in s:
            n += 1
            if c.choices and c.choices[0].delta.content:
                started.set()
        return n

    async def churn() -> int:
        cycles = 0
        async with httpx.AsyncClient(base_url=live_server.url, timeout=120) as h:
            for _ in range(3):
                r = await h.post("/admin/adapters", json={"path": str(tiny_adapters["b"]), "name": "churn-b"})
                assert r.status_code == 201, r.text
                # a stream on the adapter being unloaded (already producing tokens) must finish, not fail
                started = asyncio.Event()
                held = asyncio.ensure_future(stream_until_done("churn-b", started))
                await asyncio.wait_for(started.wait(), 120)
                r = await h.delete("/admin/adapters/churn-b")
                assert r.status_code == 200, r.text
                n_chunks = await held
                assert n_chunks > 1
                cycles += 1
        return cycles

    async def main():
        traffic = [one(live_server.base_name if i % 2 else "tiny-a", i, bool(i % 3)) for i in range(24)]
        results = await asyncio.gather(churn(), *traffic, return_exceptions=True)
        return results

    results = asyncio.run(main())
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures
    assert results[0] == 3


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

        served = {}
        for u in range(24):
            first = chat(live_server, "production", user=f"user-{u}", max_tokens=1)
            second = chat(live_server, "production", user=f"user-{u}", max_tokens=1)
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
