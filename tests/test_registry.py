"""Model registry: immutable versions, stages with history, lineage fields."""

from __future__ import annotations

import pytest

from tuneloop.registry import (
    DatasetRecord,
    ModelVersion,
    RegistryError,
    get_version,
    list_versions,
    register_dataset,
    register_version,
    set_stage,
    version_by_stage,
)


def _v(name, h="h1", **kw):
    return ModelVersion(name=name, kind="adapter", base_model="/m/base", path=f"/m/{name}", content_hash=h, **kw)


def test_versions_are_immutable_but_reregistering_same_content_is_idempotent(db):
    register_version(db, _v("a"))
    register_version(db, _v("a"))
    with pytest.raises(RegistryError, match="immutable"):
        register_version(db, _v("a", h="other"))
    assert [v.name for v in list_versions(db)] == ["a"]


def test_promotion_retires_the_previous_production_and_records_history(db):
    register_version(db, _v("v1"))
    register_version(db, _v("v2", parent_version="v1"))
    set_stage(db, "v1", "production", actor="alice", reason="first")
    set_stage(db, "v2", "production", actor="bob", reason="better")
    assert version_by_stage(db, "production").name == "v2"
    assert get_version(db, "v1").stage == "retired"
    events = db.query("SELECT model_version, from_stage, to_stage, actor FROM deploy_events ORDER BY occurred_at")
    assert ("v1", "production", "retired", "bob") in [tuple(e.values()) for e in events]
    assert ("v2", "candidate", "production", "bob") in [tuple(e.values()) for e in events]


def test_unknown_version_and_stage_are_clear_errors(db):
    with pytest.raises(RegistryError, match="unknown model version"):
        get_version(db, "nope")
    register_version(db, _v("x"))
    with pytest.raises(RegistryError, match="stage must be one of"):
        set_stage(db, "x", "live")


def test_dataset_registration_round_trips_json_fields(db):
    rec = DatasetRecord(
        id="chat@abc",
        name="chat",
        content_hash="abc",
        kind="sft",
        path="/d",
        rows_train=8,
        rows_validation=1,
        rows_test=1,
        card={"dedup": {"exact": 2}},
        source={"files": ["a.jsonl"]},
    )
    register_dataset(db, rec)
    got = db.query("SELECT card, rows_train FROM datasets WHERE id = 'chat@abc'")[0]
    assert '"exact": 2' in got["card"] and got["rows_train"] == 8


def test_eval_reports_are_stored_and_found_by_id_prefix_on_both_backends(any_db):
    from tuneloop.registry import find_eval_report, save_eval_report

    save_eval_report(any_db, "rep-0123456789", "chat@abc", ["a", "b"], {"models": ["a", "b"], "x": 1.5}, "/r.json")
    got = find_eval_report(any_db, "rep-01234")
    assert got == {"id": "rep-0123456789", "report": {"models": ["a", "b"], "x": 1.5}}
    assert find_eval_report(any_db, "nope") is None


def test_datasets_runs_and_versions_round_trip_on_both_backends(any_db):
    from tuneloop.registry import find_version, finish_run, get_dataset, get_run, start_run, trained_version_run

    rec = DatasetRecord("chat@abc", "chat", "abc123", "sft", "/d", 8, 1, 1, card={"n": 2}, parent_ids=["p@1"])
    register_dataset(any_db, rec)
    register_dataset(any_db, rec)  # the same id again: a no-op
    assert get_dataset(any_db, "abc").card == {"n": 2} and get_dataset(any_db, "chat").parent_ids == ["p@1"]
    run = start_run(any_db, "lora", "/m/base", "chat@abc", {"lr": 1e-3}, run_id="run-42")
    finish_run(any_db, run, "succeeded", metrics={"loss": 1.25})
    assert get_run(any_db, "run-4").metrics == {"loss": 1.25}
    register_version(any_db, _v("v1", run_id="run-42"))
    register_version(any_db, _v("v2", run_id="missing"))
    assert trained_version_run(any_db, "v1") == "run-42" and trained_version_run(any_db, "v2") is None
    assert find_version(any_db, "v3") is None and find_version(any_db, "v1").run_id == "run-42"
