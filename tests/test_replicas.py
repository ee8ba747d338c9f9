"""Two stateless replicas on one PostgreSQL behind a real load balancer: what a production deployment relies on.

The fixture starts, on loopback: a real PostgreSQL server (Debian's binaries, run as an unprivileged user), two
real ``tuneloop serve`` replicas over the tiny model sharing it (``database.url``), and HAProxy in front of them,
health-checking ``/readyz`` every 200 ms. Traffic comes through the official ``openai`` client via the balancer;
deploy and key changes are made with the ``tuneloop`` CLI, as an operator would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from fixtures_server import SERVER_SETTINGS, make_lora

from tuneloop.db import Database, open_database
from tuneloop.deploy.server_process import ServerProcess, free_port, tuneloop_command, tuneloop_server

pytestmark = [pytest.mark.engine, pytest.mark.slow]

PROPAGATION_BOUND_S = 2.0  # the target for a deploy or key change to reach every replica
REPLICAS = ("r0", "r1")

HAPROXY_CFG = """
global
    maxconn 512
defaults
    mode http
    timeout connect 2s
    timeout client 300s
    timeout server 300s
    retries 3
    option redispatch
    retry-on conn-failure empty-response
frontend tuneloop
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    # without it a check times out after `inter` (200 ms): one slow /readyz on the replica left alone, while the
    # other loads its engine on the same two cores, took it out and haproxy itself answered 503 to everything
    timeout check 2s
    default-server inter 200ms fastinter 100ms downinter 200ms fall 1 rise 1
{servers}
"""


@dataclass
class Cluster:
    """PostgreSQL + replicas + balancer, with what the tests need to drive them."""

    pg: object
    home: Path
    model: Path
    env: dict[str, str]
    ports: dict[str, int]
    lb_port: int
    servers: dict[str, ServerProcess] = field(default_factory=dict)
    admin_headers: dict[str, str] = field(default_factory=dict)

    @property
    def lb(self) -> str:
        return f"http://127.0.0.1:{self.lb_port}"

    def url(self, replica: str) -> str:
        return f"http://127.0.0.1:{self.ports[replica]}"

    def db(self) -> Database:
        return open_database(self.pg.url, lock_timeout_s=10.0)  # type: ignore[attr-defined]

    def openai(self, api_key: str = "unused"):
        import openai

        return openai.OpenAI(base_url=self.lb + "/v1", api_key=api_key, max_retries=0, timeout=120)

    def start(self, replica: str) -> None:
        port = self.ports[replica]
        env = {**self.env, "TUNELOOP_SERVER__REPLICA": replica}
        srv = tuneloop_server(
            self.home, self.home / f"serve-{replica}.log", port=port, model=self.model, env=env, cwd=self.home
        )
        self.servers[replica] = srv.start()
        srv.wait_ready(240)

    def stop(self, replica: str, sig: int = signal.SIGTERM) -> int | None:
        """``sig`` to the replica's server process alone, as Kubernetes stops a pod (the engine child is the
        server's to stop); its exit code."""
        return self.servers[replica].stop(sig, grace_s=90, group=False)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(
            tuneloop_command(*args, home=self.home), env=self.env, capture_output=True, text=True, timeout=300
        )
        if check and r.returncode != 0:
            raise AssertionError(f"tuneloop {' '.join(args)} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def state(self, replica: str) -> dict:
        r = httpx.get(self.url(replica) + "/admin/state", headers=self.admin_headers, timeout=30)
        r.raise_for_status()
        return r.json()

    def flush(self) -> None:
        for rep in REPLICAS:
            httpx.post(self.url(rep) + "/admin/log/flush", headers=self.admin_headers, timeout=60).raise_for_status()

    def metric(self, replica: str, name: str) -> float:
        text = httpx.get(self.url(replica) + "/metrics", timeout=30).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def wait_until(what: str, cond: Callable[[], bool], timeout: float, poll: float = 0.02) -> float:
    """Seconds until ``cond()`` held (polling every ``poll``); fails after ``timeout``."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(poll)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory) -> Iterator[Cluster]:
    import tempfile

    from conftest import require_tool

    from tuneloop.deploy.postgres_server import LocalPostgres
    from tuneloop.ids import hash_path
    from tuneloop.registry import ModelVersion, register_version

    haproxy = require_tool("haproxy")
    root = Path(tempfile.mkdtemp(prefix="tuneloop-replicas-pg-"))
    root.chmod(0o755)
    pg = LocalPostgres(root).start()
    home = tmp_path_factory.mktemp("replicas-home")
    adapters = tmp_path_factory.mktemp("replica-adapters")
    env = {
        **os.environ,
        **SERVER_SETTINGS,
        "TUNELOOP_HOME": str(home),
        "TUNELOOP_DATABASE__URL": pg.url,
        "TUNELOOP_SERVER__DRAIN_S": "1.0",  # 5 health-check intervals: the balancer takes a stopping replica out
        "TUNELOOP_SERVER__ADAPTER_ROOTS": f"runs,models,{adapters}",
        # a canary is decided at its traffic budget of 30 requests (more than either replica serves alone)
        "TUNELOOP_DEPLOY__CANARY_MIN_REQUESTS": "30",
        "TUNELOOP_DEPLOY__CANARY_MAX_REQUESTS": "30",
    }
    env.pop("TUNELOOP_CONFIG", None)
    db = open_database(pg.url)
    for name, seed in (("tiny-a", 1), ("tiny-b", 2)):
        path = make_lora(tiny_model, adapters / name, r=8, seed=seed)
        register_version(
            db,
            ModelVersion(
                name=name, kind="adapter", base_model=str(tiny_model), path=str(path), content_hash=hash_path(path)
            ),
        )
    db.close()
    ports = {r: free_port() for r in REPLICAS}
    c = Cluster(pg, home, tiny_model, env, ports, free_port())
    cfg = home / "haproxy.cfg"
    cfg.write_text(
        HAPROXY_CFG.format(
            port=c.lb_port, servers="\n".join(f"    server {r} 127.0.0.1:{p} check" for r, p in ports.items())
        )
    )
    lb = subprocess.Popen([haproxy, "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for r in REPLICAS:
            c.start(r)
        wait_until("the balancer sees both replicas up", lambda: _lb_ready(c), 30)
        yield c
    finally:
        for r in REPLICAS:
            if r in c.servers:
                c.stop(r)
        lb.terminate()
        lb.wait(10)
        pg.stop()


def _lb_ready(c: Cluster) -> bool:
    try:
        seen = {httpx.get(c.lb + "/readyz", timeout=5).status_code for _ in range(4)}
    except httpx.HTTPError:
        return False
    return seen == {200}


def chat(client, user: str, text: str = "hi") -> str:
    r = client.chat.completions.create(
        model="production", messages=[{"role": "user", "content": text}], max_tokens=4, user=user
    )
    return r.id


def logged(db: Database, ids: list[str]) -> dict[str, dict]:
    rows = db.query(
        "SELECT id, replica, arm, model_version, user_id, status FROM requests WHERE id = ANY(?)", [list(ids)]
    )
    return {r["id"]: r for r in rows}


def test_feedback_on_every_answer_is_accepted_through_the_balancer_whichever_replica_served_it(cluster):
    client = cluster.openai()
    ids = [chat(client, f"fb-{i}") for i in range(16)]
    cluster.flush()
    db = cluster.db()
    try:
        rows = logged(db, ids)
        assert set(rows) == set(ids)
        assert {r["replica"] for r in rows.values()} == set(REPLICAS), "round robin reaches both replicas"
        for i, rid in enumerate(ids):
            r = httpx.post(
                cluster.lb + "/v1/feedback", json={"request_id": rid, "rating": "up" if i % 2 else "down"}, timeout=30
            )
            assert r.status_code in (200, 201), r.text
        fb = db.query("SELECT request_id, rating FROM feedback WHERE request_id = ANY(?)", [ids])
        assert {f["request_id"] for f in fb} == set(ids)
    finally:
        db.close()


def test_promote_and_rollback_from_the_cli_reach_both_replicas_within_the_bound(cluster):
    delays = {}
    for action, args, want in (
        ("promote", ("deploy", "promote", "tiny-a", "--force"), "tiny-a"),
        ("promote again", ("deploy", "promote", "tiny-b", "--force"), "tiny-b"),
        ("rollback", ("deploy", "rollback"), "tiny-a"),
    ):
        cluster.cli(*args)
        t = wait_until(
            f"{action}: production is {want} on both replicas",
            lambda w=want: all(cluster.state(r)["production"] == w for r in REPLICAS),
            timeout=10,
        )
        delays[action] = t
    print(f"propagation to both replicas after the CLI returned (s): {delays}")
    assert max(delays.values()) <= PROPAGATION_BOUND_S, delays
    # and traffic follows: answers through the balancer come from the production version on both replicas
    client = cluster.openai()
    ids = [chat(client, f"prod-{i}") for i in range(6)]
    cluster.flush()
    db = cluster.db()
    try:
        rows = logged(db, ids).values()
        assert {r["model_version"] for r in rows} == {"tiny-a"} and {r["replica"] for r in rows} == set(REPLICAS)
    finally:
        db.close()


def test_a_canary_split_holds_across_replicas_sticky_per_user_and_is_decided_once(cluster):
    cluster.cli("deploy", "canary", "tiny-b", "--share", "0.5", "--force")
    wait_until(
        "the canary is running on both replicas",
        lambda: all(cluster.state(r)["canary"] == "tiny-b" for r in REPLICAS),
        timeout=PROPAGATION_BOUND_S,
    )
    db = cluster.db()
    canary_id = db.query("SELECT id FROM canaries WHERE status = 'running'")[0]["id"]
    client = cluster.openai()
    users = [f"user-{i}" for i in range(40)]
    ids: list[str] = []

    def decided() -> bool:
        return db.query("SELECT status FROM canaries WHERE id = ?", [canary_id])[0]["status"] != "running"

    try:
        # each user in turn, round after round (round robin sends a user's requests to both replicas), until the
        # judges (one on each replica, every second) decide at the traffic budget, on all replicas' traffic
        for _round in range(12):
            ids += [chat(client, u) for u in users]
            if _round >= 1 and decided():
                break
        cluster.flush()
        wait_until("the canary is decided", decided, timeout=30, poll=0.2)
        time.sleep(3)  # three more judge intervals on each replica: a second decision would land here
        row = db.query("SELECT status, decision, started_at, decided_at FROM canaries WHERE id = ?", [canary_id])[0]
        events = db.query(
            "SELECT to_stage FROM deploy_events WHERE model_version = 'tiny-b' AND to_stage <> 'canary' "
            "AND occurred_at >= ?",
            [row["started_at"]],
        )
        assert row["status"] in ("promoted", "rolled_back") and len(events) == 1, (row, events)

        # before the decision every user kept one arm on both replicas, and about half the users were canaried
        rows = [
            r
            for r in db.query("SELECT id, replica, arm, user_id, received_at FROM requests WHERE id = ANY(?)", [ids])
            if r["received_at"] < row["decided_at"]
        ]
        arms: dict[str, set[str]] = {}
        replicas_by_arm: dict[str, set[str]] = {}
        for r in rows:
            arms.setdefault(r["user_id"], set()).add(r["arm"])
            replicas_by_arm.setdefault(r["arm"], set()).add(r["replica"])
        assert all(len(a) == 1 for a in arms.values()), {u: a for u, a in arms.items() if len(a) > 1}
        first_round = {r["user_id"]: r["arm"] for r in rows if r["id"] in ids[: len(users)]}
        canary_users = sum(1 for a in first_round.values() if a == "canary")
        # share 0.5 of 40 users: 99.9% of binomial draws fall in [10, 30]
        assert len(first_round) == len(users) and 10 <= canary_users <= 30, canary_users
        assert replicas_by_arm["canary"] == set(REPLICAS) and replicas_by_arm["production"] == set(REPLICAS)

        from tuneloop.db import loads

        decision = loads(row["decision"])
        print("canary decision:", row["status"], decision)
        per_replica = {rep: sum(1 for r in rows if r["arm"] == "canary" and r["replica"] == rep) for rep in REPLICAS}
        assert _canary_requests(decision) > max(per_replica.values()), (decision, per_replica)
    finally:
        db.close()


def _canary_requests(decision: dict) -> int:
    """The number of canary requests the judge's recorded decision says it weighed."""
    for key in ("canary", "arms"):
        d = decision.get(key)
        if isinstance(d, dict):
            arm = d.get("canary", d)
            for k in ("n", "requests", "n_requests"):
                if isinstance(arm, dict) and isinstance(arm.get(k), int):
                    return int(arm[k])
    raise AssertionError(f"no canary request count in the decision: {decision}")


class Load:
    """Steady traffic through the balancer from a background thread: every answer's id, every failure."""

    def __init__(self, cluster: Cluster, prefix: str):
        self.client = cluster.openai()
        self.prefix = prefix
        self.ids: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            try:
                self.ids.append(chat(self.client, f"{self.prefix}-{i % 20}", f"load {i}"))
            except Exception as e:
                self.failures.append(f"{type(e).__name__}: {e}")
            i += 1

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(120)

    def wait_answers(self, n: int, timeout: float = 120) -> None:
        start = len(self.ids)
        wait_until(f"{n} more answers under load", lambda: len(self.ids) - start >= n, timeout, poll=0.05)


def test_a_rolling_restart_under_steady_load_fails_no_request_and_logs_every_answer(cluster):
    with Load(cluster, "roll") as load:
        load.wait_answers(5)
        for rep in REPLICAS:
            assert cluster.stop(rep) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown
            load.wait_answers(5)  # the other replica carries the traffic alone
            cluster.start(rep)
            wait_until("the balancer sees the restarted replica", lambda: _lb_ready(cluster), 30)
            load.wait_answers(5)
    assert load.failures == []
    cluster.flush()
    db = cluster.db()
    try:
        rows = logged(db, load.ids)
        print(f"rolling restart: {len(load.ids)} answers, 0 failures, {len(rows)} logged rows")
        assert set(rows) == set(load.ids) and all(r["status"] == 200 for r in rows.values())
    finally:
        db.close()


def test_a_postgresql_restart_under_load_keeps_serving_and_the_log_catches_up(cluster):
    dropped_before = sum(cluster.metric(r, "tuneloop_log_rows_dropped_total") for r in REPLICAS)
    with Load(cluster, "pgrestart") as load:
        load.wait_answers(5)
        cluster.pg.stop()  # type: ignore[attr-defined]
        load.wait_answers(20)  # serving goes on without the database
        cluster.pg.start()  # type: ignore[attr-defined]
        load.wait_answers(5)
    assert load.failures == []
    db = cluster.db()
    try:
        wait_until(
            "every answer is in the request log",
            lambda: (cluster.flush(), len(logged(db, load.ids)))[1] == len(load.ids),
            timeout=60,
            poll=0.5,
        )
        dropped = sum(cluster.metric(r, "tuneloop_log_rows_dropped_total") for r in REPLICAS) - dropped_before
        assert dropped == 0 == len(load.ids) - len(logged(db, load.ids))
    finally:
        db.close()


def test_keys_created_and_revoked_from_the_cli_take_effect_on_both_replicas_within_the_bound(cluster):
    admin = cluster.cli("keys", "create", "--scope", "admin", "--name", "ops").stdout
    admin_key = _secret(admin)
    cluster.admin_headers = {"Authorization": f"Bearer {admin_key}"}
    out = cluster.cli("keys", "create", "--scope", "inference", "--name", "app").stdout
    key = _secret(out)

    def status(replica: str, k: str | None) -> int:
        h = {"Authorization": f"Bearer {k}"} if k else {}
        return httpx.get(cluster.url(replica) + "/v1/models", headers=h, timeout=30).status_code

    t_create = wait_until(
        "the new key works and anonymous calls are refused on both replicas",
        lambda: all(status(r, key) == 200 and status(r, None) == 401 for r in REPLICAS),
        timeout=10,
    )
    cluster.cli("keys", "revoke", "app")
    t_revoke = wait_until(
        "the revoked key is refused on both replicas",
        lambda: all(status(r, key) == 401 for r in REPLICAS),
        timeout=10,
    )
    print(f"key propagation to both replicas (s): create {t_create:.3f}, revoke {t_revoke:.3f}")
    assert max(t_create, t_revoke) <= PROPAGATION_BOUND_S


def _secret(out: str) -> str:
    for tok in out.split():
        if tok.startswith(("tl-", "sk-")):
            return tok.strip()
    raise AssertionError(f"no key in the output of `keys create`: {out}")


def test_a_console_sign_in_on_one_replica_holds_on_the_other_and_a_sign_out_anywhere_ends_it(cluster):
    """No sticky sessions for /ui: the session and the CSRF secret are the database's, not a replica's."""
    import hashlib
    import re

    if not cluster.admin_headers:  # when this test runs alone
        ops = _secret(cluster.cli("keys", "create", "--scope", "admin", "--name", "console-ops").stdout)
        cluster.admin_headers = {"Authorization": f"Bearer {ops}"}
    key = _secret(cluster.cli("keys", "create", "--scope", "inference", "--name", "reviewer").stdout)
    bearer = {"Authorization": f"Bearer {key}"}
    wait_until(
        "the new key works on both replicas",
        lambda: all(
            httpx.get(cluster.url(r) + "/v1/models", headers=bearer, timeout=30).status_code == 200 for r in REPLICAS
        ),
        timeout=10,
    )
    rid = chat(cluster.openai(key), "console-user")
    cluster.flush()
    r0, r1 = (cluster.url(r) for r in REPLICAS)

    def csrf(html: str) -> str:
        m = re.search(r'name="_csrf_token" value="([^"]+)"', html)
        assert m, "no CSRF token in the form"
        return m.group(1)

    with httpx.Client(timeout=30) as browser:  # cookies are per host, not per port: one jar for both replicas
        login = browser.get(r0 + "/ui/login")
        r = browser.post(
            r0 + "/ui/login", data={"api_key": key, "next": "/ui/traffic", "_csrf_token": csrf(login.text)}
        )
        assert r.status_code == 303 and r.headers["location"] == "/ui/traffic", r.text
        cookie = browser.cookies["tuneloop_session"]

        page = browser.get(r1 + f"/ui/requests/{rid}")  # signed in on r0, read on r1
        assert page.status_code == 200, page.headers.get("location")
        assert "reviewer" in page.text
        r = browser.post(  # a form opened on r1 posts to r0
            r0 + f"/ui/review/{rid}", data={"rating": "4", "next": "/ui/traffic", "_csrf_token": csrf(page.text)}
        )
        assert r.status_code == 303, r.text
        db = cluster.db()
        try:
            fb = db.query("SELECT source, rating FROM feedback WHERE request_id = ?", [rid])
            assert [(f["source"], f["rating"]) for f in fb] == [("review:reviewer", 4)]
            stored = {x["id_hash"] for x in db.query("SELECT id_hash FROM console_sessions")}
            assert hashlib.sha256(cookie.encode()).hexdigest() in stored and cookie not in stored
        finally:
            db.close()

        out = browser.post(r1 + "/ui/logout", data={"_csrf_token": csrf(browser.get(r1 + "/ui/traffic").text)})
        assert out.status_code == 303
    r = httpx.get(r0 + "/ui/traffic", cookies={"tuneloop_session": cookie}, timeout=30)  # a copy of the old cookie
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/login")
