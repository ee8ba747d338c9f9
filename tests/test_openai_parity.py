"""OpenAI parameters as vLLM's server honours them, through the official ``openai`` client against ``tuneloop serve``.

Structured outputs (``response_format`` and vLLM's ``structured_outputs``), tool calling (``tools``,
``tool_choice``, ``parallel_tool_calls``, tool results in the conversation), completions with token-id prompts,
``echo`` and ``suffix``, ``/tokenize`` and ``/detokenize``, and a 400 naming every parameter the server does not
implement. The tiny model writes gibberish, so every guarantee here comes from the engine's constrained decoding,
not from the model.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from fixtures_server import read_requests, sse_events

pytestmark = [pytest.mark.engine, pytest.mark.slow]

MSG = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "sunny": {"type": "boolean"},
        "level": {"type": "integer", "enum": [1, 2, 3]},
    },
    "required": ["city", "sunny", "level"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]
TOOL_PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def _json_format(strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER_SCHEMA, "strict": strict}}


def _check_call(call) -> dict:
    """A tool call in OpenAI's shape whose arguments validate against its function's parameters."""
    assert call.type == "function" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, TOOL_PARAMS[call.function.name])
    return args


# -- structured outputs -------------------------------------------------------------------


def test_json_schema_response_validates_in_20_of_20_sampled_generations(live_server):
    c = live_server.openai().chat.completions.create(
        model=live_server.base_name,
        messages=MSG,
        response_format=_json_format(),
        n=20,
        temperature=1.0,
        seed=7,
        max_tokens=120,
    )
    assert len(c.choices) == 20
    texts = [ch.message.content for ch in c.choices]
    assert all(ch.finish_reason == "stop" for ch in c.choices), [ch.finish_reason for ch in c.choices]
    for t in texts:
        jsonschema.validate(json.loads(t), WEATHER_SCHEMA)
    assert len(set(texts)) > 1  # sampled, not one answer repeated: the guarantee held across different outputs


def test_json_schema_streaming_chat_and_completions_validate(live_server):
    client = live_server.openai()
    chunks = list(
        client.chat.completions.create(
            model=live_server.base_name,
            messages=MSG,
            response_format=_json_format(strict=False),
            stream=True,
            temperature=1.0,
            seed=3,
            max_tokens=120,
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 1  # really streamed
    jsonschema.validate(json.loads(text), WEATHER_SCHEMA)

    for stream in (False, True):
        out = client.completions.create(
            model=live_server.base_name,
            prompt="The weather as JSON:",
            extra_body={"response_format": _json_format()},
            temperature=1.0,
            seed=5,
            max_tokens=120,
            stream=stream,
        )
        text = "".join(ch.choices[0].text for ch in out if ch.choices) if stream else out.choices[0].text
        jsonschema.validate(json.loads(text), WEATHER_SCHEMA)


def test_json_object_response_is_a_json_object(live_server):
    c = live_server.openai().chat.completions.create(
        model=live_server.base_name,
        messages=MSG,
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=400,
    )
    assert c.choices[0].finish_reason == "stop", c.choices[0].message.content
    assert isinstance(json.loads(c.choices[0].message.content), dict)


def test_vllm_structured_outputs_choice_and_regex(live_server):
    client = live_server.openai()
    c = client.chat.completions.create(
        model=live_server.base_name,
        messages=MSG,
        max_tokens=10,
        temperature=1.0,
        n=5,
        extra_body={"structured_outputs": {"choice": ["sunny", "rainy"]}},
    )
    assert {ch.message.content for ch in c.choices} <= {"sunny", "rainy"}
    c = client.completions.create(
        model=live_server.base_name,
        prompt="A year:",
        max_tokens=10,
        temperature=1.0,
        extra_body={"structured_outputs": {"regex": "19[0-9]{2}"}},
    )
    assert len(c.choices[0].text) == 4 and c.choices[0].text.startswith("19") and c.choices[0].text.isdigit()


def test_an_invalid_json_schema_is_a_400_even_when_streaming(live_server):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": "a"}}}
    for stream in (False, True):
        with live_server.http() as h:
            r = h.post(
                "/v1/chat/completions",
                json={"model": live_server.base_name, "messages": MSG, "response_format": bad, "stream": stream},
            )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_integers_beyond_64_bits_in_a_schema_are_served_or_a_400_never_a_500(live_server):
    """JSON allows any integer; the engine core's msgpack does not (found by the OpenAPI contract fuzzing: a tool
    schema holding 12367322773053057024 failed the request with a 500). The schema reaches the engine as text: a
    big integer the grammar ignores (an annotation) is served, one it must enforce is xgrammar's 400."""
    ok = {"type": "object", "properties": {"n": {"type": "integer"}}, "x-big": 12367322773053057024}
    tool = {"type": "function", "function": {"name": "count", "parameters": {**ok, "x-low": -60915073571951566848}}}
    bound = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 12367322773053057024}}}
    with live_server.http() as h:

        def post(extra: dict) -> httpx.Response:
            body = {"model": live_server.base_name, "messages": MSG, "max_tokens": 300, "temperature": 0, **extra}
            return h.post("/v1/chat/completions", json=body)

        r = post({"tools": [tool], "tool_choice": "required"})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["tool_calls"], r.text
        r = post({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": ok}}})
        assert r.status_code == 200, r.text
        r = post({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": bound}}})
        assert r.status_code == 400 and "exceeds maximum limit" in r.json()["error"]["message"], r.text


# -- tools ---------------------------------------------------------------------------------


def test_tool_choice_required_yields_parseable_tool_calls(live_server):
    c = live_server.openai().chat.completions.create(
        model=live_server.base_name,
        messages=MSG,
        tools=TOOLS,
        tool_choice="required",
        temperature=1.0,
        seed=11,
        n=4,
        max_tokens=450,
    )
    for ch in c.choices:
        assert ch.finish_reason == "tool_calls" and ch.message.content is None, (ch.finish_reason, ch.message)
        assert len(ch.message.tool_calls) >= 1
        for call in ch.message.tool_calls:
            _check_call(call)


def test_parallel_tool_calls_false_allows_one_call(live_server):
    c = live_server.openai().chat.completions.create(
        model=live_server.base_name,
        messages=MSG,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=1.0,
        seed=2,
        n=6,
        max_tokens=150,
    )
    assert all(len(ch.message.tool_calls) == 1 for ch in c.choices)


def test_tool_choice_required_streams_tool_call_deltas(live_server):
    chunks = list(
        live_server.openai().chat.completions.create(
            model=live_server.base_name,
            messages=MSG,
            tools=TOOLS,
            tool_choice="required",
            temperature=1.0,
            seed=11,
            max_tokens=450,
            stream=True,
        )
    )
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas, "no tool-call deltas"
    calls: dict[int, dict] = {}
    for d in deltas:  # assemble as a client does: id and name once, arguments appended
        cur = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
        cur["id"] = d.id or cur["id"]
        if d.function is not None:
            cur["name"] = d.function.name or cur["name"]
            cur["arguments"] += d.function.arguments or ""
    for c in calls.values():
        assert c["id"].startswith("call_")
        jsonschema.validate(json.loads(c["arguments"]), TOOL_PARAMS[c["name"]])
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"


def test_named_tool_choice_calls_that_function_streaming_or_not(live_server):
    client = live_server.openai()
    choice = {"type": "function", "function": {"name": "get_time"}}
    c = client.chat.completions.create(
        model=live_server.base_name, messages=MSG, tools=TOOLS, tool_choice=choice, max_tokens=60, temperature=0
    )
    (call,) = c.choices[0].message.tool_calls
    assert call.function.name == "get_time" and c.choices[0].finish_reason == "stop"
    whole = _check_call(call)
    chunks = list(
        client.chat.completions.create(
            model=live_server.base_name,
            messages=MSG,
            tools=TOOLS,
            tool_choice=choice,
            max_tokens=60,
            temperature=0,
            stream=True,
        )
    )
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_time" and deltas[0].id.startswith("call_")
    args = "".join(d.function.arguments or "" for d in deltas)
    assert json.loads(args) == whole  # greedy: the same call, streamed as argument fragments
    assert len(deltas) > 2


def test_tool_choice_auto_parses_the_model_family_format(live_server):
    """``auto`` goes through vLLM's tool parser for the model family (ChatML -> hermes). The tiny model never
    writes a tool call by itself, so vLLM's ``structured_outputs.choice`` makes it write one in hermes format."""
    forced = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    client = live_server.openai()
    kw = dict(model=live_server.base_name, messages=MSG, tools=TOOLS, max_tokens=60, temperature=0)
    c = client.chat.completions.create(**kw, extra_body={"structured_outputs": {"choice": [forced]}})
    (call,) = c.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Rome"})
    assert c.choices[0].finish_reason == "tool_calls"

    chunks = list(
        client.chat.completions.create(**kw, stream=True, extra_body={"structured_outputs": {"choice": [forced]}})
    )
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "Rome"}
    assert not "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices).strip()

    plain = client.chat.completions.create(**kw, extra_body={"structured_outputs": {"choice": ["just text"]}})
    assert plain.choices[0].message.content == "just text" and not plain.choices[0].message.tool_calls
    assert plain.choices[0].finish_reason == "stop"


def test_tool_results_are_accepted_and_tools_are_logged(live_server):
    client = live_server.openai()
    messages = [
        *MSG,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    c = client.chat.completions.create(
        model=live_server.base_name, messages=messages, tools=TOOLS, tool_choice="required", max_tokens=300, seed=1
    )
    _check_call(c.choices[0].message.tool_calls[0])
    live_server.flush_log()
    (row,) = read_requests(live_server.db_path, "id = ?", [c.id])
    for k in ("params", "prompt", "tool_calls"):
        row[k] = json.loads(row[k]) if isinstance(row[k], str) else row[k]
    assert row["params"]["tools"] == TOOLS and row["params"]["tool_choice"] == "required"
    assert row["prompt"][1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert row["prompt"][2] == {"role": "tool", "content": '{"temp_c": 21}', "tool_call_id": "call_1"}
    assert row["finish_reason"] == "tool_calls"
    logged = row["tool_calls"]
    assert [x["function"]["name"] for x in logged] == [x.function.name for x in c.choices[0].message.tool_calls]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": _json_format()}, "response_format"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),  # no tool_call_id
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ],
)
def test_invalid_tool_requests_are_400_naming_the_parameter(live_server, body, param):
    with live_server.http() as h:
        r = h.post("/v1/chat/completions", json={"model": live_server.base_name, "messages": MSG, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# -- completions: token prompts, echo, suffix ------------------------------------------------------


def test_token_id_prompts_generate_like_their_text(live_server):
    client = live_server.openai()
    with live_server.http() as h:
        ids = h.post("/tokenize", json={"prompt": "The capital of France is"}).json()["tokens"]
    by_text = client.completions.create(
        model=live_server.base_name, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    by_ids = client.completions.create(model=live_server.base_name, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids) == by_text.usage.prompt_tokens
    two = client.completions.create(model=live_server.base_name, prompt=[ids, ids[:3]], max_tokens=4, temperature=0)
    assert len(two.choices) == 2 and two.usage.prompt_tokens == len(ids) + 3


def test_echo_returns_the_prompt_with_its_token_logprobs(live_server):
    client = live_server.openai()
    prompt = "The capital of France is"
    c = client.completions.create(
        model=live_server.base_name, prompt=prompt, echo=True, logprobs=1, max_tokens=3, temperature=0
    )
    ch = c.choices[0]
    assert ch.text.startswith(prompt)
    n_prompt = c.usage.prompt_tokens
    lp = ch.logprobs
    assert len(lp.tokens) == n_prompt + c.usage.completion_tokens
    assert lp.token_logprobs[0] is None and all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens[:n_prompt]) == prompt
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # max_tokens 0 with echo scores the prompt only (what log-likelihood evaluation sends)
    z = client.completions.create(model=live_server.base_name, prompt=prompt, echo=True, logprobs=0, max_tokens=0)
    assert z.choices[0].text == prompt and z.choices[0].logprobs.token_logprobs[1:] == lp.token_logprobs[1:n_prompt]


def test_suffix_is_refused_clearly(live_server):
    with pytest.raises(openai.BadRequestError) as e:
        live_server.openai().completions.create(model=live_server.base_name, prompt="def f(", suffix=")", max_tokens=4)
    assert e.value.body["param"] == "suffix" and "not supported" in e.value.body["message"]


# -- tokenize / detokenize -------------------------------------------------------------------------


def test_tokenize_and_detokenize_round_trip_as_in_vllm(live_server):
    with live_server.http() as h:
        t = h.post("/tokenize", json={"model": live_server.base_name, "prompt": "Hello there"}).json()
        assert t["count"] == len(t["tokens"]) and t["max_model_len"] == 512
        d = h.post("/detokenize", json={"model": live_server.base_name, "tokens": t["tokens"]}).json()
        assert d["prompt"] == "Hello there"
        chat = h.post("/tokenize", json={"messages": MSG}).json()
        r = h.post(
            "/v1/chat/completions",
            json={"model": live_server.base_name, "messages": MSG, "max_tokens": 1},
        ).json()
        assert chat["count"] == r["usage"]["prompt_tokens"]  # the same rendering as the chat route
        bad = h.post("/detokenize", json={"tokens": [10**9]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
        both = h.post("/tokenize", json={"prompt": "x", "messages": MSG})
        assert both.status_code == 400


# -- parameters the server does not implement --------------------------------------------------------

UNSUPPORTED = [
    ("/v1/chat/completions", "audio", {"voice": "alloy", "format": "mp3"}),
    ("/v1/chat/completions", "modalities", ["text", "audio"]),
    ("/v1/chat/completions", "prediction", {"type": "content", "content": "x"}),
    ("/v1/chat/completions", "reasoning_effort", "low"),
    ("/v1/chat/completions", "web_search_options", {}),
    ("/v1/chat/completions", "functions", [{"name": "f"}]),
    ("/v1/chat/completions", "function_call", "auto"),
    ("/v1/chat/completions", "service_tier", "auto"),
    ("/v1/chat/completions", "chat_template", "{{ messages }}"),
    ("/v1/chat/completions", "guided_json", {"type": "object"}),
    ("/v1/chat/completions", "temprature", 0.5),
    ("/v1/completions", "best_of", 2),
    ("/v1/completions", "tools", TOOLS),
    ("/v1/completions", "use_beam_search", True),
]


@pytest.mark.parametrize(("path", "param", "value"), UNSUPPORTED, ids=[f"{p}:{n}" for p, n, _ in UNSUPPORTED])
def test_unsupported_parameters_are_a_400_naming_them(live_server, path, param, value):
    body = {"model": live_server.base_name, param: value}
    body.update({"messages": MSG} if "chat" in path else {"prompt": "Hi"})
    with live_server.http() as h:
        r = h.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == "unsupported_parameter" and param in err["message"]


def test_vllm_sampling_extras_are_honoured(live_server):
    client = live_server.openai()
    c = client.chat.completions.create(
        model=live_server.base_name,
        messages=MSG,
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True, "min_tokens": 12, "top_k": 1, "repetition_penalty": 1.1},
    )
    assert c.usage.completion_tokens == 12 and c.choices[0].finish_reason == "length"
    with live_server.http() as h:
        tok = h.post("/tokenize", json={"prompt": "the", "add_special_tokens": False}).json()["tokens"][0]
        word = h.post("/detokenize", json={"tokens": [tok]}).json()["prompt"]
    biased = client.completions.create(
        model=live_server.base_name,
        prompt="Hi",
        max_tokens=5,
        temperature=0,
        logprobs=0,
        logit_bias={str(tok): 100},
        extra_body={"ignore_eos": True},
    )
    assert biased.choices[0].logprobs.tokens == [word] * 5  # +100 on one token makes it every greedy pick


def test_streamed_chat_without_tools_is_unchanged_by_parity_work(live_server):
    with live_server.http() as h:
        r = h.post(
            "/v1/chat/completions",
            json={"model": live_server.base_name, "messages": MSG, "max_tokens": 4, "stream": True},
        )
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert httpx.get(live_server.url + "/readyz").json()["status"] == "ready"
