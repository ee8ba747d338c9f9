"""Canary deploys: start, judge the arms from the request log + feedback, promote or roll back atomically."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tuneloop.db import utcnow
from tuneloop.ids import new_id
from tuneloop.monitoring import canary
from tuneloop.monitoring.canary import CanaryError
from tuneloop.registry import ModelVersion, get_version, list_versions, register_version, set_stage, version_by_stage
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


def traffic(db, arm, n, *, errors=0, ttft=0.5, thumbs_down=0, thumbs_up=0, version=None):
    """``n`` logged requests on ``arm``: the first ``errors`` failed, then ratings: ``thumbs_down`` down, ``thumbs_up`` up."""
    version = version or ("v2" if arm == "canary" else "v1")
    now = utcnow()
    reqs, fbs = [], []
    for i in range(n):
        rid = new_id("chatcmpl-")
        reqs.append([rid, now, version, arm, 500 if i < errors else 200, ttft])
        rating = -1 if i < thumbs_down else (1 if i < thumbs_down + thumbs_up else None)
        if rating is not None:
            fbs.append([new_id(), rid, rating, version, now])
    with db.connect() as con:
        con.executemany(
            """INSERT INTO requests (id, received_at, route, model, model_version, arm, status, ttft_s, response)
                       VALUES (?, ?, 'chat.completions', 'production', ?, ?, ?, ?, 'ok')""",
            reqs,
        )
        if fbs:
            con.executemany(
                "INSERT INTO feedback (id, request_id, rating, rating_kind, model_version, created_at) VALUES (?, ?, ?, 'thumbs', ?, ?)",
                fbs,
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


@pytest.fixture
def classifiers(db):
    """cls-v1 in production, cls-v2 a canary of it; and a chat version in production that must not count."""
    for name in ("cls-v1", "cls-v2"):
        register_version(
            db,
            ModelVersion(
                name=name, kind="merged", base_model="/b", path=f"/p/{name}", content_hash=name, task="classification"
            ),
        )
    register_version(db, ModelVersion(name="chat-v1", kind="adapter", base_model="/b", path="/p/c", content_hash="c"))
    set_stage(db, "chat-v1", "production")
    set_stage(db, "cls-v1", "production")
    return db


def classified(db, arm, n, *, wrong=0, right=0, latency=0.02, thumbs_down=0):
    """``n`` logged classifications on ``arm`` predicting 'bug': ``wrong`` corrected to 'billing', then ``right``
    confirmed with the label 'bug', then ``thumbs_down`` thumbs-down without a label."""
    version = "cls-v2" if arm == "canary" else "cls-v1"
    now = utcnow()
    reqs, fbs = [], []
    for i in range(n):
        rid = new_id("classify-")
        reqs.append([rid, now, version, arm, latency])
        if i < wrong + right:
            fbs.append([new_id(), rid, None, "billing" if i < wrong else "bug", version, now])
        elif i < wrong + right + thumbs_down:
            fbs.append([new_id(), rid, -1, None, version, now])
    with db.connect() as con:
        con.executemany(
            """INSERT INTO requests (id, received_at, route, model, model_version, arm, status, latency_s, response)
                       VALUES (?, ?, 'classify', 'production', ?, ?, 200, ?, 'bug')""",
            reqs,
        )
        con.executemany(
            "INSERT INTO feedback (id, request_id, rating, label, model_version, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            fbs,
        )


def test_a_classifier_canary_is_judged_on_label_corrections_and_its_whole_latency(classifiers):
    db = classifiers
    c = canary.start(db, "cls-v2", 0.2)
    assert (c.candidate, c.production) == ("cls-v2", "cls-v1")  # the production classifier, not chat-v1
    # production: 40% of judged predictions corrected to another label; the canary: 5%, and as fast
    classified(db, "production", 800, wrong=160, right=200, thumbs_down=40)
    classified(db, "canary", 300, wrong=10, right=190)
    d = canary.judge(db, c.id, DEPLOY)
    ca, pa = d.arms["canary"], d.arms["production"]
    assert (ca.rated, ca.negative, pa.rated, pa.negative) == (200, 10, 400, 200)  # labels and thumbs-down both count
    assert ca.latency_kind == pa.latency_kind == "latency" and ca.ttft_p50_s == pytest.approx(0.02)
    assert d.action == "promote" and "better with confidence" in d.reasons[0]
    assert "p50 latency 0.020s vs 0.020s" in d.checks["ttft"]["detail"]


def test_a_classifier_canary_whose_predictions_users_correct_more_is_rolled_back(classifiers):
    db = classifiers
    c = canary.start(db, "cls-v2", 0.2)
    classified(db, "production", 800, wrong=20, right=380)
    classified(db, "canary", 200, wrong=60, right=90)
    d = canary.judge(db, c.id, DEPLOY)
    assert (
        d.action == "rollback"
        and "judged wrong (label corrected or thumbs-down) 40% of 150 vs 5% of 400" in d.reasons[0]
    )
    canary.apply(db, d)
    assert {v.name: v.stage for v in list_versions(db)} == {
        "cls-v1": "production",
        "cls-v2": "retired",
        "chat-v1": "production",
    }


def test_judge_waits_for_enough_canary_requests(prod_and_candidate):
    db = prod_and_candidate
    c = canary.start(db, "v2", 0.1)
    traffic(db, "production", 100)
    traffic(db, "canary", 5)
    d = canary.judge(db, c.id, DEPLOY)
    assert d.action == "wait" and "5/20" in d.reasons[0]


def test_a_canary_better_with_confidence_is_promoted_early_with_the_numbers(prod_and_candidate):
    db = prod_and_candidate
    c = canary.start(db, "v2", 0.1)
    traffic(db, "production", 2000, errors=20, thumbs_down=150, thumbs_up=450)
    traffic(db, "canary", 400, thumbs_down=16, thumbs_up=184, ttft=0.6)
    d = canary.judge(db, c.id, DEPLOY)
    assert d.action == "promote", d.reasons
    assert d.arms["canary"].requests == 400 and d.arms["production"].error_rate == pytest.approx(0.01)
    assert d.arms["canary"].negative_share == pytest.approx(0.08)
    assert "better with confidence after 400 canary requests: thumbs-down 8% of 200 vs 25% of 600" in d.reasons[0]
    lo, hi = d.checks["negative_feedback"]["interval"]
    assert lo < -0.17 < hi < 0  # the observed difference lies inside, and the whole interval below 0
    assert d.checks["ttft"]["non_inferior"] and d.checks["error_rate"]["non_inferior"]
    canary.apply(db, d)
    assert version_by_stage(db, "production").name == "v2" and get_version(db, "v1").stage == "retired"
    row = db.query("SELECT status, decision FROM canaries WHERE id = ?", [c.id])[0]
    assert row["status"] == "promoted" and "better with confidence" in row["decision"]


def test_a_canary_neither_better_nor_worse_waits_for_the_budget_then_is_promoted_as_non_inferior(prod_and_candidate):
    db = prod_and_candidate
    c = canary.start(db, "v2", 0.1)
    deploy = replace(DEPLOY, canary_max_requests=800)
    traffic(db, "production", 4000, thumbs_down=240, thumbs_up=960)
    traffic(db, "canary", 400, thumbs_down=40, thumbs_up=160)
    d = canary.judge(db, c.id, deploy)
    assert d.action == "wait" and "400/20" in d.reasons[0]
    traffic(db, "canary", 400, thumbs_down=40, thumbs_up=160)
    d = canary.judge(db, c.id, deploy)
    assert d.action == "promote", d.reasons
    assert "non-inferior on every metric after 800 canary requests" in d.reasons[0]
    assert all(d.checks[m]["non_inferior"] for m in ("negative_feedback", "error_rate", "ttft"))
    assert not d.checks["negative_feedback"]["better"]


def test_at_the_budget_a_canary_not_shown_non_inferior_is_rolled_back(prod_and_candidate):
    db = prod_and_candidate
    c = canary.start(db, "v2", 0.1)
    traffic(db, "production", 100, thumbs_down=10, thumbs_up=40)
    traffic(db, "canary", 30, thumbs_down=3, thumbs_up=12)  # too few to tell
    d = canary.judge(db, c.id, replace(DEPLOY, canary_max_requests=30))
    assert d.action == "rollback" and "not shown non-inferior after 30 canary requests" in d.reasons[0], d.reasons


@pytest.mark.parametrize(
    "n, canary_traffic, expect",
    [
        (300, dict(errors=60), "error rate 20.00% vs 0.00%"),
        (60, dict(ttft=2.0), "p50 time to first token 2.000s vs 0.500s"),
        (60, dict(thumbs_down=40, thumbs_up=10), "thumbs-down 80% of 50 vs 10% of 60"),
    ],
)
def test_a_canary_worse_with_confidence_is_rolled_back_at_once_with_the_numbers(
    prod_and_candidate, n, canary_traffic, expect
):
    db = prod_and_candidate
    c = canary.start(db, "v2", 0.1)
    traffic(db, "production", 100, thumbs_down=6, thumbs_up=54)
    traffic(db, "canary", n, **canary_traffic)
    d = canary.judge(db, c.id, replace(DEPLOY, canary_min_requests=1000))  # long before it could be promoted
    assert d.action == "rollback" and any(r.startswith("worse with confidence: " + expect) for r in d.reasons), (
        d.reasons
    )
    canary.apply(db, d)
    assert get_version(db, "v2").stage == "retired" and version_by_stage(db, "production").name == "v1"
    assert db.query("SELECT status FROM canaries WHERE id = ?", [c.id])[0]["status"] == "rolled_back"


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
    traffic(db, "production", 1000)
    ticks = []

    def more_traffic(_s):  # each poll interval, 100 more canary requests arrive
        traffic(db, "canary", 100)

    d = canary.watch(
        db, c.id, replace(DEPLOY, canary_max_requests=200), poll_s=0, on_tick=ticks.append, sleep=more_traffic
    )
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

from fixtures_server import make_lora  # noqa: E402


@pytest.fixture(scope="module")
def canary_server(live_server, tiny_model, tmp_path_factory):
    """The session's live server with four adapter versions registered and ``live-a`` in production.

    Its settings (tests/fixtures_server.py) judge canaries every second. Afterwards every version these tests
    registered is retired and the server reloads its state, so the session server is back to no production
    version for the tests that follow.
    """
    from tuneloop.ids import hash_path

    root = tmp_path_factory.mktemp("canary-live")
    db = live_server.db()
    names = ("live-a", "live-b", "live-c", "live-d")
    for seed, name in enumerate(names, start=1):
        path = make_lora(tiny_model, root / name, seed=seed)
        register_version(
            db,
            ModelVersion(
                name=name, kind="adapter", base_model=str(tiny_model), path=str(path), content_hash=hash_path(path)
            ),
        )
    set_stage(db, "live-a", "production", actor="test", reason="baseline")
    _refresh(live_server)
    yield live_server, db
    db.execute("UPDATE canaries SET status = 'rolled_back' WHERE status = 'running'")
    for name in names:
        set_stage(db, name, "retired", actor="test", reason="end of the canary tests")
    _refresh(live_server)


def _refresh(srv) -> None:
    import httpx

    httpx.post(srv.url + "/admin/state/refresh", timeout=30).raise_for_status()


def _concurrently(fn, items, workers: int = 8) -> list:
    """``fn`` over ``items`` from ``workers`` threads, results in the order of ``items``."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


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
    _refresh(srv)
    client = srv.openai()
    served = dict(
        zip([f"user-{i}" for i in range(200)], _concurrently(lambda i: _chat(client, f"user-{i}", i).model, range(200)))
    )
    again = dict(zip(list(served)[:20], _concurrently(lambda u: _chat(client, u, 0).model, list(served)[:20])))
    assert again == {u: served[u] for u in again}  # sticky per user
    srv.flush_log()
    rows = db.query(
        "SELECT arm, model_version, count(*) AS n FROM requests WHERE received_at >= ? GROUP BY ALL", [c.started_at]
    )
    by_arm = {r["arm"]: r for r in rows}
    share = by_arm["canary"]["n"] / sum(r["n"] for r in rows)
    assert abs(share - 0.3) < 0.1, rows  # binomial sd ~0.03 at n=220
    assert by_arm["canary"]["model_version"] == "live-b" and by_arm["production"]["model_version"] == "live-a"
    d = canary.judge(db, c.id, DeploySettings(canary_min_requests=20, canary_max_requests=20))
    assert d.arms["canary"].requests == by_arm["canary"]["n"]
    # no ratings and ~66 error-free canary requests: at its budget the canary cannot be shown within the
    # default 2-point error-rate margin, so the judge rolls it back rather than promote on too little evidence
    assert d.action == "rollback" and d.reasons[0].startswith("not shown non-inferior after"), d.reasons
    assert "error rate 0.00% vs 0.00%" in d.reasons[0]

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


def _rated_traffic(srv, client, canary_version: str, canary_rating: str, n: int, tag: str) -> dict[str, int]:
    """``n`` chats from 8 concurrent users; each rates every canary answer ``canary_rating`` and every production
    answer the opposite."""
    import httpx

    other = {"up": "down", "down": "up"}[canary_rating]
    with httpx.Client(base_url=srv.url, timeout=60) as http:

        def one(i: int) -> str:
            r = _chat(client, f"{tag}-{i}", i)
            arm = "canary" if r.model == canary_version else "production"
            rating = canary_rating if arm == "canary" else other
            http.post("/v1/feedback", json={"request_id": r.id, "rating": rating}).raise_for_status()
            return arm

        arms = _concurrently(one, range(n))
    return {"canary": arms.count("canary"), "production": arms.count("production")}


def _rated_canary(srv, db, version: str, canary_rating: str, n: int, tag: str):
    """Start a 50% canary of ``version``, send ``n`` rated chats, and wait for the server's own decision."""

    c = canary.start(db, version, 0.5, actor="test")
    _refresh(srv)
    served = _rated_traffic(srv, srv.openai(), version, canary_rating, n, tag)
    assert served["canary"] >= 50 and served["production"] >= 50, served
    return _wait_decided(srv, db, c.id)


def _wait_decided(srv, db, canary_id: str, timeout_s: float = 60):
    import time

    srv.flush_log()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and canary.get(db, canary_id).status == "running":
        time.sleep(0.5)
    return canary.get(db, canary_id)


@pytest.mark.engine
@pytest.mark.slow
def test_live_server_rolls_back_a_clearly_worse_canary_by_itself(canary_server):
    srv, db = canary_server
    decided = _rated_canary(srv, db, "live-c", "down", 160, "worse")
    assert decided.status == "rolled_back", decided
    assert decided.decision["action"] == "rollback"
    assert decided.decision["reasons"][0].startswith("worse with confidence: thumbs-down 100% of")
    events = db.query("SELECT to_stage, actor FROM deploy_events WHERE model_version = 'live-c' ORDER BY occurred_at")
    assert events[-1] == {"to_stage": "retired", "actor": "server-canary-judge"}
    assert version_by_stage(db, "production").name == "live-a"


@pytest.mark.engine
@pytest.mark.slow
def test_live_server_promotes_a_clearly_better_canary_by_itself(canary_server):
    srv, db = canary_server
    decided = _rated_canary(srv, db, "live-d", "up", 400, "better")
    assert decided.status == "promoted", (decided, canary.judge(db, decided.id, DeploySettings()).summary())
    assert decided.decision["reasons"][0].startswith("better with confidence after")
    checks = decided.decision["checks"]
    assert (
        checks["negative_feedback"]["better"]
        and checks["error_rate"]["non_inferior"]
        and checks["ttft"]["non_inferior"]
    )
    events = db.query("SELECT to_stage, actor FROM deploy_events WHERE model_version = 'live-d' ORDER BY occurred_at")
    assert events[-1] == {"to_stage": "production", "actor": "server-canary-judge"}
    assert version_by_stage(db, "production").name == "live-d"
