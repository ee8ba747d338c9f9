"""Canary deploys: start, judge the arms from the request log + feedback, promote or roll back atomically."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tuneloop.db import utcnow
from tuneloop.ids import new_id
from tuneloop.monitoring import canary
from tuneloop.monitoring.canary import CanaryError
from tuneloop.registry import ModelVersion, get_version, register_version, set_stage, version_by_stage
from tuneloop.settings import DeploySettings

DEPLOY = DeploySettings(canary_min_requests=20, canary_max_minutes=30)


@pytest.fixture
def prod_and_candidate(db):
    for name in ("v1", "v2"):
        register_version(
            db, ModelVersion(name=name, kind="adapter", base_model="/b", path=f"/p/{name}", content_hash=name)
        )
    set_stage(db, "v1", "production", actor="alice", reason="first")
    return db


def traffic(db, arm, n, *, errors=0, latency=0.5, thumbs_down=0, thumbs_up=0, version=None):
    version = version or ("v2" if arm == "canary" else "v1")
    with db.connect() as con:
        for i in range(n):
            rid = new_id("chatcmpl-")
            status = 500 if i < errors else 200
            con.execute(
                """INSERT INTO requests (id, received_at, route, model, model_version, arm, status, latency_s, response)
                           VALUES (?, ?, 'chat.completions', 'production', ?, ?, ?, ?, 'ok')""",
                [rid, utcnow(), version, arm, status, latency],
            )
            rating = -1 if i < thumbs_down else (1 if i < thumbs_down + thumbs_up else None)
            if rating is not None:
                con.execute(
                    "INSERT INTO feedback (id, request_id, rating, rating_kind, model_version, created_at) VALUES (?, ?, ?, 'thumbs', ?, ?)",
                    [new_id(), rid, rating, version, utcnow()],
                )


def test_start_moves_the_candidate_to_canary_and_records_the_split(prod_and_candidate):
    db = prod_and_candidate
    c = canary.start(db, "v2", 0.25, actor="bob", reason="try v2")
    assert (c.candidate, c.production, c.share, c.status) == ("v2", "v1", 0.25, "running")
    assert get_version(db, "v2").stage == "canary" and get_version(db, "v1").stage == "production"
    ev = db.query(
        "SELECT actor, reason, to_stage FROM deploy_events WHERE model_version = 'v2' ORDER BY occurred_at DESC LIMIT 1"
    )[0]
    assert ev == {"actor": "bob", "reason": "try v2", "to_stage": "canary"}
    with pytest.raises(CanaryError, match="still running"):
        canary.start(db, "v2", 0.1)


def test_start_refuses_bad_requests(db):
    register_version(db, ModelVersion(name="v1", kind="adapter", base_model="/b", path="/p", content_hash="h"))
    with pytest.raises(CanaryError, match="no version is in production"):
        canary.start(db, "v1", 0.1)
    with pytest.raises(CanaryError, match="between 0 and 1"):
        canary.start(db, "v1", 1.5)
    with pytest.raises(CanaryError, match="unknown model version"):
        canary.start(db, "nope", 0.1)
    assert db.query("SELECT count(*) AS n FROM canaries")[0]["n"] == 0


def test_judge_waits_for_enough_canary_requests(prod_and_candidate):
    db = prod_and_candidate
    c = canary.start(db, "v2", 0.1)
    traffic(db, "production", 100)
    traffic(db, "canary", 5)
    d = canary.judge(db, c.id, DEPLOY)
    assert d.action == "wait" and "5/20" in d.reasons[0]


def test_a_healthy_canary_is_promoted(prod_and_candidate):
    db = prod_and_candidate
    c = canary.start(db, "v2", 0.1)
    traffic(db, "production", 100, errors=1, thumbs_down=5, thumbs_up=20)
    traffic(db, "canary", 25, thumbs_down=1, thumbs_up=6, latency=0.6)
    d = canary.judge(db, c.id, DEPLOY)
    assert d.action == "promote", d.reasons
    assert d.arms["canary"].requests == 25 and d.arms["production"].error_rate == pytest.approx(0.01)
    assert d.arms["canary"].negative_share == pytest.approx(1 / 7)
    canary.apply(db, d)
    assert version_by_stage(db, "production").name == "v2" and get_version(db, "v1").stage == "retired"
    row = db.query("SELECT status, decision FROM canaries WHERE id = ?", [c.id])[0]
    assert row["status"] == "promoted" and "all checks passed" in row["decision"]


@pytest.mark.parametrize(
    "canary_traffic, expect",
    [
        (dict(errors=5), "error rate 20.00% vs 0.00%"),
        (dict(latency=2.0), "p50 latency 2.000s vs 0.500s"),
        (dict(thumbs_down=10, thumbs_up=2), "thumbs-down 83% of 12 vs 10% of 20"),
    ],
)
def test_an_unhealthy_canary_is_rolled_back_with_the_numbers(prod_and_candidate, canary_traffic, expect):
    db = prod_and_candidate
    c = canary.start(db, "v2", 0.1)
    traffic(db, "production", 100, thumbs_down=2, thumbs_up=18)
    traffic(db, "canary", 25, **canary_traffic)
    d = canary.judge(db, c.id, DEPLOY)
    assert d.action == "rollback" and any(expect in r for r in d.reasons), d.reasons
    canary.apply(db, d)
    assert get_version(db, "v2").stage == "retired" and version_by_stage(db, "production").name == "v1"
    assert db.query("SELECT status FROM canaries WHERE id = ?", [c.id])[0]["status"] == "rolled_back"


def test_a_canary_drifting_where_production_does_not_is_rolled_back(prod_and_candidate):
    db = prod_and_candidate
    c = canary.start(db, "v2", 0.1)
    traffic(db, "production", 50)
    traffic(db, "canary", 25)
    with db.connect() as con:
        for v, drifted in (("v1", False), ("v2", True)):
            con.execute(
                """INSERT INTO drift_reports (id, model_version, feature, statistic, value, drifted, created_at)
                           VALUES (?, ?, 'overall', 'score', ?, ?, ?)""",
                [new_id(), v, 0.9 if drifted else 0.1, drifted, utcnow()],
            )
    d = canary.judge(db, c.id, DEPLOY)
    assert d.action == "rollback" and "canary drift drifted" in d.reasons[0]


def test_no_canary_traffic_by_the_deadline_is_a_rollback(prod_and_candidate):
    db = prod_and_candidate
    c = canary.start(db, "v2", 0.1)
    traffic(db, "production", 30)
    assert canary.judge(db, c.id, DEPLOY).action == "wait"
    d = canary.judge(db, c.id, DEPLOY, now=utcnow() + timedelta(minutes=31))
    assert d.action == "rollback" and "no canary traffic" in d.reasons[0]


def test_promotion_is_atomic_a_failure_changes_nothing(prod_and_candidate):
    db = prod_and_candidate
    c = canary.start(db, "v2", 0.1)
    n_events = db.query("SELECT count(*) AS n FROM deploy_events")[0]["n"]
    db.execute("UPDATE model_versions SET name = 'v2-renamed' WHERE name = 'v2'")  # the candidate vanished
    with pytest.raises(Exception, match="unknown model version"):
        canary.promote(db, c.id)
    assert db.query("SELECT status FROM canaries WHERE id = ?", [c.id])[0]["status"] == "running"
    assert version_by_stage(db, "production").name == "v1"
    assert db.query("SELECT count(*) AS n FROM deploy_events")[0]["n"] == n_events


def test_rollback_after_a_promotion_restores_the_previous_production(prod_and_candidate):
    db = prod_and_candidate
    set_stage(db, "v2", "production", actor="carol", reason="ship it")
    retired, restored = canary.rollback_production(db, actor="dave", reason="customers complain")
    assert (retired, restored) == ("v2", "v1")
    assert version_by_stage(db, "production").name == "v1" and get_version(db, "v2").stage == "retired"
    ev = db.query("""SELECT actor, reason FROM deploy_events WHERE model_version = 'v2' AND to_stage = 'retired'
                     ORDER BY occurred_at DESC LIMIT 1""")[0]
    assert ev == {"actor": "dave", "reason": "rolled back: customers complain"}
    with pytest.raises(CanaryError, match="no previous production version"):
        canary.rollback_production(db)  # v2 was rolled back: a second rollback does not bring it back


def test_watch_polls_until_it_decides_then_acts(prod_and_candidate):
    db = prod_and_candidate
    c = canary.start(db, "v2", 0.1)
    traffic(db, "production", 40)
    ticks = []

    def more_traffic(_s):  # each poll interval, 10 more canary requests arrive
        traffic(db, "canary", 10)

    d = canary.watch(db, c.id, DEPLOY, poll_s=0, on_tick=ticks.append, sleep=more_traffic)
    assert [t.action for t in ticks] == ["wait", "wait", "promote"]
    assert d.action == "promote" and version_by_stage(db, "production").name == "v2"


def test_cli_canary_status_promote_and_rollback(cli, prod_and_candidate):
    db = prod_and_candidate
    r = cli("deploy", "canary", "v2", "--share", "0.2", "--force", "--reason", "cli test")
    assert "v2 takes 20% of production traffic (production: v1)" in r.stdout
    traffic(db, "canary", 3)
    st = cli("deploy", "status")
    assert "production: v1" in st.stdout and "canary:     v2 at 20%" in st.stdout and "wait" in st.stdout
    again = cli("deploy", "canary", "v2", "--force", check=False)
    assert again.returncode == 2 and "still running" in again.stderr
    rb = cli("deploy", "rollback", "--reason", "not convinced")
    assert "rolled back canary v2; v1 keeps serving production" in rb.stdout
    assert get_version(db, "v2").stage == "retired"
    p = cli("deploy", "promote", "v2", "--force", "--reason", "changed my mind")
    assert "promoted v2 to production (retired v1)" in p.stdout
    rb = cli("deploy", "rollback")
    assert "rolled back v2; v1 is in production again" in rb.stdout
    nogate = cli("deploy", "promote", "v2", check=False)
    assert nogate.returncode == 2 and "has not been through the gate" in nogate.stderr


# ---- against a live `tuneloop serve` (real engine, real HTTP): the server splits, the judge decides -------------

from fixtures_server import make_lora, start_server  # noqa: E402


@pytest.fixture(scope="module")
def canary_server(tiny_model, tmp_path_factory):
    """Its own short-lived server (the canary changes deploy state, which the shared live_server must not see)."""
    from tuneloop.db import Database
    from tuneloop.ids import hash_path

    root = tmp_path_factory.mktemp("canary-live")
    db = Database(root / "home" / "tuneloop.duckdb")
    for name, seed in (("live-a", 1), ("live-b", 2), ("live-c", 3)):
        path = make_lora(tiny_model, root / name, seed=seed)
        register_version(
            db,
            ModelVersion(
                name=name, kind="adapter", base_model=str(tiny_model), path=str(path), content_hash=hash_path(path)
            ),
        )
    set_stage(db, "live-a", "production", actor="test", reason="baseline")
    # the server judges canaries by itself every second, once a canary has 150 requests
    srv = start_server(
        root / "home",
        tiny_model,
        env={"TUNELOOP_DEPLOY__CANARY_JUDGE_INTERVAL_S": "1", "TUNELOOP_DEPLOY__CANARY_MIN_REQUESTS": "150"},
    )
    yield srv, db
    srv.stop()


def _chat(client, user, i):
    return client.chat.completions.create(
        model="production", messages=[{"role": "user", "content": f"hello {i}"}], max_tokens=8, user=user
    )


@pytest.mark.engine
@pytest.mark.slow
def test_live_canary_gets_its_share_sticky_per_user_and_rolls_back_under_load_without_failures(canary_server):
    import asyncio

    import httpx

    srv, db = canary_server
    c = canary.start(db, "live-b", 0.3, actor="test")
    httpx.post(srv.url + "/admin/state/refresh", timeout=30).raise_for_status()
    client = srv.openai()
    served = {}
    for i in range(200):
        r = _chat(client, f"user-{i}", i)
        served[f"user-{i}"] = r.model
    again = {u: _chat(client, u, 0).model for u in list(served)[:20]}
    assert again == {u: served[u] for u in again}  # sticky per user
    srv.flush_log()
    rows = db.query(
        "SELECT arm, model_version, count(*) AS n FROM requests WHERE received_at >= ? GROUP BY ALL", [c.started_at]
    )
    by_arm = {r["arm"]: r for r in rows}
    share = by_arm["canary"]["n"] / sum(r["n"] for r in rows)
    assert abs(share - 0.3) < 0.1, rows  # binomial sd ~0.03 at n=220
    assert by_arm["canary"]["model_version"] == "live-b" and by_arm["production"]["model_version"] == "live-a"
    d = canary.judge(db, c.id, DeploySettings(canary_min_requests=20))
    assert d.action in ("promote", "rollback") and d.arms["canary"].requests == by_arm["canary"]["n"]

    async def load_and_rollback():
        ac = srv.async_openai()

        async def one(i):
            return await ac.chat.completions.create(
                model="production", messages=[{"role": "user", "content": f"load {i}"}], max_tokens=16, user=f"load-{i}"
            )

        tasks = [asyncio.create_task(one(i)) for i in range(48)]
        await asyncio.sleep(0.3)
        await asyncio.to_thread(canary.rollback, db, c.id, "test", "rollback under load")
        await asyncio.to_thread(lambda: httpx.post(srv.url + "/admin/state/refresh", timeout=30).raise_for_status())
        first = await asyncio.gather(*tasks, return_exceptions=True)
        after = await asyncio.gather(*[one(100 + i) for i in range(30)], return_exceptions=True)
        return first, after

    first, after = asyncio.run(load_and_rollback())
    failed = [r for r in first + after if isinstance(r, BaseException)]
    assert not failed, failed[:3]
    assert {r.model for r in after} == {"live-a"}  # every request after the rollback goes to production
    assert get_version(db, "live-b").stage == "retired" and version_by_stage(db, "production").name == "live-a"


@pytest.mark.engine
@pytest.mark.slow
def test_live_server_judges_the_canary_by_itself_once_it_has_enough_requests(canary_server):
    import time

    import httpx

    srv, db = canary_server
    c = canary.start(db, "live-c", 0.9, actor="test")
    httpx.post(srv.url + "/admin/state/refresh", timeout=30).raise_for_status()
    client = srv.openai()
    for i in range(190):
        _chat(client, f"judge-{i}", i)
    srv.flush_log()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and canary.get(db, c.id).status == "running":
        time.sleep(0.5)
    decided = canary.get(db, c.id)
    assert decided.status in ("promoted", "rolled_back")
    events = db.query("SELECT to_stage, actor FROM deploy_events WHERE model_version = 'live-c' ORDER BY occurred_at")
    assert events[-1]["actor"] == "server-canary-judge"
    assert events[-1]["to_stage"] == ("production" if decided.status == "promoted" else "retired")
