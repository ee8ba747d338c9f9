"""API keys: the `tuneloop keys` commands on a real database, and request authentication."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from tuneloop.server.auth import Auth, AuthError, Principal, bearer_token, create_key, revoke_key
from tuneloop.settings import AuthSettings


def req(token: str | None = None, raw: str | None = None):
    """A request as Auth sees it: anything with case-insensitive-enough ``headers``."""
    h = {}
    if raw is not None:
        h["authorization"] = raw
    elif token is not None:
        h["authorization"] = f"Bearer {token}"
    return SimpleNamespace(headers=h)


def authenticate(auth: Auth, request, scope: str = "inference") -> Principal:
    return asyncio.run(auth.authenticate(request, scope))


def denied(auth: Auth, request, scope: str = "inference") -> AuthError:
    with pytest.raises(AuthError) as ei:
        authenticate(auth, request, scope)
    return ei.value


# -- the CLI, as a user runs it ---------------------------------------------------------


def test_keys_create_prints_the_secret_once_and_stores_only_its_hash(cli, db):
    r = cli("keys", "create", "--scope", "inference", "--name", "web-app")
    lines = r.stdout.strip().splitlines()
    secret = lines[-1]
    assert secret.startswith("tl-") and len(secret) > 40
    assert "only time the secret is shown" in r.stderr
    rows = db.query("SELECT * FROM api_keys")
    assert len(rows) == 1
    row = rows[0]
    assert row["key_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    assert row["scope"] == "inference" and row["name"] == "web-app" and secret.startswith(row["prefix"])
    assert secret not in {str(v) for v in row.values()}
    # not in the database file either (nor its WAL)
    for f in db.path.parent.iterdir():
        if f.name.startswith(db.path.name):
            assert secret.encode() not in f.read_bytes()


def test_keys_list_shows_keys_but_never_secrets(cli):
    s1 = cli("keys", "create", "--quiet").stdout.strip()
    s2 = cli("keys", "create", "--scope", "admin", "--name", "ops", "--quiet").stdout.strip()
    out = cli("keys", "list").stdout
    assert "inference" in out and "admin" in out and "ops" in out
    assert s1[:10] in out and s2[:10] in out  # display prefixes
    assert s1 not in out and s2 not in out
    data = json.loads(cli("keys", "list", "--json").stdout)
    assert [k["scope"] for k in data] == ["inference", "admin"]
    assert all("secret" not in k and "key_hash" not in k for k in data)


def test_keys_revoke_by_id_and_its_errors(cli):
    cli("keys", "create", "--name", "temp")
    key_id = json.loads(cli("keys", "list", "--json").stdout)[0]["id"]
    assert f"revoked inference key {key_id}" in cli("keys", "revoke", key_id).stdout
    listed = json.loads(cli("keys", "list", "--json").stdout)[0]
    assert listed["revoked_at"] is not None
    assert json.loads(cli("keys", "list", "--active", "--json").stdout) == []

    again = cli("keys", "revoke", key_id, check=False)
    assert again.returncode == 2 and "already revoked" in again.stderr and "Traceback" not in again.stderr
    unknown = cli("keys", "revoke", "no-such-key", check=False)
    assert unknown.returncode == 2 and "no API key" in unknown.stderr


def test_keys_create_rejects_a_bad_scope_and_duplicate_names(cli):
    r = cli("keys", "create", "--scope", "root", check=False)
    assert r.returncode == 2 and "invalid choice" in r.stderr
    cli("keys", "create", "--name", "dup")
    r = cli("keys", "create", "--name", "dup", check=False)
    assert r.returncode == 2 and "already exists" in r.stderr


def test_keys_list_on_a_fresh_home_says_the_api_is_open(cli):
    assert "the API is open" in cli("keys", "list").stdout


# -- authentication --------------------------------------------------------------------


def test_no_keys_means_open_access(db):
    auth = Auth(db, AuthSettings())
    p = authenticate(auth, req())
    assert p == Principal(key_id=None, scope="anonymous")
    assert authenticate(auth, req(), "admin").scope == "anonymous"


def test_require_keys_closes_the_api_even_before_the_first_key(db):
    e = denied(Auth(db, AuthSettings(require_keys=True)), req())
    assert e.status_code == 401 and e.code == "invalid_api_key"


def test_keys_and_scopes(db):
    key_inf, s_inf = create_key(db, "inference", "app")
    key_adm, s_adm = create_key(db, "admin")
    auth = Auth(db, AuthSettings())

    e = denied(auth, req())
    assert e.status_code == 401
    assert e.to_dict() == {
        "error": {"message": e.message, "type": "invalid_request_error", "code": "invalid_api_key", "param": None}
    }
    assert "Bearer" in e.message and e.headers["WWW-Authenticate"].startswith("Bearer")
    assert denied(auth, req("tl-wrong")).status_code == 401
    assert denied(auth, req(raw=f"Basic {s_inf}")).status_code == 401

    p = authenticate(auth, req(s_inf))
    assert p == Principal(key_id=key_inf.id, scope="inference", name="app")
    assert authenticate(auth, req(raw=f"bearer   {s_inf} ")).key_id == key_inf.id

    e = denied(auth, req(s_inf), "admin")
    assert e.status_code == 403 and e.code == "insufficient_scope"
    assert authenticate(auth, req(s_adm), "admin").key_id == key_adm.id
    assert authenticate(auth, req(s_adm), "inference").scope == "admin"  # admin keys may use /v1 too


def test_error_messages_never_contain_the_full_secret(db):
    _, secret = create_key(db, "inference")
    k = revoke_key(db, secret[:10])
    assert k.revoked_at is not None
    e = denied(Auth(db, AuthSettings()), req(secret))
    assert secret not in e.message and secret[:10] in e.message


def test_keys_created_or_revoked_while_serving_take_effect_within_the_refresh(db):
    _, boot = create_key(db, "admin", "bootstrap")
    auth = Auth(db, AuthSettings(), refresh_s=0.3, miss_refresh_s=0.1)
    assert authenticate(auth, req(boot)).name == "bootstrap"  # key table now cached
    _, secret = create_key(db, "inference", "late")  # e.g. `tuneloop keys create` in another terminal
    time.sleep(0.15)
    assert authenticate(auth, req(secret)).name == "late"  # an unknown key triggers a (rate-limited) re-read
    revoke_key(db, "late")
    time.sleep(0.35)
    assert denied(auth, req(secret)).status_code == 401


def test_revoking_every_key_does_not_reopen_the_api(db):
    create_key(db, "inference", "only")
    revoke_key(db, "only")
    assert denied(Auth(db, AuthSettings()), req()).status_code == 401


def test_authentication_needs_no_database_access_per_request(db):
    _, secret = create_key(db, "inference")
    auth = Auth(db, AuthSettings(), refresh_s=60)
    authenticate(auth, req(secret))  # loads the key table once
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True); time.sleep(30)",
            str(db.path),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    try:
        assert holder.stdout.readline().strip() == "held"  # another process now holds the database file

        async def many():
            t0 = time.perf_counter()
            for _ in range(200):
                assert (await auth.authenticate(req(secret))).scope == "inference"
            return time.perf_counter() - t0

        assert asyncio.run(many()) < 1.0
    finally:
        holder.kill()
        holder.wait()


def test_bearer_token_parsing():
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("BEARER  abc ") == "abc"
    assert bearer_token("Bearer ") is None
    assert bearer_token("Token abc") is None
    assert bearer_token(None) is None
