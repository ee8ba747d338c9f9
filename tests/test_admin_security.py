"""The admin API is never open to the network.

1. While no API key exists, admin routes answer loopback clients only (the socket peer, never a header):
   403 ``admin_loopback_only`` otherwise, with a message that says how to create an admin key.
2. ``tuneloop serve --host <non-loopback>`` refuses to start (exit 2, ``error: ...``, before any model or
   engine is touched) unless a live admin key exists or ``auth.allow_open_admin`` is set.
3. ``POST /admin/adapters {"path": ...}`` loads folders only from ``server.adapter_roots`` (after resolving
   symlinks and ``..``); registered versions and ``--adapter`` at start-up are not limited by it.

One real server (``--host 0.0.0.0`` with ``auth.allow_open_admin``) serves the whole module; it is reached from
127.0.0.1 and from a non-loopback IPv4 address of this machine. The refusals of the CLI run as subprocesses.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from conftest import CLI, require, run_with_importtime
from fixtures_server import LiveServer, free_port, start_server

from tuneloop.server.auth import (
    Auth,
    AuthError,
    admin_guard,
    create_key,
    has_admin_key,
    is_loopback_address,
    is_loopback_host,
    revoke_key,
)
from tuneloop.settings import AuthSettings, load_settings

# -- the predicates ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.8.9.10", "127.255.255.254", "::1", "[::1]", "::ffff:127.0.0.1", "::ffff:7f00:2", " 127.0.0.1 "],
)
def test_loopback_predicate_accepts_ipv4_ipv6_and_ipv4_mapped_loopback(host):
    assert is_loopback_address(host)


@pytest.mark.parametrize(
    "host",
    [
        "192.0.2.2",
        "10.0.0.1",
        "0.0.0.0",
        "::",
        "::ffff:192.0.2.2",
        "::ffff:0.0.0.0",
        "fe80::1%eth0",
        "2001:db8::1",
        "128.0.0.1",
        "localhost",  # a name, not the address of the socket peer
        "testclient",
        "",
        None,
    ],
)
def test_loopback_predicate_rejects_every_other_address_and_names(host):
    assert not is_loopback_address(host)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LOCALHOST", "api.localhost", "::1", "127.0.0.2"])
def test_bind_hosts_that_stay_on_this_machine_are_loopback(host):
    assert is_loopback_host(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.0.2.2", "10.1.2.3", "example.com", "::ffff:0.0.0.0"])
def test_bind_hosts_reachable_from_the_network_are_not_loopback(host):
    assert not is_loopback_host(host)


# -- the admin guard, on a real key table ------------------------------------------------


def connection(auth: Auth, peer: tuple[str, int] | None, headers: dict[str, str] | None = None) -> SimpleNamespace:
    """What the guard reads of a Litestar connection: ``app.state.auth``, the ASGI scope and the headers."""
    scope: dict = {"type": "http", "client": peer}
    return SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(auth=auth)), scope=scope, headers=headers or {})


def guard(conn: SimpleNamespace) -> None:
    asyncio.run(admin_guard(conn, None))  # type: ignore[arg-type]


def test_anonymous_admin_guard_admits_loopback_peers_and_refuses_others_whatever_their_headers(db):
    auth = Auth(db, AuthSettings())
    for peer in [("127.0.0.1", 5000), ("::1", 5000), ("::ffff:127.0.0.1", 5000)]:
        conn = connection(auth, peer)
        guard(conn)
        assert conn.scope["state"]["principal"].scope == "anonymous"
    spoofed = {"x-forwarded-for": "127.0.0.1", "forwarded": "for=127.0.0.1", "x-real-ip": "127.0.0.1"}
    for peer in [("192.0.2.7", 5000), ("2001:db8::7", 5000), None]:
        with pytest.raises(AuthError) as ei:
            guard(connection(auth, peer, spoofed))
        e = ei.value
        assert (e.status_code, e.code, e.type) == (403, "admin_loopback_only", "permission_error")
        assert "tuneloop keys create --scope admin" in e.message
        assert (peer[0] if peer else "unknown address") in e.message


def test_with_keys_the_admin_key_decides_from_any_address(db):
    _, secret = create_key(db, "admin", "ops")
    auth = Auth(db, AuthSettings())
    conn = connection(auth, ("192.0.2.7", 5000), {"authorization": f"Bearer {secret}"})
    guard(conn)
    assert conn.scope["state"]["principal"].name == "ops"
    with pytest.raises(AuthError) as ei:  # keys exist: no key is a 401, from loopback too
        guard(connection(auth, ("127.0.0.1", 5000)))
    assert ei.value.status_code == 401


def test_has_admin_key_counts_only_live_admin_keys(db):
    assert not has_admin_key(db)
    create_key(db, "inference", "web")
    assert not has_admin_key(db)
    key, _ = create_key(db, "admin", "ops")
    assert has_admin_key(db)
    revoke_key(db, key.id)
    assert not has_admin_key(db)


# -- settings ------------------------------------------------------------------------------


def test_new_settings_are_real_keys_with_safe_defaults_and_env_variables(home, monkeypatch):
    s = load_settings()
    assert s.auth.allow_open_admin is False
    assert s.server.adapter_roots == ["runs", "models"]
    monkeypatch.setenv("TUNELOOP_AUTH__ALLOW_OPEN_ADMIN", "true")
    monkeypatch.setenv("TUNELOOP_SERVER__ADAPTER_ROOTS", "/srv/adapters,runs")
    s = load_settings()
    assert s.auth.allow_open_admin is True
    assert s.server.adapter_roots == ["/srv/adapters", "runs"]


def test_config_keys_explains_why_not_to_open_the_admin_api(cli):
    out = cli("config", "keys").stdout
    assert "auth.allow_open_admin" in out and "server.adapter_roots" in out
    assert "anyone who reaches the port can load adapters" in " ".join(out.split())


# -- `tuneloop serve` refuses a non-loopback bind without an admin key ---------------------------


def serve(cli: CLI, host: str, *extra: str, env: dict[str, str] | None = None):
    c = CLI(cli.cwd, {**cli.env, **(env or {})})
    return c("serve", "--host", host, "--port", str(free_port()), *extra, check=False, timeout=120)


def lan_ipv4() -> str | None:
    """A non-loopback IPv4 address of this machine that a socket can bind to (None when there is none)."""
    import psutil

    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family != socket.AF_INET or is_loopback_address(a.address):
                continue
            try:
                with socket.socket() as s:
                    s.bind((a.address, 0))
            except OSError:
                continue
            return str(a.address)
    return None


def assert_refused(r) -> None:
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: refusing to serve on --host"), r.stderr
    assert "no admin API key exists" in r.stderr and "tuneloop keys create --scope admin" in r.stderr
    assert "auth.allow_open_admin" in r.stderr and "Traceback" not in r.stderr
    assert "serving " not in r.stdout


def assert_past_admin_check(r) -> None:
    """Past the admin check, the missing --model is the next (cheap) refusal."""
    assert r.returncode == 2, r.stderr
    assert "no-such-model" in r.stderr and "does not exist" in r.stderr and "refusing" not in r.stderr, r.stderr


def test_serve_on_all_interfaces_without_admin_key_exits_2_before_any_engine_starts(cli):
    r, imported = run_with_importtime(cli, "serve", "--host", "0.0.0.0", "--port", str(free_port()))
    r.stderr = "\n".join(ln for ln in r.stderr.splitlines() if not ln.startswith("import time:"))
    assert_refused(r)
    assert not {"torch", "vllm", "uvicorn"} & imported  # refused before anything heavy is loaded


@pytest.mark.parametrize("host", ["::", "lan"])
def test_serve_on_any_non_loopback_host_without_admin_key_is_refused(cli, host):
    if host == "lan":
        host = lan_ipv4() or "192.0.2.1"  # refused before binding: the address need not exist
    assert_refused(serve(cli, host))


def test_only_a_live_admin_key_lets_serve_bind_a_non_loopback_host(cli, tmp_path):
    missing = str(tmp_path / "no-such-model")
    cli("keys", "create", "--scope", "inference", "--name", "web")
    cli("keys", "create", "--scope", "admin", "--name", "old")
    cli("keys", "revoke", "old")
    assert_refused(serve(cli, "0.0.0.0", "--model", missing))  # inference and revoked admin keys do not count
    cli("keys", "create", "--scope", "admin", "--name", "ops")
    r = serve(cli, "0.0.0.0", "--model", missing)
    assert_past_admin_check(r)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_hosts_need_no_admin_key(cli, tmp_path, host):
    r = serve(cli, host, "--model", str(tmp_path / "no-such-model"))
    assert_past_admin_check(r)


def test_allow_open_admin_lets_serve_start_without_admin_key(cli, tmp_path):
    env = {"TUNELOOP_AUTH__ALLOW_OPEN_ADMIN": "true"}
    r = serve(cli, "0.0.0.0", "--model", str(tmp_path / "no-such-model"), env=env)
    assert_past_admin_check(r)


# -- one live server on 0.0.0.0 ----------------------------------------------------------------


@pytest.fixture(scope="module")
def outside(tiny_adapters, tmp_path_factory) -> Path:
    """Valid adapters ``a`` and ``b`` (copies of the tiny ones) in a folder outside the live server's roots."""
    out = tmp_path_factory.mktemp("outside-roots")
    for name in ("a", "b"):
        shutil.copytree(tiny_adapters[name], out / name)
    return out


@pytest.fixture(scope="module")
def open_server(tiny_model, tiny_adapters, outside, tmp_path_factory):
    """``tuneloop serve --host 0.0.0.0`` with ``auth.allow_open_admin``, no key; adapter roots: the tiny adapters'
    folder and ``<home>/runs``. Registered version ``far-v`` and start-up adapter ``boot`` live outside them."""
    from tuneloop.db import open_database
    from tuneloop.ids import hash_path
    from tuneloop.registry import ModelVersion, register_version

    home = tmp_path_factory.mktemp("admin-security") / "home"
    (home / "runs").mkdir(parents=True)
    (home / "runs" / "escape").symlink_to(outside / "a")  # inside a root by name, outside once resolved
    register_version(
        open_database(home / "tuneloop.duckdb"),
        ModelVersion(
            name="far-v",
            kind="adapter",
            base_model=str(tiny_model),
            path=str(outside / "b"),
            content_hash=hash_path(outside / "b"),
        ),
    )
    env = {
        "TUNELOOP_AUTH__ALLOW_OPEN_ADMIN": "true",
        "TUNELOOP_SERVER__ADAPTER_ROOTS": f"{tiny_adapters['a'].parent},runs",
    }
    srv = start_server(home, tiny_model, "--host", "0.0.0.0", "--adapter", f"boot={outside / 'a'}", env=env)
    yield srv
    srv.stop()


def from_lan(srv: LiveServer) -> httpx.Client:
    """A client whose connections come from a non-loopback address of this machine."""
    ip = lan_ipv4()
    require(ip is not None, "a non-loopback IPv4 address on this machine", "a network interface besides lo")
    assert ip is not None
    return httpx.Client(
        base_url=f"http://{ip}:{srv.server.port}", transport=httpx.HTTPTransport(local_address=ip), timeout=60
    )


def test_open_server_logs_a_warning_at_start(open_server):
    out = open_server.output()
    assert "WARNING" in out and "auth.allow_open_admin is set" in out


def test_admin_routes_refuse_a_non_loopback_client_and_answer_loopback(open_server):
    with from_lan(open_server) as lan, open_server.http() as local:
        assert local.base_url.host == "127.0.0.1"
        for method, path in [("GET", "/admin/adapters"), ("POST", "/admin/log/flush"), ("GET", "/admin/state")]:
            r = lan.request(method, path, headers={"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1"})
            assert r.status_code == 403, (path, r.text)
            err = r.json()["error"]
            assert (err["code"], err["type"]) == ("admin_loopback_only", "permission_error")
            assert "tuneloop keys create --scope admin" in err["message"]
            assert f"came from {lan.base_url.host}" in err["message"]  # the socket's peer, not the headers
            assert local.request(method, path).status_code == 200, path
        # a refused load changes nothing
        r = lan.post("/admin/adapters", json={"version": "far-v"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_loopback_only"
        assert "far-v" not in [a["name"] for a in local.get("/admin/adapters").json()["adapters"]]
        # the inference API is not an admin route: still open without keys
        assert lan.get("/v1/models").status_code == 200


def test_adapter_paths_outside_every_root_are_refused(open_server, tiny_adapters, outside):
    dotdot = os.path.join(str(tiny_adapters["a"].parent), os.path.relpath(outside / "a", tiny_adapters["a"].parent))
    assert dotdot.startswith(str(tiny_adapters["a"].parent)) and ".." in dotdot
    escape = open_server.home / "runs" / "escape"
    with open_server.http() as h:
        for path in [str(outside / "a"), dotdot, str(escape), "/etc", str(outside / "missing")]:
            r = h.post("/admin/adapters", json={"path": path, "name": "intruder"})
            assert r.status_code == 403, (path, r.text)
            err = r.json()["error"]
            assert (err["code"], err["type"], err["param"]) == ("adapter_path_not_allowed", "permission_error", "path")
            assert "server.adapter_roots" in err["message"]
            assert str(tiny_adapters["a"].parent.resolve()) in err["message"]
        names = [a["name"] for a in h.get("/admin/adapters").json()["adapters"]]
        assert "intruder" not in names


def test_adapter_path_inside_a_root_loads(open_server, tiny_adapters):
    with open_server.http() as h:
        r = h.post("/admin/adapters", json={"path": str(tiny_adapters["b"]), "name": "inside-b"})
        assert r.status_code == 201, r.text
        assert r.json()["path"] == str(tiny_adapters["b"].resolve())
        r = h.post("/admin/adapters", json={"path": str(tiny_adapters["a"])})  # named after its folder
        assert r.status_code == 201 and r.json()["name"] == "a", r.text
        chat = h.post(
            "/v1/chat/completions",
            json={"model": "inside-b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert chat.status_code == 200, chat.text
        assert h.delete("/admin/adapters/inside-b").status_code == 200


def test_registered_versions_and_startup_adapters_load_from_anywhere(open_server, outside):
    with open_server.http() as h:
        r = h.post("/admin/adapters", json={"version": "far-v"})
        assert r.status_code in (200, 201), r.text
        assert r.json()["path"] == str(Path(outside, "b").resolve()) and r.json()["version"] == "far-v"
        loaded = {a["name"]: a["path"] for a in h.get("/admin/adapters").json()["adapters"]}
        assert loaded["boot"] == str(Path(outside, "a").resolve())  # --adapter boot=<outside>/a at start-up
