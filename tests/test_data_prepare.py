"""`tuneloop data prepare|list|show|corpus` as a user runs them, on the tiny model's tokenizer.

Every cleaning step is counted in the data card; the result is a registered,
content-hashed HF dataset in the row schema the trainer reads; bad input fails
with a clear message and exit 2 and writes nothing.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tuneloop.dataset_store import load_card, load_splits


def chat(q: str, a: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], **extra}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def prepare(cli, tiny_model, *args, check=True):
    return cli("data", "prepare", *map(str, args), "--base", tiny_model, "--no-progress", "--json", check=check)


def registered(db) -> list[dict]:
    return db.query("SELECT * FROM datasets") if db.path.exists() else []


def nothing_written(home: Path, db) -> bool:
    ds = home / "datasets"
    return (not ds.exists() or not any(ds.iterdir())) and not registered(db)


def test_chat_jsonl_every_step_is_counted_and_the_dataset_is_registered(cli, tiny_model, tmp_path, db, home):
    rows = [
        chat("Hello   there,\tmail me at jane.doe@example.com", "Sure, I will."),
        chat("Hello there, mail me at jane.doe@example.com", "Sure, I will."),  # exact duplicate after whitespace
        chat("hello there -- mail me at jane.doe@example.com!", "sure i will"),  # near duplicate
        chat("My card is 4111 1111 1111 1111, call 555-123-4567", "Noted, from 10.0.0.7 today"),
        chat("Order 4111 1111 1111 1112 arrived?", "Yes it did."),  # Luhn-invalid: not a card
        chat("   ", "empty question"),
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": "not a list"},
        *[chat(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(10)],
    ]
    r = prepare(cli, tiny_model, write_jsonl(tmp_path / "support.jsonl", rows))
    out = json.loads(r.stdout)
    card = out["card"]
    assert out["id"].startswith("support@") and out["kind"] == "sft" and card["format"] == "chat"
    steps = card["steps"]
    assert steps["read"] == 18
    assert steps["invalid"] == 2 and steps["empty"] == 1
    assert steps["exact_duplicates"] == 1 and steps["near_duplicates"] == 1
    assert steps["pii"] == {"email": 3, "phone": 1, "credit_card": 1, "ip": 1}
    assert steps["kept"] == 13 and sum(card["splits"].values()) == 13
    assert card["splits"] == {"train": 11, "validation": 1, "test": 1}
    assert card["tokens"]["train"]["count"] == 11 and card["tokens"]["train"]["min"] > 5
    assert len(card["invalid_examples"]) == 2 and "support.jsonl:7" in card["invalid_examples"][0]

    dd = load_splits(None, out["path"])
    texts = [m["content"] for split in dd.values() for row in split for m in row["messages"]]
    assert "Hello there, mail me at <EMAIL>" in texts
    assert "My card is <CREDIT_CARD>, call <PHONE>" in texts and "Noted, from <IP> today" in texts
    assert "Order 4111 1111 1111 1112 arrived?" in texts
    assert all(row["messages"][-1]["role"] == "assistant" and row["origin"] == "file" for row in dd["train"])
    assert load_card(None, out["path"])["content_hash"] == out["content_hash"]

    (reg,) = registered(db)
    assert reg["id"] == out["id"] and (reg["rows_train"], reg["rows_validation"], reg["rows_test"]) == (11, 1, 1)
    lineage = db.query(
        "SELECT split, count(*) n FROM dataset_rows WHERE dataset_id = ? GROUP BY split ORDER BY split", [out["id"]]
    )
    assert lineage == [{"split": "test", "n": 1}, {"split": "train", "n": 11}, {"split": "validation", "n": 1}]

    listed = cli("data", "list").stdout
    assert out["id"] in listed and "11" in listed
    shown = json.loads(cli("data", "show", "support", "--rows", "2").stdout)
    assert shown["id"] == out["id"] and shown["card"]["steps"]["near_duplicates"] == 1
    assert len(shown["sample"]) == 2 and shown["origins"][0]["origin"] == "file"


def test_no_scrub_keeps_pii_and_no_near_dedup_keeps_near_duplicates(cli, tiny_model, tmp_path):
    rows = [chat("Mail jane@example.com", "ok"), chat("mail JANE@example.com!!", "OK."), chat("Thanks", "Bye")]
    card = json.loads(
        prepare(cli, tiny_model, write_jsonl(tmp_path / "raw.jsonl", rows), "--no-scrub", "--no-near-dedup").stdout
    )["card"]
    assert card["steps"]["pii"] == "disabled" and card["steps"]["near_duplicates"] == "disabled"
    assert card["steps"]["kept"] == 3


def test_token_length_filter_uses_the_chat_template(cli, tiny_model, tmp_path):
    long = " ".join(["word"] * 300)
    rows = [chat("short question", "short answer"), chat(long, "fine"), chat("another one", "here")]
    card = json.loads(
        prepare(cli, tiny_model, write_jsonl(tmp_path / "len.jsonl", rows), "--max-tokens", "100").stdout
    )["card"]
    assert card["steps"]["too_long"] == 1 and card["steps"]["kept"] == 2
    # the rendered conversation includes the template's system prompt, so even "short" rows exceed 20 tokens
    card = json.loads(
        prepare(
            cli, tiny_model, tmp_path / "len.jsonl", "--min-tokens", "20", "--max-tokens", "100", "--name", "len2"
        ).stdout
    )["card"]
    assert card["steps"]["too_short"] == 0 and card["tokens"]["train"]["min"] >= 20


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.mark.parametrize("shape", ["prompt_completion", "alpaca", "csv_field_map", "hf_folder"])
def test_each_input_format_becomes_chat_rows(shape, cli, tiny_model, tmp_path):
    n = 10
    extra: list[str] = []
    if shape == "prompt_completion":
        src = write_jsonl(
            tmp_path / "pc.jsonl", [{"prompt": f"Capital number {i}?", "completion": f"City {i}."} for i in range(n)]
        )
        expect_user = "Capital number 0?"
    elif shape == "alpaca":
        src = write_jsonl(
            tmp_path / "alpaca.jsonl",
            [{"instruction": "Translate to French", "input": f"cat {i}", "output": f"chat {i}"} for i in range(n)],
        )
        expect_user = "Translate to French\n\ncat 0"
    elif shape == "csv_field_map":
        src = _write_csv(
            tmp_path / "faq.csv",
            ["question", "answer"],
            [[f"How do I reset {i}?", f"Press reset {i}."] for i in range(n)],
        )
        extra = ["--field-map", "question=prompt", "--field-map", "answer=completion"]
        expect_user = "How do I reset 0?"
    else:
        from datasets import Dataset

        src = tmp_path / "hf"
        Dataset.from_list([chat(f"Question {i}", f"Answer {i}") for i in range(n)]).save_to_disk(str(src))
        expect_user = "Question 0"
    out = json.loads(prepare(cli, tiny_model, src, *extra, "--name", shape).stdout)
    assert out["card"]["steps"]["kept"] == n and out["card"]["splits"] == {"train": 8, "validation": 1, "test": 1}
    dd = load_splits(None, out["path"])
    rows = [r for s in dd.values() for r in s]
    users = {r["messages"][0]["content"] for r in rows}
    assert expect_user in users
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)


def test_preference_rows_become_a_dpo_dataset(cli, tiny_model, tmp_path):
    rows = [{"prompt": f"Say hi to {i}", "chosen": f"Hi {i}!", "rejected": "no"} for i in range(5)]
    rows.append(
        {
            "prompt": [{"role": "user", "content": "Email me at x@example.org"}],
            "chosen": [{"role": "assistant", "content": "Sure"}],
            "rejected": [{"role": "assistant", "content": "Nope"}],
        }
    )
    out = json.loads(prepare(cli, tiny_model, write_jsonl(tmp_path / "prefs.jsonl", rows), "--split", "100/0/0").stdout)
    assert (
        out["kind"] == "preference"
        and out["card"]["format"] == "preference"
        and out["card"]["steps"]["pii"]["email"] == 1
    )
    train = load_splits(None, out["path"])["train"]
    assert train.num_rows == 6 and set(train.column_names) >= {"prompt", "chosen", "rejected"}
    row = next(r for r in train if r["prompt"][0]["content"] == "Say hi to 3")
    assert row["chosen"] == [{"role": "assistant", "content": "Hi 3!"}] and row["rejected"][0]["content"] == "no"


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SEND = {"type": "function", "function": {"name": "send_mail", "parameters": {"type": "object"}}}


def tool_chat(city: str, **extra) -> dict:
    """A conversation with one tool round trip (arguments given as an object) ending in a text answer."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
    return {
        "messages": [
            {"role": "user", "content": f"Weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 3}'},
            {"role": "assistant", "content": f"It is 3 degrees in {city}."},
        ],
        "tools": [WEATHER],
        **extra,
    }


def test_tool_calling_rows_keep_their_tools_tool_calls_and_tool_results_through_cleaning(cli, tiny_model, tmp_path, db):
    raw = '<tool_call>\n{"name": "send_mail", "arguments": {"to": "jane@example.com"}}\n</tool_call>'
    mail = {
        "messages": [
            {"role": "user", "content": "Mail jane@example.com please"},
            {"role": "assistant", "content": raw},
        ],
        "tools": json.dumps([SEND, WEATHER]),  # JSON text, as a CSV cell or an exported dataset holds it
    }
    rows = [
        tool_chat("Oslo"),
        tool_chat("Oslo", tools=[WEATHER, SEND]),  # the same chat with other tools: not a duplicate
        mail,
        *[chat(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(4)],
    ]
    out = json.loads(prepare(cli, tiny_model, write_jsonl(tmp_path / "tools.jsonl", rows), "--split", "1/0/0").stdout)
    steps = out["card"]["steps"]
    assert steps["kept"] == 7 and steps["invalid"] == 0 and steps["exact_duplicates"] == steps["near_duplicates"] == 0
    assert steps["pii"]["email"] == 2  # in the user's text and in the answer's raw tool call
    from tuneloop.dataset_store import chat_message

    train = load_splits(None, out["path"])["train"]
    got = [([chat_message(m) for m in r["messages"]], json.loads(r["tools"]) if r["tools"] else None) for r in train]
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    oslo = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": '{"temp_c": 3}', "tool_call_id": "call_1"},
        {"role": "assistant", "content": "It is 3 degrees in Oslo."},
    ]
    assert (oslo, [WEATHER]) in got and (oslo, [WEATHER, SEND]) in got
    scrubbed = raw.replace("jane@example.com", "<EMAIL>")
    mail_msgs = [{"role": "user", "content": "Mail <EMAIL> please"}, {"role": "assistant", "content": scrubbed}]
    assert (mail_msgs, [SEND, WEATHER]) in got
    assert sum(tools is None for _, tools in got) == 4

    # a tuneloop dataset folder (optional fields null where unset) prepares again into the same rows
    again = json.loads(prepare(cli, tiny_model, out["path"], "--split", "1/0/0", "--name", "again").stdout)
    assert again["content_hash"] == out["content_hash"]


@pytest.mark.parametrize(
    "case,message",
    [
        ("tools_not_a_list", "tools must be a list of function definitions, got dict"),
        ("tools_not_json", "tools is not valid JSON"),
        ("tool_without_name", "tools[0].function.name must be a non-empty string"),
        ("tool_not_a_function", 'tools[0] must be {"type": "function"'),
        ("tool_message_without_id", "messages[1]: a tool message needs a tool_call_id"),
        ("tool_calls_on_a_user_message", "messages[0]: only assistant messages carry tool_calls, not 'user'"),
        ("arguments_not_json", "messages[1].tool_calls[0]: arguments must be JSON"),
        ("answer_without_text", "the answer (last message) has tool_calls but no content"),
    ],
)
def test_malformed_tool_input_fails_naming_the_record_and_writes_nothing(
    case, message, cli, tiny_model, tmp_path, home, db
):
    bad = tool_chat("Rome")
    msgs = bad["messages"]
    if case == "tools_not_a_list":
        bad["tools"] = WEATHER
    elif case == "tools_not_json":
        bad["tools"] = '[{"type": "function"'
    elif case == "tool_without_name":
        bad["tools"] = [{"type": "function", "function": {"description": "no name"}}]
    elif case == "tool_not_a_function":
        bad["tools"] = [{"name": "get_weather"}]
    elif case == "tool_message_without_id":
        bad["messages"] = [msgs[0], {"role": "tool", "content": "3"}, msgs[3]]
    elif case == "tool_calls_on_a_user_message":
        msgs[0]["tool_calls"] = msgs[1]["tool_calls"]
    elif case == "arguments_not_json":
        msgs[1]["tool_calls"][0]["function"]["arguments"] = "{city: Rome"
    else:
        bad["messages"] = msgs[:2]
    src = write_jsonl(tmp_path / "bad.jsonl", [tool_chat("Oslo"), bad, chat("hi", "hello")])
    r = prepare(cli, tiny_model, src, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: {src}:2: ") and message in r.stderr
    assert nothing_written(home, db)


def _split_ids(db, ds_id: str) -> dict[str, set]:
    out: dict[str, set] = {}
    for r in db.query("SELECT split, row_id FROM dataset_rows WHERE dataset_id = ?", [ds_id]):
        out.setdefault(r["split"], set()).add(r["row_id"])
    return out


def test_split_is_deterministic_per_seed_and_can_be_stratified(cli, tiny_model, tmp_path, db):
    topics = ["math", "geo", "art", "food"]
    rows = [chat(f"{t} question number {i}", f"{t} answer {i}", topic=t) for t in topics for i in range(10)]
    src = write_jsonl(tmp_path / "qa.jsonl", rows)
    a = json.loads(prepare(cli, tiny_model, src, "--name", "a", "--seed", "7").stdout)
    b = json.loads(prepare(cli, tiny_model, src, "--name", "b", "--seed", "7").stdout)
    c = json.loads(prepare(cli, tiny_model, src, "--name", "c", "--seed", "8", "--stratify", "topic").stdout)
    assert a["content_hash"] == b["content_hash"] and _split_ids(db, a["id"]) == _split_ids(db, b["id"])
    assert _split_ids(db, a["id"])["test"] != _split_ids(db, c["id"])["test"]
    assert c["card"]["splits"] == {"train": 32, "validation": 4, "test": 4}
    assert c["card"]["strata"]["test"] == dict.fromkeys(sorted(topics), 1)
    assert c["card"]["strata"]["train"] == dict.fromkeys(sorted(topics), 8)


def test_malformed_line_fails_with_file_and_line_and_writes_nothing(cli, tiny_model, tmp_path, home, db):
    src = write_jsonl(tmp_path / "broken.jsonl", [chat("a", "b"), '{"messages": [', chat("c", "d")])
    r = prepare(cli, tiny_model, src, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"error: {src}:2: invalid JSON" in r.stderr and "--skip-invalid" in r.stderr
    assert nothing_written(home, db)

    card = json.loads(prepare(cli, tiny_model, src, "--skip-invalid").stdout)["card"]
    assert card["steps"]["malformed_skipped"] == 1 and card["steps"]["read"] == 3 and card["steps"]["kept"] == 2
    assert card["malformed_examples"][0].startswith(f"{src}:2:")


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing_file", "no such file"),
        ("empty_after_cleaning", "no rows left after cleaning"),
        ("unknown_field_map", "--field-map names unknown field(s) nope"),
        ("unknown_stratify", "--stratify names unknown field 'nope'"),
        ("undetectable", "cannot detect the record format"),
    ],
)
def test_bad_input_fails_clearly_and_writes_nothing(case, message, cli, tiny_model, tmp_path, home, db):
    good = write_jsonl(tmp_path / "good.jsonl", [chat("hi", "hello")])
    args = {
        "missing_file": [tmp_path / "nope.jsonl"],
        "empty_after_cleaning": [write_jsonl(tmp_path / "e.jsonl", [chat(" ", "x"), {"messages": []}])],
        "unknown_field_map": [good, "--field-map", "nope=prompt"],
        "unknown_stratify": [good, "--stratify", "nope"],
        "undetectable": [write_jsonl(tmp_path / "u.jsonl", [{"text": "hello"}])],
    }[case]
    r = prepare(cli, tiny_model, *args, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and message in r.stderr
    assert nothing_written(home, db)


def test_chatterbot_corpus_in_one_command(cli, tiny_model, db):
    out = json.loads(
        cli("data", "prepare", "--from", "chatterbot-corpus", "--base", tiny_model, "--no-progress", "--json").stdout
    )
    assert out["id"].startswith("chatterbot@") and out["source"]["corpus"] == "chatterbot-corpus==1.3.3"
    steps = out["card"]["steps"]
    # the corpus repeats many tech-support pairs: about half the pairs are exact duplicates
    assert steps["read"] == 2393 and steps["exact_duplicates"] > 1000 and steps["kept"] > 1000
    dropped = sum(
        steps[k] for k in ("invalid", "empty", "exact_duplicates", "near_duplicates", "too_short", "too_long")
    )
    assert steps["kept"] == steps["read"] - dropped
    assert out["card"]["stratify"] == "topic" and set(out["card"]["strata"]["test"]) >= {
        "greetings",
        "science",
        "history",
    }
    assert sum(out["card"]["splits"].values()) == steps["kept"]


def test_corpus_command_writes_jsonl(cli, tmp_path):
    out = tmp_path / "traffic.jsonl"
    r = cli("data", "corpus", "chitchat-dataset", "-o", out, "--limit", "50")
    assert "wrote 50 rows" in r.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 50 and all(isinstance(x["prompt"], str) and x["prompt"] for x in rows)
