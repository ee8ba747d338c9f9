"""Datasets and `feedback sample` on both storage backends: a DuckDB file and a shared PostgreSQL.

Every test runs on real databases: a DuckDB file and a fresh database on a real local PostgreSQL
server (``tests/fixtures_postgres.py``). The same request-log and feedback rows, written into each
with plain INSERTs, must give the same datasets (same ids, rows, lineage rows) and the same data
cards; registered datasets must read back as written on either backend.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from tuneloop.dataset_store import dataset_id, load_card, load_splits, save_dataset
from tuneloop.db import Database, dumps, open_database
from tuneloop.feedback.sample import SampleConfig, sample
from tuneloop.registry import ModelVersion, get_dataset, register_version

T0 = datetime(2026, 3, 2, 9, 0, 0)
SINCE, UNTIL = T0, T0 + timedelta(hours=6)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


# ---- rows --------------------------------------------------------------------------------------


def chat(i: int, rid: str | None = None, *, tools: bool = False) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": f"r{i}",
        "messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}],
        "request_id": rid,
        "origin": "production" if rid else "file",
    }
    if tools:
        row["messages"] = [
            {"role": "user", "content": f"weather in city {i}?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": f"c{i}",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "x"}'},
                    }
                ],
            },
            {"role": "tool", "content": "sunny", "tool_call_id": f"c{i}"},
            {"role": "assistant", "content": f"It is sunny ({i})."},
        ]
        row["tools"] = TOOLS
    return row


def every_kind() -> dict[str, tuple[str, dict[str, list[dict[str, Any]]]]]:
    """One dataset of each kind (the SFT one with a tool-calling row), as save_dataset takes them."""
    q = [{"role": "user", "content": "q"}]
    sft = {"train": [chat(1, "req-1"), chat(2), chat(3, "req-3", tools=True)], "validation": [chat(4)], "test": []}
    pref = {
        "train": [
            {
                "id": "p1",
                "prompt": q,
                "chosen": [{"role": "assistant", "content": "good"}],
                "rejected": [{"role": "assistant", "content": "bad"}],
                "request_id": "req-1",
                "origin": "feedback",
            }
        ]
    }
    kto = {
        "train": [
            {"id": f"k{i}", "prompt": q, "completion": [{"role": "assistant", "content": f"c{i}"}], "label": i % 2 == 0}
            for i in range(4)
        ],
        "test": [{"id": "k9", "prompt": q, "completion": [{"role": "assistant", "content": "c9"}], "label": True}],
    }
    return {"chat": ("sft", sft), "pairs": ("preference", pref), "unpaired": ("kto", kto)}


def lineage_rows(db: Database, ds_id: str) -> list[dict[str, Any]]:
    return db.query(
        "SELECT row_id, split, request_id, origin FROM dataset_rows WHERE dataset_id = ? ORDER BY split, row_id",
        [ds_id],
    )


def loaded(db: Database, ds_id: str) -> dict[str, list[dict[str, Any]]]:
    dd = load_splits(db, ds_id)
    return {s: [dict(r) for r in dd[s]] for s in dd}


# ---- registering datasets ------------------------------------------------------------------------


def test_datasets_of_every_kind_register_and_read_back_as_written(any_db, tmp_path):
    home = tmp_path / "home"
    for name, (kind, splits) in every_kind().items():
        rec = save_dataset(any_db, home, name, splits, kind, {"note": name}, {"from": "test"}, ["parent@1"])
        assert rec.id == dataset_id(name, splits, kind)
        got = get_dataset(any_db, rec.id)
        assert (got.id, got.name, got.kind, got.content_hash, got.path) == (
            rec.id,
            name,
            kind,
            rec.content_hash,
            rec.path,
        )
        n = {s: len(splits.get(s, [])) for s in ("train", "validation", "test")}
        assert (got.rows_train, got.rows_validation, got.rows_test) == (n["train"], n["validation"], n["test"])
        assert got.source == {"from": "test"} and got.parent_ids == ["parent@1"] and got.card == rec.card
        assert got.card["rows"] == n and load_card(any_db, rec.id) == rec.card
        assert get_dataset(any_db, name).id == rec.id  # by name too
        assert lineage_rows(any_db, rec.id) == sorted(
            (
                {"row_id": r["id"], "split": s, "request_id": r.get("request_id"), "origin": r.get("origin") or "file"}
                for s, rows in splits.items()
                for r in rows
            ),
            key=lambda r: (r["split"], r["row_id"]),
        )
    sft = loaded(any_db, "chat")
    assert [r["id"] for r in sft["train"]] == ["r1", "r2", "r3"]
    assert json.loads(sft["train"][2]["tools"]) == TOOLS
    assert sft["train"][2]["messages"][1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert loaded(any_db, "unpaired")["train"][1]["label"] is False


def test_saving_the_same_rows_again_registers_them_once(any_db, tmp_path):
    kind, splits = every_kind()["chat"]
    a = save_dataset(any_db, tmp_path / "home", "chat", splits, kind, {}, {})
    b = save_dataset(any_db, tmp_path / "home", "chat", splits, kind, {}, {})
    assert b.id == a.id and b.created_at == a.created_at  # the first registration, read back
    assert any_db.query("SELECT count(*) AS n FROM datasets")[0]["n"] == 1
    assert any_db.query("SELECT count(*) AS n FROM dataset_rows")[0]["n"] == 4


def test_a_save_racing_another_process_for_the_same_id_returns_the_winners_record(pg_url, tmp_path):
    """Another process registers the same dataset while this one saves it: this save waits for that
    transaction, then returns its record instead of failing on the primary key or adding rows twice."""
    import psycopg

    kind, splits = every_kind()["chat"]
    ds_id = dataset_id("chat", splits, kind)
    db = open_database(pg_url, lock_timeout_s=30)
    try:
        db.query("SELECT 1")  # migrated
        winner_at = datetime(2026, 1, 1)
        result: dict[str, Any] = {}
        with psycopg.connect(pg_url) as other:  # the other process, mid-transaction
            other.execute(
                "INSERT INTO datasets (id, name, content_hash, kind, path, source, card, rows_train, rows_validation,"
                " rows_test, parent_ids, created_at) VALUES (%s, 'chat', 'h', 'sft', '/elsewhere', '{}', '{}', 3, 1, 0,"
                " '[]', %s)",
                [ds_id, winner_at],
            )
            other.execute(
                "INSERT INTO dataset_rows VALUES (%s, 'r1', 'train', 'req-1', 'production')",
                [ds_id],
            )

            def save() -> None:
                try:
                    result["rec"] = save_dataset(db, tmp_path / "home", "chat", splits, kind, {}, {})
                except BaseException as e:  # reported below
                    result["error"] = e

            t = threading.Thread(target=save)
            t.start()
            deadline = time.monotonic() + 60
            while not _waits_on_a_lock(pg_url):  # the save's INSERT is blocked behind the other transaction
                assert t.is_alive(), result
                assert time.monotonic() < deadline, "save_dataset never reached the conflicting INSERT"
                time.sleep(0.02)
            other.commit()
        t.join(60)
        assert "error" not in result, result.get("error")
        rec = result["rec"]
        assert (rec.id, rec.path, rec.created_at) == (ds_id, "/elsewhere", winner_at)
        assert lineage_rows(db, ds_id) == [
            {"row_id": "r1", "split": "train", "request_id": "req-1", "origin": "production"}
        ]
    finally:
        db.close()


def _waits_on_a_lock(url: str) -> bool:
    import psycopg

    with psycopg.connect(url, autocommit=True) as c:
        row = c.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
    return bool(row and row[0])


# ---- feedback sample over the same log on both backends ------------------------------------------


class Log:
    """Request-log and feedback rows with explicit ids and times, written the same way into any backend."""

    def __init__(self) -> None:
        self.requests: list[list[Any]] = []
        self.feedback: list[list[Any]] = []

    def request(
        self,
        n: int,
        prompt: str | list[dict[str, Any]],
        response: str,
        *,
        minute: int,
        version: str = "v1",
        status: int = 200,
        finish: str = "stop",
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        rid = f"chatcmpl-{n:04d}"
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        self.requests.append(
            [
                rid,
                T0 + timedelta(minutes=minute),
                version,
                dumps(msgs),
                response,
                finish,
                sum(len(str(m.get("content") or "").split()) for m in msgs),
                len(response.split()),
                status,
                dumps({"temperature": 0.7, **({"tools": tools} if tools else {})}),
            ]
        )
        return rid

    def rate(
        self,
        rid: str,
        rating: int | None,
        *,
        kind: str = "thumbs",
        correction: str | None = None,
        source: str = "api",
        minute: int = 0,
    ) -> None:
        n = len(self.feedback)
        at = T0 + timedelta(hours=7, minutes=minute + n)
        self.feedback.append([f"fb-{n:04d}", rid, source, rating, kind if rating is not None else None, correction, at])

    def write(self, db: Database) -> None:
        with db.connect() as con:
            for r in self.requests:
                con.execute(
                    "INSERT INTO requests (id, received_at, route, model, model_version, arm, prompt, response,"
                    " finish_reason, prompt_tokens, completion_tokens, ttft_s, latency_s, status, stream, params)"
                    " VALUES (?, ?, 'chat.completions', 'production', ?, 'production', ?, ?, ?, ?, ?, 0.1, 0.5, ?,"
                    " false, ?)",
                    r,
                )
            for f in self.feedback:
                con.execute(
                    "INSERT INTO feedback (id, request_id, source, rating, rating_kind, correction, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    f,
                )


def production_log() -> Log:
    """~40 requests exercising every filter, the PII scrub, dedup, tools, stars and each kind of feedback."""
    log = Log()
    topics = ["tea", "trains", "python", "gardening", "chess", "bread", "rivers", "stars"]
    n = 0
    for i, t in enumerate(topics * 2):  # plain traffic, two versions
        n += 1
        log.request(
            n, f"tell me fact {i} about {t}", f"Fact {i}: {t} are interesting.", minute=n, version=f"v{1 + i % 2}"
        )
    for i in range(4):  # thumbs-up
        n += 1
        log.rate(log.request(n, f"how do I boil water, way {i}", f"Heat it, way {i}.", minute=n), 1)
    for i in range(5):  # thumbs-down with a correction: SFT target, DPO pair, KTO both ways
        n += 1
        rid = log.request(n, f"what is {i} plus {i}", f"{i * 2 + 1}", minute=n)
        log.rate(rid, -1, correction=f"{i} plus {i} is {i * 2}.")
    n += 1  # a 2-star rating with a correction
    log.rate(log.request(n, "spell colour the british way", "color", minute=n), 2, kind="stars", correction="colour")
    n += 1  # a 5-star rating
    log.rate(log.request(n, "name a primary colour", "Red.", minute=n), 5, kind="stars")
    for i in range(3):  # thumbs-down without a correction: never SFT, KTO's undesirable
        n += 1
        log.rate(log.request(n, f"write a haiku number {i}", "no", minute=n), -1)
    n += 1  # the same prompt + response thumbs-down again (dedup in the KTO set)
    log.rate(log.request(n, "write a haiku number 0", "no", minute=n), -1)
    n += 1  # down first, then up from another source: the newest rating wins
    rid = log.request(n, "is the sea salty", "Yes, it is salty.", minute=n)
    log.rate(rid, -1, source="api")
    log.rate(rid, 1, source="ui", minute=30)
    n += 1
    log.request(n, "server error please", "", minute=n, status=500)
    n += 1
    log.request(n, "client gave up", "partial", minute=n, status=499)
    n += 1
    log.request(n, "a long story please", "once upon a time and", minute=n, finish="length")
    n += 1  # PII in the prompt and the answer
    log.request(n, "mail me at jane.doe@example.com or call +1 415 555 0100", "Sent to jane.doe@example.com.", minute=n)
    n += 1  # duplicate prompt (normalised): one survives
    log.request(n, "Tell me fact 0 about TEA!", "Fact 0 again.", minute=n)
    n += 1  # a tool-calling conversation
    prompt = [
        {"role": "user", "content": "weather in Paris?"},
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
        {"role": "tool", "content": "18C and sunny", "tool_call_id": "call_1"},
    ]
    log.rate(log.request(n, prompt, "It is 18C and sunny in Paris.", minute=n, tools=TOOLS), 1)
    n += 1  # outside the window
    log.request(n, "an old question", "an old answer", minute=-24 * 60)
    return log


def sample_twice(db: Database, home: Path) -> dict[str, Any]:
    """Two samples: the first (feedback + stratified) as a version's training set, the second (drift + random)
    deduplicated against it and replaying it; everything each wrote, as it reads back from the database."""
    first = sample(
        db,
        home,
        SampleConfig(
            name="prod",
            strategies={"feedback": 0.5, "stratified": 0.5},
            limit=14,
            since=SINCE,
            until=UNTIL,
            topics=3,
            seed=7,
        ),
        progress=False,
    )
    register_version(db, ModelVersion("v1", "adapter", "base", "/v1", "hash-v1", dataset_id=first.sft.id))
    second = sample(
        db,
        home,
        SampleConfig(
            name="prod2",
            strategies={"drift": 0.5, "random": 0.5},
            since=SINCE,
            until=UNTIL,
            replay_from="prod",
            replay_fraction=0.25,
            seed=11,
        ),
        progress=False,
    )
    out: dict[str, Any] = {}
    for label, res in (("first", first), ("second", second)):
        recs = {"sft": res.sft, "preference": res.preference, "kto": res.kto}
        out[label] = {
            "card": res.card,
            "datasets": {
                k: None
                if rec is None
                else {
                    "id": rec.id,
                    "rows": loaded(db, rec.id),
                    "lineage": lineage_rows(db, rec.id),
                    "parents": get_dataset(db, rec.id).parent_ids,
                    "card": get_dataset(db, rec.id).card,
                }
                for k, rec in recs.items()
            },
        }
    return out


def test_feedback_sample_gives_the_same_datasets_and_cards_from_duckdb_and_postgres(pg_url, tmp_path):
    log = production_log()
    duck = open_database(tmp_path / "tuneloop.duckdb")
    pg = open_database(pg_url, lock_timeout_s=30)
    try:
        log.write(duck)
        log.write(pg)
        from_duck = sample_twice(duck, tmp_path / "home-duck")
        from_pg = sample_twice(pg, tmp_path / "home-pg")
    finally:
        pg.close()
    assert from_pg == from_duck
    # ... and the comparison is not vacuous: every step of the pipeline had something to do
    c1, c2 = from_duck["first"]["card"], from_duck["second"]["card"]
    counts = c1["counts"]
    assert counts["requests_in_window"] == len(log.requests) - 1
    assert (counts["error"], counts["aborted"], counts["truncated"], counts["negative_feedback"]) == (1, 1, 1, 4)
    assert counts["duplicates_within"] == 1 and counts["rows_with_pii"] == 1 and counts["picked"] == 14
    assert c1["feedback"]["corrections"] == 6 and c1["feedback"]["preference_pairs"] > 0
    for kind in ("sft", "preference", "kto"):
        assert from_duck["first"]["datasets"][kind] is not None, kind
    rows = [r for s in from_duck["first"]["datasets"]["sft"]["rows"].values() for r in s]
    assert any(r["tools"] and json.loads(r["tools"]) == TOOLS for r in rows)
    assert not any("jane.doe@example.com" in json.dumps(r) for r in rows)
    assert c2["counts"]["duplicates_of_earlier_sets"] > 0 and c2["dedup_against"] == [
        from_duck["first"]["datasets"]["sft"]["id"]
    ]
    assert c2["counts"]["replay"] > 0 and c2["per_strategy"]["drift"]["picked"] > 0
    assert from_duck["second"]["datasets"]["sft"]["parents"] == [from_duck["first"]["datasets"]["sft"]["id"]]


def test_the_cli_samples_shows_the_dataset_and_lists_feedback_on_postgres(pg_url, tmp_path, home, cli):
    """`tuneloop feedback sample`, `data show` and `feedback list` with database.url set to PostgreSQL."""
    pg = open_database(pg_url, lock_timeout_s=30)
    try:
        production_log().write(pg)
    finally:
        pg.close()
    cli.env["TUNELOOP_DATABASE__URL"] = pg_url
    out = json.loads(
        cli(
            "feedback",
            "sample",
            "--json",
            "--name",
            "cli",
            "--since",
            SINCE.isoformat(),
            "--until",
            UNTIL.isoformat(),
            "--strategy",
            "random=1",
            "--seed",
            "3",
        ).stdout
    )
    assert out["card"]["counts"]["negative_feedback"] == 4 and out["preference_dataset"]
    shown = json.loads(cli("data", "show", out["dataset"], "--rows", "1").stdout)
    assert shown["id"] == out["dataset"]
    by_split = {}
    for o in shown["origins"]:
        by_split[o["split"]] = by_split.get(o["split"], 0) + o["rows"]
    assert by_split == {k: v for k, v in out["card"]["splits"].items() if v}
    listed = cli("feedback", "list", "--limit", "2").stdout
    newest = sorted(production_log().feedback, key=lambda f: f[6])[-2:]  # (id, request_id, ..., created_at)
    assert all(f[1] in listed for f in newest) and listed.count("chatcmpl-") == 2
    assert not (home / "tuneloop.duckdb").exists()  # nothing went to the embedded file


# ---- evaluation reports ------------------------------------------------------------------------


def test_an_eval_report_with_a_diverged_loss_is_stored_with_nulls_on_both_backends(any_db):
    """PostgreSQL's json type refuses NaN: the stored report has null there, and is otherwise the report."""
    from tuneloop.db import loads
    from tuneloop.trainer.evaluate import record_report

    created = datetime(2026, 3, 2, 12, 0, 0)
    report = {
        "id": "eval-1",
        "created_at": created.isoformat() + "Z",
        "dataset_id": "chat@abc",
        "models": ["cand", "prod"],
        "summary": {"cand": {"loss": float("nan"), "perplexity": float("inf")}, "prod": {"loss": 1.5}},
        "per_example": {"cand": {"loss": [0.5, float("-inf")]}, "prod": {"loss": [1.0, 2.0]}},
        "path": "/reports/eval-1.json",
    }
    record_report(any_db, report, created)
    [row] = any_db.query("SELECT id, dataset_id, models, report, path, created_at FROM eval_reports")
    assert (row["id"], row["dataset_id"], row["path"], row["created_at"]) == (
        "eval-1",
        "chat@abc",
        "/reports/eval-1.json",
        created,
    )
    assert loads(row["models"]) == ["cand", "prod"]
    stored = loads(row["report"])
    assert stored["summary"] == {"cand": {"loss": None, "perplexity": None}, "prod": {"loss": 1.5}}
    assert stored["per_example"]["cand"]["loss"] == [0.5, None]
    assert {k: v for k, v in stored.items() if k not in ("summary", "per_example")} == {
        k: v for k, v in report.items() if k not in ("summary", "per_example")
    }
