"""Versioned datasets: content-addressed, atomic, registered with per-row lineage, reloadable."""

import pytest

from tuneloop.dataset_store import load_card, load_splits, save_dataset
from tuneloop.errors import UserError


def chat(i, rid=None):
    return {
        "id": f"r{i}",
        "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
        "request_id": rid,
        "origin": "production" if rid else "file",
    }


def test_same_rows_same_id_and_one_registration(db, home):
    splits = {"train": [chat(i) for i in range(4)], "validation": [], "test": [chat(9)]}
    a = save_dataset(db, home, "chat", splits, "sft", {"note": 1}, {"from": "t"})
    b = save_dataset(db, home, "chat", splits, "sft", {"note": 1}, {"from": "t"})
    assert a.id == b.id and a.id.startswith("chat@")
    assert db.query("SELECT count(*) n FROM datasets")[0]["n"] == 1
    dd = load_splits(db, a.id)
    assert dd["train"].num_rows == 4 and dd["validation"].num_rows == 0 and dd["test"][0]["id"] == "r9"
    assert load_card(db, a.id)["rows"] == {"train": 4, "validation": 0, "test": 1}


def test_rows_keep_the_request_they_came_from(db, home):
    rec = save_dataset(db, home, "prod", {"train": [chat(1, "req-1"), chat(2)]}, "sft", {}, {})
    rows = db.query(
        "SELECT row_id, split, request_id, origin FROM dataset_rows WHERE dataset_id = ? ORDER BY row_id", [rec.id]
    )
    assert rows == [
        {"row_id": "r1", "split": "train", "request_id": "req-1", "origin": "production"},
        {"row_id": "r2", "split": "train", "request_id": None, "origin": "file"},
    ]


def test_empty_or_malformed_datasets_write_nothing(db, home):
    with pytest.raises(UserError, match="no training rows"):
        save_dataset(db, home, "empty", {"train": []}, "sft", {}, {})
    with pytest.raises(UserError, match="lacks chosen"):
        save_dataset(db, home, "p", {"train": [{"id": "1", "prompt": [], "rejected": []}]}, "preference", {}, {})
    assert db.query("SELECT count(*) n FROM datasets")[0]["n"] == 0
    assert not list((home / "datasets").glob("*")) if (home / "datasets").exists() else True


def test_every_kind_of_row_reads_as_the_chat_it_teaches_and_undesirable_kto_rows_as_none():
    from tuneloop.dataset_store import good_chat

    q = [{"role": "user", "content": "q"}]
    a = [{"role": "assistant", "content": "a"}]
    bad = [{"role": "assistant", "content": "bad"}]
    assert good_chat({"messages": q + a}) == (q, "a")
    assert good_chat({"messages": q}) == (q, "")
    assert good_chat({"prompt": q, "chosen": a, "rejected": bad}) == (q, "a")
    assert good_chat({"prompt": q, "completion": a, "label": True}) == (q, "a")
    assert good_chat({"prompt": q, "completion": bad, "label": False}) is None
    with pytest.raises(UserError, match="neither messages nor prompt"):
        good_chat({"id": "x"})
