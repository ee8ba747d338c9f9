"""Deploy state in the storage layer (tuneloop.store_deploy, tuneloop.registry) on both backends: the transitions'
semantics, their atomicity when replicas race, and how fast another replica's router sees a promotion."""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tuneloop import store_deploy
from tuneloop.db import CachedRead, Database, dumps, open_database, utcnow
from tuneloop.monitoring import canary
from tuneloop.registry import (
    ModelVersion,
    RegistryError,
    get_version,
    list_versions,
    register_version,
    set_stage,
    version_by_stage,
)
from tuneloop.store_deploy import CanaryDecided, CanaryError


def _v(name: str, h: str | None = None) -> ModelVersion:
    return ModelVersion(name=name, kind="adapter", base_model="/b", path=f"/p/{name}", content_hash=h or name)


def _register(db: Database, *names: str) -> None:
    for n in names:
        register_version(db, _v(n))


def _stages(db: Database) -> dict[str, str]:
    return {v.name: v.stage for v in list_versions(db)}


def _events(db: Database) -> list[dict[str, Any]]:
    return db.query(
        "SELECT model_version, from_stage, to_stage, actor, reason FROM deploy_events ORDER BY occurred_at, id"
    )


@pytest.fixture
def other_handle(any_db) -> Iterator[Database]:
    """A second, independent handle on the same database: another replica (its own PostgreSQL pool)."""
    db = open_database(any_db.url, lock_timeout_s=10.0)
    try:
        yield db
    finally:
        db.close()


def _race(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run ``calls`` on one thread each, released together by a barrier; each result or the exception raised."""
    barrier = threading.Barrier(len(calls))
    out: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = calls[i]()
        except Exception as e:  # the race's losers: collected and checked by the caller
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a racing call hung"
    return out


# ---- semantics, on both backends ---------------------------------------------------------------------


def test_direct_promotion_retires_the_previous_production_and_records_both_events(any_db):
    _register(any_db, "v1", "v2")
    assert store_deploy.promote_version(any_db, "v1", actor="alice", reason="first") is None
    assert store_deploy.promote_version(any_db, "v2", actor="bob", reason="better") == "v1"
    assert _stages(any_db) == {"v1": "retired", "v2": "production"}
    assert _events(any_db)[-2:] == [
        {"model_version": "v1", "from_stage": "production", "to_stage": "retired", "actor": "bob",
         "reason": "replaced by v2"},
        {"model_version": "v2", "from_stage": "candidate", "to_stage": "production", "actor": "bob",
         "reason": "better"},
    ]  # fmt: skip


def test_direct_promotion_is_refused_while_a_canary_runs(any_db):
    _register(any_db, "v1", "v2", "v3")
    set_stage(any_db, "v1", "production")
    c = store_deploy.start_canary(any_db, "v2", 0.2)
    with pytest.raises(CanaryError, match="canary v2 is running"):
        store_deploy.promote_version(any_db, "v3")
    assert _stages(any_db) == {"v1": "production", "v2": "canary", "v3": "candidate"}
    assert store_deploy.running_canary(any_db) == c


def test_canary_start_promote_and_rollback_each_change_stages_and_the_row_together(any_db):
    _register(any_db, "v1", "v2", "v3")
    set_stage(any_db, "v1", "production")
    c = store_deploy.start_canary(any_db, "v2", 0.25, actor="bob", reason="try v2")
    assert (c.candidate, c.production, c.share, c.status) == ("v2", "v1", 0.25, "running")
    with pytest.raises(CanaryError, match="still running"):
        store_deploy.start_canary(any_db, "v3", 0.1)
    done = store_deploy.finish_canary(any_db, c.id, "promoted", actor="judge", reason="better", decision={"k": 1})
    assert (done.status, done.decision["actor"], done.decision["k"]) == ("promoted", "judge", 1)
    assert done.decided_at is not None and store_deploy.running_canary(any_db) is None
    assert _stages(any_db) == {"v1": "retired", "v2": "production", "v3": "candidate"}

    c3 = store_deploy.start_canary(any_db, "v3", 0.1)
    assert c3.production == "v2"
    rb = store_deploy.finish_canary(any_db, c3.id, "rolled_back", actor="judge", reason="worse")
    assert rb.status == "rolled_back"
    assert _stages(any_db) == {"v1": "retired", "v2": "production", "v3": "retired"}
    assert _events(any_db)[-1] == {
        "model_version": "v3", "from_stage": "canary", "to_stage": "retired", "actor": "judge",
        "reason": "rolled back: worse",
    }  # fmt: skip
    assert store_deploy.get_canary(any_db, c3.id[:12]) == rb  # by id prefix
    assert store_deploy.last_canary_of(any_db, "v3") == rb


def test_a_decided_canary_is_not_decided_again_and_the_second_attempt_changes_nothing(any_db):
    _register(any_db, "v1", "v2")
    set_stage(any_db, "v1", "production")
    c = store_deploy.start_canary(any_db, "v2", 0.1)
    store_deploy.finish_canary(any_db, c.id, "rolled_back", actor="first")
    n = len(_events(any_db))
    with pytest.raises(CanaryDecided, match="already rolled_back") as e:
        store_deploy.finish_canary(any_db, c.id, "promoted", actor="second")
    assert e.value.status == "rolled_back"
    with pytest.raises(CanaryDecided):
        canary.promote(any_db, c.id)  # the monitoring API refuses the same way
    assert len(_events(any_db)) == n and _stages(any_db) == {"v1": "production", "v2": "retired"}
    assert store_deploy.get_canary(any_db, c.id).decision["actor"] == "first"


def test_a_failing_finish_rolls_back_the_status_change_too(any_db):
    _register(any_db, "v1", "v2")
    set_stage(any_db, "v1", "production")
    c = store_deploy.start_canary(any_db, "v2", 0.1)
    n = len(_events(any_db))
    any_db.execute("UPDATE model_versions SET name = 'v2-gone' WHERE name = 'v2'")
    with pytest.raises(RegistryError, match="unknown model version 'v2'"):
        store_deploy.finish_canary(any_db, c.id, "promoted")
    assert store_deploy.get_canary(any_db, c.id).status == "running" and len(_events(any_db)) == n


def test_rollback_of_production_restores_the_previous_version_but_never_a_rolled_back_one(any_db):
    _register(any_db, "v1", "v2", "v3")
    for v in ("v1", "v2", "v3"):
        store_deploy.promote_version(any_db, v)
    assert store_deploy.rollback_production(any_db, actor="dave", reason="bad answers") == ("v3", "v2")
    assert _events(any_db)[-2]["reason"] == "rolled back: bad answers"  # v3's retirement says why
    assert store_deploy.rollback_production(any_db, reason="still bad") == ("v2", "v1")
    with pytest.raises(CanaryError, match="no previous production version"):
        store_deploy.rollback_production(any_db)  # v2 and v3 were rolled back: neither comes back
    assert store_deploy.rollback_production(any_db, to="v3") == ("v1", "v3")
    assert version_by_stage(any_db, "production").name == "v3"


def test_the_deploy_state_snapshot_has_every_version_and_the_running_canary(any_db):
    _register(any_db, "v1", "v2")
    with any_db.connect(transaction=False) as con:
        assert store_deploy.read_deploy_state(con) == (
            {"v1": get_version(any_db, "v1"), "v2": get_version(any_db, "v2")},
            {},
        )
    set_stage(any_db, "v1", "production")
    c = store_deploy.start_canary(any_db, "v2", 0.3)
    with any_db.connect(transaction=False) as con:
        snap = store_deploy.read_deploy_state(con)
    assert {n: v.stage for n, v in snap.versions.items()} == {"v1": "production", "v2": "canary"}
    canary = snap.canary_for("chat")
    assert canary is not None and (canary.id, canary.candidate, canary.production) == (c.id, "v2", "v1")
    assert canary.share == pytest.approx(0.3)
    assert snap.canary_for("classification") is None


# ---- stages are per task: a production classifier beside a production chat model -------------------------


def _cls(name: str) -> ModelVersion:
    return ModelVersion(
        name=name, kind="merged", base_model="/b", path=f"/p/{name}", content_hash=name, task="classification"
    )


def test_a_classifier_and_a_chat_model_each_hold_production_and_canary_of_their_own_task(any_db):
    _register(any_db, "chat1", "chat2")
    register_version(any_db, _cls("cls1"))
    register_version(any_db, _cls("cls2"))
    set_stage(any_db, "chat1", "production")
    assert store_deploy.promote_version(any_db, "cls1") is None  # the first classifier: nothing of its task retires
    assert _stages(any_db) == {"chat1": "production", "chat2": "candidate", "cls1": "production", "cls2": "candidate"}
    assert version_by_stage(any_db, "production").name == "chat1"  # chat is the default task
    assert version_by_stage(any_db, "production", task="classification").name == "cls1"
    # one canary per task can run at once, each splitting the production of its own task
    chat_canary = store_deploy.start_canary(any_db, "chat2", 0.2)
    cls_canary = store_deploy.start_canary(any_db, "cls2", 0.5)
    assert (chat_canary.production, cls_canary.production) == ("chat1", "cls1")
    assert store_deploy.running_canary(any_db, task="classification") == cls_canary
    assert store_deploy.running_canary(any_db, task="chat") == chat_canary
    with any_db.connect(transaction=False) as con:
        snap = store_deploy.read_deploy_state(con)
    assert (snap.canary_for("chat").id, snap.canary_for("classification").id) == (chat_canary.id, cls_canary.id)
    with pytest.raises(CanaryError, match="still running"):
        store_deploy.start_canary(any_db, "chat1", 0.1)  # a second chat canary is still refused
    store_deploy.finish_canary(any_db, cls_canary.id, "promoted")
    assert _stages(any_db) == {"chat1": "production", "chat2": "canary", "cls1": "retired", "cls2": "production"}
    store_deploy.finish_canary(any_db, chat_canary.id, "rolled_back")
    assert store_deploy.rollback_production(any_db, task="classification") == ("cls2", "cls1")
    assert _stages(any_db) == {"chat1": "production", "chat2": "retired", "cls1": "production", "cls2": "retired"}


def test_a_version_with_an_unknown_task_is_refused_at_registration(any_db):
    with pytest.raises(RegistryError, match="task must be one of"):
        register_version(
            any_db, ModelVersion(name="x", kind="merged", base_model="/b", path="/p", content_hash="x", task="ranking")
        )


def test_gate_verdicts_are_events_that_keep_the_stage(any_db):
    _register(any_db, "v1")
    assert store_deploy.last_gate_details(any_db, "v1") is None
    store_deploy.record_gate_verdict(any_db, "v1", False, "base", {"gate": {"passed": False}})
    store_deploy.record_gate_verdict(any_db, "v1", True, "base", {"gate": {"passed": True}})
    assert store_deploy.last_gate_details(any_db, "v1") == {"gate": {"passed": True}}
    assert _events(any_db)[-1]["reason"] == "gate passed vs base" and get_version(any_db, "v1").stage == "candidate"
    assert [e["reason"] for e in store_deploy.recent_events(any_db, 2)] == [
        "gate passed vs base",
        "gate failed vs base",
    ]


def test_loop_steps_are_upserted_and_a_cycle_without_decide_is_unfinished(any_db):
    store_deploy.begin_step(any_db, "c1", "sample", {"until": "2030-01-02T03:04:05"})
    store_deploy.end_step(any_db, "c1", "sample", "failed", {}, error="boom")
    store_deploy.begin_step(any_db, "c1", "sample", {"until": "2030-01-02T03:04:05"})  # the retry replaces it
    assert store_deploy.steps_of(any_db, "c1")["sample"]["status"] == "running"
    assert store_deploy.steps_of(any_db, "c1")["sample"]["error"] is None
    store_deploy.end_step(any_db, "c1", "sample", "done", {"until": "2030-01-02T03:04:05"})
    assert store_deploy.unfinished_cycle(any_db) == "c1" and store_deploy.cycle_exists(any_db, "c1")
    assert store_deploy.last_sample_until(any_db, exclude="c2").isoformat() == "2030-01-02T03:04:05"
    assert store_deploy.last_sample_until(any_db, exclude="c1") is None
    store_deploy.record_decide(any_db, "c1", "promoted", "gate passed")
    decide = store_deploy.steps_of(any_db, "c1")["decide"]
    assert decide["status"] == "done" and decide["details"] == {"outcome": "promoted", "reason": "gate passed"}
    assert store_deploy.unfinished_cycle(any_db) is None and store_deploy.last_started(any_db) is not None


def test_registering_one_version_from_many_threads_inserts_it_once(any_db, other_handle):
    results = _race([lambda db=db: register_version(db, _v("same")) for db in (any_db, other_handle) * 4])
    assert all(isinstance(r, ModelVersion) and r.content_hash == "same" for r in results), results
    assert [e["to_stage"] for e in _events(any_db) if e["model_version"] == "same"] == ["candidate"]
    with pytest.raises(RegistryError, match="immutable"):
        register_version(other_handle, _v("same", h="other"))


# ---- the analytical reads run on the analytics connection (DuckDB SQL) on both backends ------------------


def _log(db: Database, rows: list[tuple[str, str, str, int, float, Any]], at=None) -> None:
    """Request rows (id, arm, version, status, ttft, params) received at ``at`` (now)."""
    with db.connect() as con:
        for rid, arm, version, status, ttft, params in rows:
            con.execute(
                """INSERT INTO requests (id, received_at, route, model, model_version, arm, prompt, response,
                                         status, ttft_s, params)
                   VALUES (?, ?, 'chat.completions', 'production', ?, ?, ?, 'ok', ?, ?, ?)""",
                [rid, at or utcnow(), version, arm, dumps([{"role": "user", "content": rid}]), status, ttft,
                 dumps(params)],
            )  # fmt: skip


def test_canary_arm_statistics_cover_only_the_canary_window_with_the_latest_rating(any_db):
    from datetime import timedelta

    _register(any_db, "v1", "v2")
    set_stage(any_db, "v1", "production")
    _log(any_db, [("old", "production", "v1", 500, 9.0, None)], at=utcnow() - timedelta(hours=1))
    c = canary.start(any_db, "v2", 0.5)
    _log(
        any_db,
        [("p1", "production", "v1", 200, 0.5, None), ("p2", "production", "v1", 503, 0.7, None)]
        + [(f"c{i}", "canary", "v2", 200, 0.2 * (i + 1), None) for i in range(3)],
    )
    with any_db.connect() as con:
        for fid, rid, rating, later in [("f1", "c0", 1, 1), ("f2", "c0", -1, 2), ("f3", "p1", 1, 3)]:
            con.execute(
                """INSERT INTO feedback (id, request_id, source, rating, rating_kind, model_version, created_at)
                   VALUES (?, ?, ?, ?, 'thumbs', 'x', ?)""",
                [fid, rid, f"s{fid}", rating, utcnow() + timedelta(seconds=later)],
            )
    arms = canary.arm_stats(any_db, canary.get(any_db, c.id))
    p, k = arms["production"], arms["canary"]
    assert (p.model_version, p.requests, p.errors, p.rated, p.negative) == ("v1", 2, 1, 1, 0)  # "old" is before
    assert (k.model_version, k.requests, k.errors, k.rated, k.negative) == ("v2", 3, 0, 1, 1)  # c0's latest: down
    assert k.ttft_p50_s == pytest.approx(0.4) and k.ttft_n == 3


def test_production_answers_leave_out_failed_requests_and_requests_with_tools(any_db):
    from tuneloop.deploy.gate import production_answers

    _log(
        any_db,
        [
            ("a", "production", "v1", 200, 0.1, {"temperature": 0}),
            ("b", "production", "v1", 200, 0.1, {"tools": [{"type": "function"}]}),
            ("c", "production", "v1", 500, 0.1, None),
            ("d", "production", "v2", 200, 0.1, None),
            ("e", "production", "v1", 200, 0.1, None),
        ],
    )
    got = production_answers(any_db, "v1", 10)
    assert sorted(g["messages"][0]["content"] for g in got) == ["a", "e"]
    assert got[0]["messages"][-1] == {"role": "assistant", "content": "ok"}


# ---- races between replicas ------------------------------------------------------------------------------


def test_concurrent_canary_starts_leave_exactly_one_canary_running(any_db, other_handle):
    names = [f"cand{i}" for i in range(6)]
    _register(any_db, "prod", *names)
    set_stage(any_db, "prod", "production")
    dbs = (any_db, other_handle)
    results = _race([lambda n=n, i=i: store_deploy.start_canary(dbs[i % 2], n, 0.1) for i, n in enumerate(names)])
    won = [r for r in results if isinstance(r, store_deploy.Canary)]
    assert len(won) == 1, results
    assert all(isinstance(r, CanaryError) and "still running" in str(r) for r in results if r is not won[0])
    assert any_db.query("SELECT count(*) AS n FROM canaries")[0]["n"] == 1
    stages = _stages(any_db)
    assert [n for n, s in stages.items() if s == "canary"] == [won[0].candidate]
    assert [n for n, s in stages.items() if s == "production"] == ["prod"]


def test_concurrent_direct_promotions_leave_exactly_one_production_version(any_db, other_handle):
    names = [f"v{i}" for i in range(6)]
    _register(any_db, *names)
    dbs = (any_db, other_handle)
    results = _race(
        [lambda n=n, i=i: store_deploy.promote_version(dbs[i % 2], n, actor=n) for i, n in enumerate(names)]
    )
    assert not [r for r in results if isinstance(r, Exception)], results
    stages = _stages(any_db)
    prod = [n for n, s in stages.items() if s == "production"]
    assert len(prod) == 1 and sorted(n for n, s in stages.items() if s == "retired") == sorted(set(names) - set(prod))
    # the promotions ran one after another: each retired exactly the one before it
    chain = [e for e in _events(any_db) if e["to_stage"] == "production"]
    retired = [e for e in _events(any_db) if e["to_stage"] == "retired"]
    assert len(chain) == 6 and len(retired) == 5
    assert [r["model_version"] for r in retired] == [c["model_version"] for c in chain[:-1]]
    assert chain[-1]["model_version"] == prod[0]


ROUNDS = 50


def test_two_replicas_judging_the_same_canary_decide_it_exactly_once(any_db, other_handle):
    """Per round a fresh canary; four judges (two per replica handle, one promote and one rollback each)
    released together apply their decision. Exactly one wins: one decision recorded, one set of deploy events,
    consistent stages; every other judge gets CanaryDecided naming the winner's status."""
    _register(any_db, "base")
    set_stage(any_db, "base", "production")
    replicas = {"a": any_db, "b": other_handle}
    at_cas = 0  # losers that got past the read of a running canary and lost at the compare-and-set
    started = time.monotonic()
    for r in range(ROUNDS):
        cand = f"r{r}"
        _register(any_db, cand)
        prod_before = version_by_stage(any_db, "production").name
        c = canary.start(any_db, cand, 0.5)
        n_events = len(_events(any_db))
        judges = [(rep, action) for rep in replicas for action in ("promote", "rollback")]

        def judge(rep: str, action: str, canary_id: str, r: int) -> store_deploy.Canary:
            d = canary.Decision(action, canary_id, [f"{action} by {rep}"], {}, 1.0)
            return canary.apply(replicas[rep], d, actor=f"judge-{rep}-{action}-{r}")

        results = _race([lambda j=j, cid=c.id, r=r: judge(*j, cid, r) for j in judges])
        winners = [(j, res) for j, res in zip(judges, results) if isinstance(res, store_deploy.Canary)]
        assert len(winners) == 1, (r, results)
        (rep, action), won = winners[0]
        status = "promoted" if action == "promote" else "rolled_back"
        losers = [res for res in results if res is not won]
        assert all(isinstance(e, CanaryDecided) and e.status == status for e in losers), (r, results)
        at_cas += sum(any(f.name == "finish_canary" for f in traceback.extract_tb(e.__traceback__)) for e in losers)
        row = store_deploy.get_canary(any_db, c.id)
        assert row.status == status and row.decision["actor"] == f"judge-{rep}-{action}-{r}"
        new = _events(any_db)[n_events:]
        assert {e["actor"] for e in new} == {f"judge-{rep}-{action}-{r}"}, new
        stages = _stages(any_db)
        if status == "promoted":
            assert sorted((e["model_version"], e["to_stage"]) for e in new) == sorted(
                [(cand, "production"), (prod_before, "retired")]
            )
            assert stages[cand] == "production" and stages[prod_before] == "retired"
        else:
            assert [(e["model_version"], e["to_stage"]) for e in new] == [(cand, "retired")]
            assert stages[cand] == "retired" and stages[prod_before] == "production"
        assert list(stages.values()).count("production") == 1 and "canary" not in stages.values()
        assert store_deploy.running_canary(any_db) is None
    print(
        f"\n{any_db.backend}: {ROUNDS} rounds x 4 judges in {time.monotonic() - started:.1f} s; "
        f"{at_cas} of {3 * ROUNDS} losers passed the read and lost at the compare-and-set"
    )
    decided = any_db.query("SELECT status, count(*) AS n FROM canaries GROUP BY status ORDER BY status")
    assert sum(d["n"] for d in decided) == ROUNDS and "running" not in {d["status"] for d in decided}


# ---- change notification: another replica's router sees a promotion -------------------------------------


def test_a_promotion_through_one_handle_reaches_another_handles_deploy_state_within_2_s(any_db, other_handle):
    _register(any_db, "v1", "v2")
    set_stage(any_db, "v1", "production")
    reads = []

    def read(con):
        reads.append(1)
        return store_deploy.read_deploy_state(con)

    router_read = CachedRead(other_handle, read)  # what server/routing.py's ModelRouter polls
    assert router_read.get().versions["v1"].stage == "production"
    if other_handle.backend == "postgres":  # wait until its change listener is connected, then nothing re-reads
        deadline = time.monotonic() + 10
        while not other_handle._state().listening and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.01)
    router_read.get()  # settles: the first read's own close (a DuckDB checkpoint) may count as a change
    n = len(reads)
    assert router_read.get() and len(reads) == n, "with no write, the cached state is served without a read"

    t0 = time.monotonic()
    store_deploy.promote_version(any_db, "v2", actor="other-replica")
    while True:
        snap = router_read.get()
        delay = time.monotonic() - t0
        if snap.versions["v2"].stage == "production" or delay > 2.0:
            break
        time.sleep(0.005)
    print(f"\n{any_db.backend}: promotion visible to the other handle after {delay * 1000:.1f} ms")
    assert snap.versions["v2"].stage == "production", f"not visible after {delay:.2f} s"
    assert snap.versions["v1"].stage == "retired"


def test_lineage_of_a_request_and_of_a_version_reads_the_same_on_both_backends(any_db):
    from tuneloop.lineage import lineage
    from tuneloop.registry import DatasetRecord, register_dataset

    _log(any_db, [("req1", "production", "v1", 200, 0.1, None)])
    for ds, parents in (("base@1", []), ("fb@2", ["base@1"])):
        register_dataset(any_db, DatasetRecord(ds, ds[:-2], ds[-1], "sft", "/d", 1, 0, 0, parent_ids=parents))
    any_db.execute("INSERT INTO dataset_rows VALUES ('fb@2', 'r0', 'train', 'req1', 'feedback')")
    register_version(any_db, ModelVersion("v1", "adapter", "/b", "/p/v1", "h1", dataset_id="base@1"))
    register_version(any_db, ModelVersion("v2", "adapter", "/b", "/p/v2", "h2", parent_version="v1", dataset_id="fb@2"))
    got = lineage(any_db, "req1")
    assert got["request"]["model_version"] == "v1" and isinstance(got["request"]["received_at"], str)
    assert got["used_in_datasets"] == [{"dataset_id": "fb@2", "split": "train", "origin": "feedback"}]
    assert got["trained_versions"] == [{"name": "v2", "stage": "candidate", "dataset_id": "fb@2"}]
    chain = lineage(any_db, "v2")["chain"]
    assert [c["version"] for c in chain] == ["v2", "v1"]
    assert chain[0]["dataset"]["source_requests"] == ["req1"]
    assert chain[0]["dataset"]["parents"][0]["id"] == "base@1"
    with pytest.raises(RegistryError, match="neither"):
        lineage(any_db, "nothing")


def test_a_judged_decision_is_applied_and_recorded_with_its_numbers_on_both_backends(any_db):
    from tuneloop.settings import DeploySettings

    _register(any_db, "v1", "v2")
    set_stage(any_db, "v1", "production")
    c = canary.start(any_db, "v2", 0.1)
    _log(any_db, [(f"p{i}", "production", "v1", 200, 0.5, None) for i in range(100)])
    _log(any_db, [(f"c{i}", "canary", "v2", 500 if i < 60 else 200, 0.5, None) for i in range(300)])
    d = canary.judge(any_db, c.id, DeploySettings(canary_min_requests=1000))
    assert d.action == "rollback" and d.reasons[0].startswith("worse with confidence: error rate 20.00% vs 0.00%")
    decided = canary.apply(any_db, d, actor="judge")
    assert decided.status == "rolled_back" and decided.decision["reasons"] == d.reasons
    assert decided.decision["checks"]["error_rate"]["worse"] is True
    assert store_deploy.get_canary(any_db, c.id).decision == decided.decision
    assert _stages(any_db) == {"v1": "production", "v2": "retired"}
