"""`--from-parquet DIR`: `feedback sample` and `drift report` over many replicas' exports equal one database.

Two replicas each log part of the traffic of one registered version into their own DuckDB file and export it with
the real `tuneloop export logs` into one folder. A third home holds only the control plane (the version, its
training dataset) and runs the commands with `--from-parquet`; the reference is the same commands run on one
database holding every row. Some feedback arrives at the other replica than the one that served the request, so
only reading all replicas together joins it to its request. Real DuckDB files, real Parquet, the real console script.
"""

from __future__ import annotations

import json
import os
import random
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import CLI
from test_drift import _production_rows, chatterbot_pairs, chitchat_prompts
from test_export import insert

from tuneloop.dataset_store import load_splits, save_dataset
from tuneloop.db import Database, open_database, utcnow
from tuneloop.ids import new_id
from tuneloop.monitoring.sources import table_columns
from tuneloop.registry import ModelVersion, register_version

REPLICAS = ("server-0", "server-1")


def register_control_plane(db: Database, home: Path, tiny_model: Path, train: list[tuple[str, str]]) -> None:
    """The version `chat-v1` and the chatterbot dataset it was trained on (as tests/test_drift.py registers them)."""
    rows = [
        {
            "id": str(i),
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            "request_id": None,
            "origin": "file",
        }
        for i, (q, a) in enumerate(train)
    ]
    ds = save_dataset(db, home, "chatterbot", {"train": rows}, "sft", card={}, source={"test": True})
    register_version(
        db,
        ModelVersion(
            name="chat-v1",
            kind="adapter",
            base_model=str(tiny_model),
            path=str(tiny_model),
            content_hash="0" * 64,
            dataset_id=ds.id,
        ),
    )


def traffic(tiny_model: Path, prod: list[tuple[str, str]], now) -> dict[str, tuple[list[dict], list[dict]]]:
    """Requests (+ feedback) of chat-v1 per replica, 10-30 minutes old: errors, truncations, ratings, corrections."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rng = random.Random(11)
    req_cols = [n for n, _ in table_columns("requests")]
    fb_cols = [n for n, _ in table_columns("feedback")]
    out: dict[str, tuple[list[dict], list[dict]]] = {r: ([], []) for r in REPLICAS}
    for i, row in enumerate(_production_rows(tok, prod, finish_length_share=0.05, seed=3)):
        served_by = REPLICAS[i % 2]
        at = now - timedelta(minutes=30) + timedelta(seconds=5 * i)
        req = dict.fromkeys(req_cols)
        req.update(
            id=new_id("chatcmpl-"),
            received_at=at,
            route="chat.completions",
            model="production",
            model_version="chat-v1",
            arm=rng.choice(["production", "direct"]),
            prompt=json.dumps(row["prompt"]),
            response=row["response"],
            finish_reason=row["finish_reason"],
            prompt_tokens=row["prompt_tokens"],
            completion_tokens=row["completion_tokens"],
            ttft_s=0.05,
            latency_s=rng.uniform(0.1, 2),
            status=500 if rng.random() < 0.04 else 200,
            stream=False,
            params="{}",
            user_id=f"u{i % 7}",
        )
        out[served_by][0].append(req)
        r = rng.random()
        if r < 0.3:
            # a quarter of the feedback reaches the other replica (a load balancer does not pin clients)
            fb_at = REPLICAS[(i + 1) % 2] if rng.random() < 0.25 else served_by
            fb = dict.fromkeys(fb_cols)
            fb.update(
                id=new_id(),
                request_id=req["id"],
                source="api",
                model_version="chat-v1",
                created_at=at + timedelta(seconds=30),
            )
            if r < 0.1:
                fb.update(rating=-1, rating_kind="thumbs", correction=f"A better answer to question {i}.")
            else:
                fb.update(rating=rng.choice([-1, 1, 1]), rating_kind="thumbs")
            out[fb_at][1].append(fb)
    return out


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_model):
    """(cli on one database with every row, cli on a control-plane-only home, the export folder, expectations).

    Built once for the module: each test writes different tables (datasets / drift_reports) and reads only its own.
    """
    tmp_path = tmp_path_factory.mktemp("fleet")
    home = tmp_path / "home"
    db = open_database(home / "tuneloop.duckdb")
    cli = CLI(tmp_path, dict(os.environ, TUNELOOP_HOME=str(home)))
    pairs = chatterbot_pairs()
    random.Random(0).shuffle(pairs)
    train = pairs[:300]
    # production: held-out chatterbot questions plus chitchat (a shift, so the statistics are not all ~0)
    prod = pairs[300:440] + [(q, "I see.") for q in chitchat_prompts(100, seed=1)]
    prod = list({" ".join(q.lower().split()): (q, a) for q, a in prod}.values())  # distinct prompts
    now = utcnow()
    per_replica = traffic(tiny_model, prod, now)

    # the reference: one database holding all rows
    register_control_plane(db, home, tiny_model, train)
    for reqs, fbs in per_replica.values():
        insert(db, reqs, fbs)

    # the fleet: each replica logs into its own database and exports it with the real CLI into one folder
    out = tmp_path / "exported-logs"
    for name, (reqs, fbs) in per_replica.items():
        rhome = tmp_path / name
        insert(open_database(rhome / "tuneloop.duckdb"), reqs, fbs)
        rcli = type(cli)(cli.cwd, dict(cli.env, TUNELOOP_HOME=str(rhome)))
        res = json.loads(rcli("export", "logs", "--out", out, "--replica", name, "--window", "1m", "--json").stdout)
        assert {t["table"]: t["rows"] for t in res["tables"]} == {"requests": len(reqs), "feedback": len(fbs)}

    # the control plane the --from-parquet commands run against: versions and datasets, no request log
    fhome = tmp_path / "fleet-home"
    fdb = open_database(fhome / "tuneloop.duckdb")
    register_control_plane(fdb, fhome, tiny_model, train)
    assert fdb.query("SELECT count(*) AS n FROM requests") == [{"n": 0}]
    fcli = type(cli)(cli.cwd, dict(cli.env, TUNELOOP_HOME=str(fhome)))
    served_ok = {r["id"] for reqs, _ in per_replica.values() for r in reqs if r["status"] < 400}
    cross = {
        f["request_id"]
        for name, (_, fbs) in per_replica.items()
        for f in fbs
        if f["correction"]
        and f["request_id"] in served_ok
        and f["request_id"] not in {r["id"] for r in per_replica[name][0]}
    }
    assert cross, "some corrections must live on another replica than their request"
    return {
        "one": (cli, db),
        "fleet": (fcli, fdb),
        "out": out,
        "now": now,
        "n_requests": len(prod),
        "cross_replica_corrections": cross,
    }


def test_feedback_sample_from_parquet_gives_the_same_dataset_as_one_database(fleet):
    until = (fleet["now"] + timedelta(minutes=1)).isoformat()
    args = [
        "feedback",
        "sample",
        "--name",
        "prod",
        "--strategy",
        "feedback=0.4",
        "--strategy",
        "drift=0.3",
        "--strategy",
        "stratified=0.3",
        "--limit",
        "80",
        "--until",
        until,
        "--json",
    ]
    (cli, db), (fcli, fdb) = fleet["one"], fleet["fleet"]
    one = json.loads(cli(*args).stdout)
    many = json.loads(fcli(*args, "--from-parquet", fleet["out"]).stdout)

    # same content hash, hence the same dataset ids, for the SFT set, the DPO pairs and the KTO set
    assert many["dataset"] == one["dataset"] and many["preference_dataset"] == one["preference_dataset"]
    assert many["card"]["kto_dataset"] == one["card"]["kto_dataset"] and one["card"]["kto_dataset"]
    sql = "SELECT id, content_hash, rows_train, rows_validation, rows_test FROM datasets WHERE name LIKE 'prod%' ORDER BY id"
    assert fdb.query(sql) == db.query(sql) and len(db.query(sql)) == 3
    assert many["card"] == one["card"]
    assert one["card"]["counts"]["requests_in_window"] == fleet["n_requests"]

    # the corrections that reached the other replica were joined to their requests: they are DPO pairs
    pairs = {r["request_id"] for split in load_splits(fdb, many["preference_dataset"]).values() for r in split}
    assert fleet["cross_replica_corrections"] <= pairs
    source = json.loads(fdb.query("SELECT source::VARCHAR AS s FROM datasets WHERE id = ?", [many["dataset"]])[0]["s"])
    assert source["requests"]["from_parquet"] == str(fleet["out"])


def test_drift_report_from_parquet_gives_the_same_statistics_as_one_database(fleet):
    args = ["drift", "report", "--window", "500r", "--no-embeddings"]  # no --version: versions found through the source
    (cli, db), (fcli, fdb) = fleet["one"], fleet["fleet"]
    one = cli(*args).stdout
    many = fcli(*args, "--from-parquet", fleet["out"]).stdout
    assert many == one and "chat-v1" in one

    sql = """SELECT model_version, window_start, n_requests, feature, statistic, value, threshold, drifted, details::VARCHAR AS details
             FROM drift_reports ORDER BY feature"""
    got, want = fdb.query(sql), db.query(sql)
    assert got == want
    features = {r["feature"] for r in want}
    assert {"overall", "prompt_length_psi", "vocabulary", "negative_feedback"} <= features
    assert want[0]["n_requests"] > 50 and any(r["value"] for r in want)  # a real window with non-trivial statistics


@pytest.mark.parametrize("command", [["feedback", "sample"], ["drift", "report", "--no-embeddings"]])
def test_a_missing_export_folder_is_a_clear_error_that_writes_nothing(cli, db, tmp_path, command):
    r = cli(*command, "--from-parquet", tmp_path / "no-such-folder", check=False)
    assert r.returncode == 2 and r.stderr.startswith("error: --from-parquet:") and "Traceback" not in r.stderr
    assert "not a folder of exported logs" in r.stderr
    assert db.query("SELECT (SELECT count(*) FROM datasets) + (SELECT count(*) FROM drift_reports) AS n") == [{"n": 0}]
