"""The OpenAI-compatible API as a client sees it: the official ``openai`` client against a live ``tuneloop serve``."""

from __future__ import annotations

import json

import httpx
import pytest
from fixtures_server import read_requests, sse_events

pytestmark = [pytest.mark.engine, pytest.mark.slow]

MSG = [{"role": "user", "content": "What is the capital of France?"}]


def test_health_ready_and_models(live_server):
    assert httpx.get(live_server.url + "/healthz").json()["status"] == "ok"
    assert httpx.get(live_server.url + "/readyz").json()["status"] == "ready"
    ids = [m.id for m in live_server.openai().models.list().data]
    assert ids[0] == live_server.base_name
    assert "production" in ids and "tiny-a" in ids  # registered adapter version of this base, loadable on use


def test_chat_completion_non_streaming(live_server):
    with live_server.http() as h:
        r = h.post(
            "/v1/chat/completions",
            json={"model": live_server.base_name, "messages": MSG, "max_tokens": 6, "temperature": 0},
        )
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-") and r.headers["x-request-id"] == body["id"]
    assert body["model"] == live_server.base_name == r.headers["x-model-version"]
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    u = body["usage"]
    assert (
        u["completion_tokens"] <= 6
        and u["prompt_tokens"] > 5
        and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    )

    # the official client parses the same answer; greedy decoding is deterministic
    c = live_server.openai().chat.completions.create(
        model=live_server.base_name, messages=MSG, max_tokens=6, temperature=0
    )
    assert c.choices[0].message.content == choice["message"]["content"]


def test_chat_streaming_with_usage_matches_non_streaming(live_server):
    client = live_server.openai()
    full = client.chat.completions.create(model=live_server.base_name, messages=MSG, max_tokens=8, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=live_server.base_name,
            messages=MSG,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-") and chunks[0].id != full.id
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == full.usage.completion_tokens
    assert last.usage.prompt_tokens == full.usage.prompt_tokens

    # the engine hands a non-streaming request its first token and then the rest at once, yet the
    # log still has its time to first token, like the streamed one's
    live_server.flush_log()
    rows = {r["id"]: r for r in read_requests(live_server.db_path, "id IN (?, ?)", [full.id, chunks[0].id])}
    assert rows[full.id]["response"] == rows[chunks[0].id]["response"] == text
    for row in rows.values():
        assert row["completion_tokens"] == full.usage.completion_tokens
        assert 0 < row["ttft_s"] < row["latency_s"]


def test_sse_wire_format(live_server):
    with live_server.http() as h:
        r = h.post(
            "/v1/chat/completions",
            json={"model": live_server.base_name, "messages": MSG, "max_tokens": 3, "stream": True},
        )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == r.headers["x-request-id"] for e in events[:-1])


def test_completions_streaming_and_not(live_server):
    client = live_server.openai()
    c = client.completions.create(
        model=live_server.base_name, prompt="The quick brown fox", max_tokens=5, temperature=0
    )
    assert c.object == "text_completion" and c.id.startswith("cmpl-")
    assert c.usage.completion_tokens == 5 and c.choices[0].finish_reason == "length"
    chunks = list(
        client.completions.create(
            model=live_server.base_name,
            prompt="The quick brown fox",
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.choices[0].text
    assert chunks[-1].usage.total_tokens == c.usage.total_tokens


def test_completions_batch_of_prompts(live_server):
    c = live_server.openai().completions.create(
        model=live_server.base_name, prompt=["Hello", "The capital of France"], max_tokens=3, temperature=0
    )
    assert [ch.index for ch in c.choices] == [0, 1]
    single = live_server.openai().completions.create(
        model=live_server.base_name, prompt="The capital of France", max_tokens=3, temperature=0
    )
    assert c.choices[1].text == single.choices[0].text


def test_n_choices_seed_and_stop(live_server):
    client = live_server.openai()
    r = client.chat.completions.create(
        model=live_server.base_name, messages=MSG, max_tokens=6, n=3, temperature=1.0, seed=7
    )
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2]
    again = client.chat.completions.create(
        model=live_server.base_name, messages=MSG, max_tokens=6, n=3, temperature=1.0, seed=7
    )
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]  # seeded

    # stop: take two characters the model produces greedily (after its first one) and stop on them
    full = (
        client.completions.create(model=live_server.base_name, prompt="Hello there", max_tokens=12, temperature=0)
        .choices[0]
        .text
    )
    starts = [i for i in range(1, len(full) - 1) if not (full[i : i + 2].isspace() or "\ufffd" in full[i : i + 2])]
    assert starts, f"12 greedy tokens gave no text to stop on: {full!r}"
    stop = full[starts[0] : starts[0] + 2]
    cut = client.completions.create(
        model=live_server.base_name, prompt="Hello there", max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[: full.index(stop)]


def test_logprobs(live_server):
    client = live_server.openai()
    r = client.chat.completions.create(
        model=live_server.base_name, messages=MSG, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-4  # greedy picks the most likely token
    c = client.completions.create(model=live_server.base_name, prompt="Hello", max_tokens=3, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert "".join(lp.tokens) == c.choices[0].text


def test_text_content_parts_are_accepted(live_server):
    client = live_server.openai()
    a = client.chat.completions.create(
        model=live_server.base_name,
        max_tokens=4,
        temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}],
    )
    b = client.chat.completions.create(model=live_server.base_name, messages=MSG, max_tokens=4, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_openapi_schema_documents_the_api(live_server):
    schema = httpx.get(live_server.url + "/schema/openapi.json").json()
    for path in (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/admin/adapters",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in schema["paths"], path
    req = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {
        "model",
        "messages",
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "seed",
        "logprobs",
        "stream",
    } <= set(req)
    assert "400" in schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    json.dumps(schema)
