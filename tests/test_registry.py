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
