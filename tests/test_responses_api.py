"""``POST /v1/responses`` as a client sees it: the official ``openai`` client against the session's live server.

The tiny random model writes gibberish, so these tests check plumbing: the SDK parses the response and its
events, token counts agree with the request log, a cut answer is ``incomplete``, the streamed deltas add up
to the final text, the prompt is the chat prompt (same tokens and greedy text as ``/v1/chat/completions``),
the response id is the request-log id feedback is posted with, and refusals name their parameter.
"""

from __future__ import annotations

import json
from datetime import timedelta

import httpx
import pytest
from fixtures_server import read_requests

from tuneloop.db import utcnow


def live(test):
    """The marks of a test on the session's live server (a real engine)."""
    return pytest.mark.slow(pytest.mark.engine(test))


QUESTION = "What is the capital of France?"
INSTRUCTIONS = "Answer in one word."


def logged(live_server, request_id: str) -> dict:
    live_server.flush_log()
    (row,) = read_requests(live_server.db_path, "id = ?", [request_id])
    return row


def as_json(v):
    return json.loads(v) if isinstance(v, str) else v


@live
def test_create_parses_with_the_openai_client_and_is_logged(live_server):
    client = live_server.openai()
    raw = client.responses.with_raw_response.create(
        model=live_server.base_name, input=QUESTION, instructions=INSTRUCTIONS, max_output_tokens=5, temperature=0
    )
    r = raw.parse()
    assert r.id.startswith("resp_") and raw.headers["x-request-id"] == r.id
    assert r.object == "response" and r.model == live_server.base_name == raw.headers["x-model-version"]
    assert r.output_text and r.instructions == INSTRUCTIONS and r.max_output_tokens == 5 and r.temperature == 0
    (msg,) = r.output
    assert msg.type == "message" and msg.role == "assistant" and msg.id == "msg_" + r.id.removeprefix("resp_")
    assert [c.type for c in msg.content] == ["output_text"] and msg.content[0].text == r.output_text
    assert r.tools == [] and r.tool_choice == "auto" and r.error is None and r.text.format.type == "text"
    u = r.usage
    assert u.total_tokens == u.input_tokens + u.output_tokens and 0 < u.output_tokens <= 5
    assert u.input_tokens_details.cached_tokens == 0 and u.output_tokens_details.reasoning_tokens == 0
    # the random model rarely stops within 5 tokens; either way status and details agree with the log
    row = logged(live_server, r.id)
    if row["finish_reason"] == "length":
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
        assert msg.status == "incomplete" and u.output_tokens == 5
    else:
        assert r.status == "completed" and r.incomplete_details is None and msg.status == "completed"
    assert row["route"] == "responses" and row["status"] == 200 and row["stream"] is False
    assert row["model_version"] == live_server.base_name and row["response"] == r.output_text
    assert (row["prompt_tokens"], row["completion_tokens"]) == (u.input_tokens, u.output_tokens)
    assert as_json(row["prompt"]) == [
        {"role": "system", "content": INSTRUCTIONS},
        {"role": "user", "content": QUESTION},
    ]
    assert as_json(row["params"]) == {"max_output_tokens": 5, "temperature": 0}
    assert 0 < row["ttft_s"] <= row["latency_s"]


@live
def test_a_cut_answer_is_incomplete(live_server):
    r = live_server.openai().responses.create(
        model=live_server.base_name, input="Tell me a long story about the sea.", max_output_tokens=1, temperature=0
    )
    if logged(live_server, r.id)["finish_reason"] != "length":  # the one token was end-of-sequence
        pytest.skip("the tiny model stopped at once")
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 1 and r.output[0].status == "incomplete"


@live
def test_message_items_render_like_the_same_chat(live_server):
    """`input` as messages with input_text / output_text parts is the chat prompt of the same turns."""
    client = live_server.openai()
    turns = [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": QUESTION},
    ]
    items = [
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "Hello "}, {"type": "input_text", "text": "there"}],
        },
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hi! How can I help?", "annotations": []}]},
        {"role": "user", "content": QUESTION},
    ]
    r = client.responses.create(
        model=live_server.base_name, input=items, instructions=INSTRUCTIONS, max_output_tokens=6, temperature=0
    )
    chat = client.chat.completions.create(
        model=live_server.base_name,
        messages=[{"role": "system", "content": INSTRUCTIONS}, *turns],
        max_tokens=6,
        temperature=0,
    )
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.output_text == chat.choices[0].message.content  # greedy: the same answer
    assert as_json(logged(live_server, r.id)["prompt"]) == [{"role": "system", "content": INSTRUCTIONS}, *turns]

    # a previous response's output items can be sent back as the assistant turn
    again = client.responses.create(
        model=live_server.base_name,
        input=[
            {"role": "user", "content": QUESTION},
            *[o.model_dump(exclude_none=True) for o in r.output],
            {"role": "user", "content": "Why?"},
        ],
        max_output_tokens=2,
    )
    prompt = as_json(logged(live_server, again.id)["prompt"])
    assert prompt[1] == {"role": "assistant", "content": r.output_text} and prompt[2]["content"] == "Why?"


@live
def test_streaming_events_in_order_add_up_to_the_final_response(live_server):
    client = live_server.openai()
    whole = client.responses.create(
        model=live_server.base_name, input=QUESTION, instructions=INSTRUCTIONS, max_output_tokens=8, temperature=0
    )
    stream = client.responses.create(
        model=live_server.base_name,
        input=QUESTION,
        instructions=INSTRUCTIONS,
        max_output_tokens=8,
        temperature=0,
        stream=True,
    )
    request_id = stream.response.headers["x-request-id"]
    events = list(stream)
    types = [e.type for e in events]
    n_deltas = types.count("response.output_text.delta")
    final_type = "response.incomplete" if whole.status == "incomplete" else "response.completed"
    assert n_deltas >= 1
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * n_deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        final_type,
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    created, final = events[0].response, events[-1].response
    assert created.id == final.id == request_id and created.status == "in_progress" and created.output == []
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-4].text == events[-3].part.text == events[-2].item.content[0].text == final.output_text
    assert text == whole.output_text and final.status == whole.status  # greedy: the same as the whole answer
    assert final.usage.model_dump() == whole.usage.model_dump()
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")} | {events[2].item.id, events[-2].item.id}
    assert item_ids == {final.output[0].id}
    row = logged(live_server, request_id)
    assert row["route"] == "responses" and row["stream"] is True and row["response"] == text
    assert (row["prompt_tokens"], row["completion_tokens"]) == (final.usage.input_tokens, final.usage.output_tokens)


@live
def test_stream_wire_format_names_events_and_sends_no_done(live_server):
    with live_server.http() as h:
        r = h.post(
            "/v1/responses",
            json={"model": live_server.base_name, "input": QUESTION, "max_output_tokens": 3, "stream": True},
        )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in r.text.split("\n\n") if b]
    assert blocks and not any(b.startswith("data: [DONE]") for b in blocks)
    for b in blocks:
        event, data = b.split("\n")
        assert event.startswith("event: ") and data.startswith("data: ")
        assert json.loads(data.removeprefix("data: "))["type"] == event.removeprefix("event: ")


@live
def test_feedback_on_a_response_id_feeds_the_training_candidates(live_server):
    since = utcnow() - timedelta(seconds=1)
    r = live_server.openai().responses.create(
        model=live_server.base_name, input=QUESTION, instructions=INSTRUCTIONS, max_output_tokens=3
    )
    with live_server.http() as h:
        fb = h.post("/v1/feedback", json={"request_id": r.id, "rating": "down", "correction": "Paris."})
        assert fb.status_code == 201, fb.text
        assert fb.json()["request_id"] == r.id and fb.json()["model_version"] == live_server.base_name
        assert h.get(f"/v1/feedback/{r.id}").json()["data"][0]["correction"] == "Paris."

    from tuneloop.feedback.candidates import read_candidates

    live_server.flush_log()
    counts: dict[str, int] = {}
    found = [c for c in read_candidates(live_server.db(), since, utcnow(), None, counts) if c.request_id == r.id]
    assert len(found) == 1
    assert found[0].messages == [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}]
    assert found[0].correction == found[0].target == "Paris."


@live
def test_truncation_auto_drops_the_oldest_turns(live_server):
    long = "word " * 1500  # far past the 512-token context of the session server
    items = [
        {"role": "user", "content": long},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "hi"},
    ]
    body = {"model": live_server.base_name, "input": items, "instructions": INSTRUCTIONS, "max_output_tokens": 4}
    with live_server.http() as h:
        refused = h.post("/v1/responses", json=body)
        kept = h.post("/v1/responses", json={**body, "truncation": "auto"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "input"
    assert refused.json()["error"]["code"] == "context_length_exceeded"
    assert kept.status_code == 200, kept.text
    assert kept.json()["truncation"] == "auto"
    assert as_json(logged(live_server, kept.json()["id"])["prompt"]) == [
        {"role": "system", "content": INSTRUCTIONS},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "hi"},
    ]


@live
@pytest.mark.parametrize(
    "extra,param",
    [
        ({"previous_response_id": "resp_0123"}, "previous_response_id"),
        ({"frobnicate": True}, "frobnicate"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"max_output_tokens": 100_000}, "max_output_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input"),
    ],
)
def test_refusals_are_400_naming_the_parameter_and_logged(live_server, extra, param):
    with live_server.http() as h:
        r = h.post("/v1/responses", json={"model": live_server.base_name, "input": QUESTION, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    if param == "previous_response_id":
        assert "does not store responses" in err["message"] and "input" in err["message"]
    if param == "frobnicate":
        assert "frobnicate" in err["message"]
    rid = r.headers["x-request-id"]
    assert rid.startswith("resp_")
    row = logged(live_server, rid)
    assert row["route"] == "responses" and row["status"] == 400


@live
def test_the_sdk_raises_bad_request_for_previous_response_id(live_server):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        live_server.openai().responses.create(
            model=live_server.base_name, input=QUESTION, previous_response_id="resp_0123"
        )
    assert e.value.status_code == 400 and e.value.param == "previous_response_id"


@live
def test_openapi_documents_the_route(live_server):
    schema = httpx.get(live_server.url + "/schema/openapi.json").json()
    op = schema["paths"]["/v1/responses"]["post"]
    assert {"400", "401", "404"} <= set(op["responses"])
    props = schema["components"]["schemas"]["ResponsesRequest"]["properties"]
    assert {"model", "input", "instructions", "max_output_tokens", "stream", "previous_response_id", "tools"} <= set(
        props
    )


def test_an_engine_error_mid_stream_is_one_error_event_and_is_logged():
    """GenerationJob.sse with the Responses framing, over an engine that fails after one delta (no server)."""
    import asyncio
    import time
    from types import SimpleNamespace

    from tuneloop.server.engine import Delta, EngineUnavailable
    from tuneloop.server.generation import GenerationJob
    from tuneloop.server.request_context import RequestContext
    from tuneloop.server.responses_protocol import ResponsesRequest
    from tuneloop.server.responses_serving import _Events, _Shape

    class FailingEngine:
        async def generate(self, prompt_ids, sampling_params, request_id, adapter=None):
            yield Delta(0, "Hel", 1)
            raise EngineUnavailable("engine stopped")

    records = []
    request = SimpleNamespace(
        app=SimpleNamespace(state=SimpleNamespace(log_writer=SimpleNamespace(submit=records.append))), headers={}
    )
    ctx = RequestContext(id="resp_x", route="responses", t0=time.perf_counter(), received_at=utcnow())
    job = GenerationJob(request, ctx, FailingEngine(), [[1, 2, 3]], None, None, 1)  # type: ignore[arg-type]
    events = _Events(_Shape(ctx.id, job.created, "m", ResponsesRequest(model="m", input="hi"), None))

    async def read() -> bytes:
        return b"".join([b async for b in events.sse(job)])

    body = asyncio.run(read())
    blocks = [b.split("\n") for b in body.decode().split("\n\n") if b]
    names = [e.removeprefix("event: ") for e, _ in blocks]
    payloads = [json.loads(d.removeprefix("data: ")) for _, d in blocks]
    assert (
        names
        == [p["type"] for p in payloads]
        == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "error",
        ]
    )
    assert [p["sequence_number"] for p in payloads] == list(range(6))
    assert payloads[-1]["code"] == "engine_unavailable" and "engine stopped" in payloads[-1]["message"]
    (rec,) = records
    assert rec.status == 503 and rec.response == "Hel" and rec.route == "responses"


def test_text_format_json_schema_is_enforced_streaming_or_not(live_server):
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}, "sunny": {"type": "boolean"}},
        "required": ["city", "sunny"],
        "additionalProperties": False,
    }
    fmt = {"format": {"type": "json_schema", "name": "weather", "schema": schema, "strict": True}}
    client = live_server.openai()
    r = client.responses.create(
        model=live_server.base_name, input="Weather in Paris?", text=fmt, temperature=1.0, max_output_tokens=100
    )
    assert r.status == "completed" and r.text.format.type == "json_schema" and r.text.format.name == "weather"
    jsonschema.validate(json.loads(r.output_text), schema)
    events = list(
        client.responses.create(
            model=live_server.base_name, input="Weather in Rome?", text=fmt, max_output_tokens=100, stream=True
        )
    )
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    jsonschema.validate(json.loads(text), schema)
    # an open schema: greedy (the Responses API has no seed) on the prompt chat's json_object test sends
    obj = client.responses.create(
        model=live_server.base_name,
        input="What is the weather in Paris?",
        text={"format": {"type": "json_object"}},
        temperature=0,
        max_output_tokens=400,
    )
    assert obj.status == "completed" and isinstance(json.loads(obj.output_text), dict)
