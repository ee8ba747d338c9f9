"""Tool calling from the request log to the training tokens.

A chat request with tools is logged through the real request-log writer (its tool definitions in ``params``, the
raw tool-call text in ``response``, the parsed calls in ``tool_calls``), sampled by the real ``tuneloop feedback
sample`` into a registered dataset, read back from disk and tokenized the way the trainer does: the tokens must be
the server's rendering of that request (``render_prompt`` with its tools) followed by the raw text the model
emitted. The tiny model's ChatML template ignores ``tools``, so the rendering is also checked with a template that
prints them.
"""

from __future__ import annotations

import json
from datetime import timedelta

import duckdb

from tuneloop.db import utcnow
from tuneloop.ids import new_id
from tuneloop.monitoring.records import RequestRecord
from tuneloop.monitoring.requestlog import RequestLogWriter
from tuneloop.settings import LogSettings

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "description": "Local time in a city", "parameters": {"type": "object"}},
    },
]

# a conversation that already holds one tool round trip, then asks for another call
PROMPT = [
    {"role": "system", "content": "You are a travel assistant."},
    {"role": "user", "content": "What is the weather in Oslo?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 3}'},
    {"role": "assistant", "content": "It is 3 degrees in Oslo."},
    {"role": "user", "content": "And in Paris?"},
]
RAW = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
PARSED = [{"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]

# a template that renders tools and tool calls (Hermes-like), to see them reach the prompt tokens
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n"
    "{%- if message.tool_calls %}{%- for c in message.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>"
    "{%- endfor %}{%- else %}{{ message.content }}{%- endif %}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def log_requests(db, records: list[RequestRecord]) -> None:
    w = RequestLogWriter(db, LogSettings(flush_interval_s=60))
    for rec in records:
        assert w.submit(rec)
    assert w.flush() == len(records) and w.close() == 0


def chat_record(prompt, response, *, params=None, tool_calls=None, finish="stop") -> RequestRecord:
    return RequestRecord(
        id=new_id("chatcmpl-"),
        received_at=utcnow() - timedelta(minutes=5),
        route="chat.completions",
        status=200,
        model="production",
        model_version="v1",
        arm="production",
        prompt=prompt,
        response=response,
        finish_reason=finish,
        prompt_tokens=40,
        completion_tokens=20,
        stream=False,
        params=params or {},
        tool_calls=tool_calls,
    )


def strip_nulls(messages):
    """Messages as the server logged them (a loaded dataset has the optional fields null on other messages)."""
    from tuneloop.dataset_store import chat_message

    return [chat_message(m) for m in messages]


def test_a_logged_tool_call_request_is_sampled_into_a_chat_row_with_its_tools_and_trains_on_the_served_tokens(
    cli, db, home, tiny_model
):
    from transformers import AutoTokenizer

    from tuneloop.chat import completion_ids, render_prompt
    from tuneloop.dataset_store import load_splits
    from tuneloop.trainer.inputs import tokenize_sft

    params = {"temperature": 0.2, "tools": TOOLS, "tool_choice": "auto", "parallel_tool_calls": False}
    called = chat_record(PROMPT, RAW, params=params, tool_calls=PARSED, finish="tool_calls")
    corrected_prompt = [{"role": "user", "content": "What time is it in Tokyo?"}]
    wrong = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n</tool_call>'
    fixed = '<tool_call>\n{"name": "get_time", "arguments": {"city": "Tokyo"}}\n</tool_call>'
    corrected = chat_record(corrected_prompt, wrong, params={"tools": TOOLS}, finish="tool_calls")
    plain = chat_record([{"role": "user", "content": "Say hello."}], "Hello!", params={"temperature": 0.7})
    log_requests(db, [called, corrected, plain])
    stored = db.query("SELECT tool_calls, params->'$.tools' AS tools FROM requests WHERE id = ?", [called.id])[0]
    assert json.loads(stored["tool_calls"]) == PARSED and json.loads(stored["tools"]) == TOOLS
    with db.connect() as con:
        con.execute(
            "INSERT INTO feedback (id, request_id, correction, model_version, created_at) VALUES (?, ?, ?, 'v1', ?)",
            [new_id(), corrected.id, fixed, utcnow()],
        )

    cli(
        "feedback", "sample", "--name", "tools", "--window", "1h", "--strategy", "random",
        "--validation-fraction", "0", "--test-fraction", "0", "--no-dedup-against",
    )  # fmt: skip

    train = load_splits(db, "tools")["train"]
    rows = {r["request_id"]: r for r in train}
    assert set(rows) == {called.id, corrected.id, plain.id}
    row = rows[called.id]
    assert strip_nulls(row["messages"]) == [*PROMPT, {"role": "assistant", "content": RAW}]
    assert json.loads(row["tools"]) == TOOLS
    # a correction replaces the answer; the request's tools stay
    assert strip_nulls(rows[corrected.id]["messages"]) == [*corrected_prompt, {"role": "assistant", "content": fixed}]
    assert json.loads(rows[corrected.id]["tools"]) == TOOLS
    # a request without tools keeps the plain shape
    assert rows[plain.id]["tools"] is None
    assert strip_nulls(rows[plain.id]["messages"]) == [
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello!"},
    ]
    # the DPO pair of the correction carries the tools too
    (pair,) = [r for split in load_splits(db, "tools-pref").values() for r in split]
    assert strip_nulls(pair["prompt"]) == corrected_prompt and json.loads(pair["tools"]) == TOOLS
    assert strip_nulls(pair["chosen"]) == [{"role": "assistant", "content": fixed}]
    assert strip_nulls(pair["rejected"]) == [{"role": "assistant", "content": wrong}]

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    one = train.select([list(train["request_id"]).index(called.id)])
    served = render_prompt(tok, PROMPT, TOOLS) + completion_ids(tok, RAW)
    assert tokenize_sft(one, tok, 4096)[0]["input_ids"] == served

    tok.chat_template = TOOLS_TEMPLATE  # a template that renders the tools: they must reach the training tokens
    prompt_ids = render_prompt(tok, PROMPT, TOOLS)
    assert prompt_ids != render_prompt(tok, PROMPT)
    ex = tokenize_sft(one, tok, 4096)[0]
    assert ex["input_ids"] == prompt_ids + completion_ids(tok, RAW)
    assert ex["completion_mask"] == [0] * len(prompt_ids) + [1] * (len(ex["input_ids"]) - len(prompt_ids))
    text = tok.decode(ex["input_ids"][: len(prompt_ids)])
    assert "Current weather in a city" in text and "get_time" in text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' in text


def test_parquet_exports_written_before_the_tool_calls_column_read_it_as_null(tmp_path):
    """An export folder from before migration 5 (no tool_calls column in its files) still reads, tool_calls NULL."""
    from tuneloop.monitoring.sources import log_source, table_columns

    part = tmp_path / "logs" / "requests" / "date=2024-05-01" / "model_version=v1"
    part.mkdir(parents=True)
    # the files of an export: every column but the partition key, plus the exporting replica (added below)
    old = [(n, t) for n, t in table_columns("requests") if n not in ("tool_calls", "model_version", "replica")]
    given = {"id": "'r-old'", "received_at": "TIMESTAMP '2024-05-01 10:00:00'", "route": "'chat.completions'"}
    given |= {"status": "200", "response": "'hi there'"}
    select = ", ".join(f"CAST({given.get(n, 'NULL')} AS {t}) AS {n}" for n, t in old)
    con = duckdb.connect()
    con.execute(f"COPY (SELECT {select}, 'replica-a' AS replica) TO '{part / 'old.parquet'}' (FORMAT parquet)")
    con.close()

    got = log_source(None, tmp_path / "logs").query(
        "SELECT id, model_version, response, tool_calls, replica FROM requests"
    )
    assert got == [
        {"id": "r-old", "model_version": "v1", "response": "hi there", "tool_calls": None, "replica": "replica-a"}
    ]
