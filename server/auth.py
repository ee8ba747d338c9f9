"""API keys: creation, listing, revocation, and request authentication.

Contract
--------
* A key is ``tl-<43 url-safe chars>`` (256 random bits). Only its sha256 hex
  digest (``api_keys.key_hash``) and a display prefix (first 10 characters,
  ``api_keys.prefix``) are stored; the secret is shown once by
  ``tuneloop keys create`` and never written anywhere, nor logged.
* Scopes: ``inference`` (the ``/v1`` API) and ``admin`` (admin routes *and*
  ``/v1``). :func:`create_key`, :func:`list_keys` and :func:`revoke_key` work
  on the database directly (short connections; fine while a server runs),
  on either backend (the DuckDB file or a shared PostgreSQL): their SQL is
  :mod:`tuneloop.store_keys`'s, which also defines :class:`ApiKey`,
  :class:`ApiKeyError` and :class:`KeyAlreadyRevoked` (importable from here).
  A duplicate live name is refused even when two processes create it at the
  same moment; of concurrent revokes of one key exactly one records a time
  and the others raise :class:`KeyAlreadyRevoked` with that time.
* Policy of :meth:`Auth.authenticate` (``scope`` is what the route needs):

  - no key was ever created and ``auth.require_keys`` is false: every request
    passes as ``Principal(key_id=None, scope="anonymous")`` (a fresh install
    works out of the box);
  - once any key exists (revoked ones included: revoking the last key does
    not silently reopen the API), or with ``auth.require_keys``, a request
    needs ``Authorization: Bearer <key>`` with a live key: otherwise
    :class:`AuthError` 401 ``invalid_api_key``;
  - an ``inference`` key on an ``admin`` route: :class:`AuthError` 403
    ``insufficient_scope``.

* The admin routes are never open to the network: while requests pass as
  anonymous (no key), :func:`admin_guard` answers only clients whose socket
  peer (the ASGI ``scope["client"]`` host, never ``X-Forwarded-For`` or any
  other header) is a loopback address (:func:`is_loopback_address`:
  127.0.0.0/8, ::1, IPv4-mapped ``::ffff:127.x.x.x``); any other client, or
  one without an address, gets :class:`AuthError` 403 ``admin_loopback_only``
  whose message says to create an admin key. With keys, the key decides, from
  anywhere.
* :func:`has_admin_key` (a live ``admin`` key exists) and
  :func:`is_loopback_host` (a bind address that is only reachable from this
  machine) are what ``tuneloop serve`` checks before it starts on a
  non-loopback ``--host``.

* :class:`Auth` keeps the key table in memory (a dict keyed by hash, on the
  instance, nothing module-global), so authenticating costs no database hit.
  It re-reads the table at most every ``refresh_s`` seconds, and only when
  the database changed since its last read (``Database.data_version``: a
  ``stat`` of the DuckDB file, or on PostgreSQL a counter moved by the
  ``NOTIFY`` every writing ``connect()`` block sends on commit, so a key
  created or revoked through another replica or a CLI on another machine is
  seen too; at least every 30 s regardless), in a worker thread, never
  blocking the event loop; and at most every ``miss_refresh_s`` on an
  unknown key, so a key created or revoked while the server runs takes effect
  within seconds. If the database is busy (file locked, PostgreSQL down), the
  last known table stays in force.
* :class:`AuthError` is the server's :class:`tuneloop.server.errors.APIError`
  with the defaults of auth failures: 401 (type ``invalid_request_error``,
  code ``invalid_api_key``, header ``WWW-Authenticate: Bearer``, as OpenAI
  answers a bad key) or 403 (type ``permission_error``, ``insufficient_scope``).
  Every route answers it with the same body through the app's exception
  handlers.
* :func:`inference_guard` and :func:`admin_guard` are the Litestar guards of
  the ``/v1`` routes (feedback included) and the admin routes; they store the
  :class:`Principal` as ``principal`` in the request's scope state.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler

from tuneloop import store_keys
from tuneloop.db import CachedRead, Database, DatabaseBusy
from tuneloop.server.errors import APIError
from tuneloop.settings import AuthSettings

# the key records and errors live with their SQL in tuneloop.store_keys; callers import them from here too
from tuneloop.store_keys import KEY_PREFIX, SCOPES, ApiKey
from tuneloop.store_keys import ApiKeyError as ApiKeyError
from tuneloop.store_keys import KeyAlreadyRevoked as KeyAlreadyRevoked

log = logging.getLogger(__name__)

DISPLAY_CHARS = 10


@dataclass(frozen=True)
class Principal:
    """Who made a request: ``key_id`` None for anonymous access (no keys configured)."""

    key_id: str | None
    scope: str  # inference | admin | anonymous
    name: str | None = None


class AuthError(APIError):
    """Authentication (401, with ``WWW-Authenticate: Bearer``) or authorisation (403) failure: an
    :class:`APIError` whose only additions are these defaults."""

    def __init__(self, status_code: Literal[401, 403], message: str, code: str, type: str | None = None):
        headers = {"WWW-Authenticate": 'Bearer realm="tuneloop"'} if status_code == 401 else None
        super().__init__(status_code, message, code, type=type, headers=headers)


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def generate_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


# -- key management (CLI): the SQL is tuneloop.store_keys' ------------------------------


def create_key(db: Database, scope: str, name: str | None = None) -> tuple[ApiKey, str]:
    """Create a key; return its record and the secret (the only time the secret exists outside the client).
    A duplicate live name is refused (:class:`ApiKeyError`), also when two processes race
    (:func:`tuneloop.store_keys.insert_key`)."""
    secret = generate_secret()
    key = store_keys.insert_key(db, scope=scope, name=name, key_hash=hash_key(secret), prefix=secret[:DISPLAY_CHARS])
    return key, secret


def has_admin_key(db: Database) -> bool:
    """Whether a live (not revoked) key of scope ``admin`` exists."""
    return store_keys.has_admin_key(db)


def list_keys(db: Database, include_revoked: bool = True) -> list[ApiKey]:
    return store_keys.list_keys(db, include_revoked)


def revoke_key(db: Database, ref: str) -> ApiKey:
    """Revoke the key whose id, display prefix or (active) name is ``ref``; return it as revoked. Atomic: of
    concurrent revokes exactly one records a time, the others raise :class:`KeyAlreadyRevoked` with it."""
    return store_keys.revoke_key(db, ref)


# -- request authentication (server) ------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    id: str
    name: str | None
    scope: str
    revoked: bool


class Auth:
    """Authenticates requests against the ``api_keys`` table; see module docstring."""

    def __init__(
        self,
        db: Database,
        settings: AuthSettings,
        *,
        refresh_s: float = 2.0,
        miss_refresh_s: float = 0.5,
        lock_timeout_s: float = 2.0,
    ):
        self.db = db.with_options(lock_timeout_s=lock_timeout_s)
        self.settings = settings
        self.refresh_s = refresh_s
        self.miss_refresh_s = miss_refresh_s
        self._keys: dict[str, _Entry] = {}
        self._any_key = False
        self._loaded_at: float | None = None
        self._table = CachedRead(self.db, store_keys.key_table)
        self._lock: asyncio.Lock | None = None

    # cache --------------------------------------------------------------------
    def reload(self) -> None:
        """Re-read the key table (blocking; :meth:`authenticate` calls it in a worker thread); a
        ``stat`` only while the database has not changed (:class:`tuneloop.db.CachedRead`)."""
        try:
            rows = self._table.get()
        except DatabaseBusy as e:
            log.warning("auth: key table not refreshed, database busy (%s); keeping the last one", e)
            self._loaded_at = time.monotonic()
            return
        self._keys = {h: _Entry(i, n, s, r is not None) for h, i, n, s, r in rows}
        self._any_key = bool(rows)
        self._loaded_at = time.monotonic()

    async def _refresh(self, max_age_s: float) -> None:
        if self._loaded_at is not None and time.monotonic() - self._loaded_at < max_age_s:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._loaded_at is not None and time.monotonic() - self._loaded_at < max_age_s:
                return  # another request refreshed it while we waited
            await asyncio.to_thread(self.reload)

    @property
    def enabled(self) -> bool:
        """Whether requests need a key now (as of the last refresh)."""
        return self._any_key or self.settings.require_keys

    # authentication -------------------------------------------------------------
    async def authenticate(self, request: Any, scope: str = "inference") -> Principal:
        """The principal of ``request`` (anything with ``.headers``) for a route needing ``scope``; raises AuthError."""
        return await self.check_secret(bearer_token(request.headers.get("authorization")), scope)

    async def refresh(self) -> None:
        """Re-read the key table if the copy is older than ``refresh_s`` (in a worker thread)."""
        await self._refresh(self.refresh_s)

    async def key_principal(self, key_id: str) -> Principal | None:
        """The principal of the live key with id ``key_id`` (a console session holds the id, never the secret);
        None when it is unknown or was revoked since."""
        await self._refresh(self.refresh_s)
        entry = next((e for e in self._keys.values() if e.id == key_id), None)
        if entry is None or entry.revoked:
            return None
        return Principal(key_id=entry.id, scope=entry.scope, name=entry.name)

    async def check_secret(self, secret: str | None, scope: str = "inference") -> Principal:
        """The principal of the key ``secret`` (None: no key sent) for something needing ``scope``, by the policy of
        the module docstring; raises AuthError."""
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}")
        await self._refresh(self.refresh_s)
        if not self.enabled:
            return Principal(key_id=None, scope="anonymous")
        if secret is None:
            raise AuthError(
                401,
                "Missing API key: send it as 'Authorization: Bearer <key>' "
                "(create one with `tuneloop keys create --scope inference`).",
                "invalid_api_key",
            )
        h = hash_key(secret)
        entry = self._keys.get(h)
        if entry is None:
            await self._refresh(self.miss_refresh_s)  # a key created seconds ago
            entry = self._keys.get(h)
        if entry is None or entry.revoked:
            shown = secret[:DISPLAY_CHARS] + "..." if secret.startswith(KEY_PREFIX) else "(not a tuneloop key)"
            raise AuthError(401, f"Incorrect or revoked API key provided: {shown}.", "invalid_api_key")
        if scope == "admin" and entry.scope != "admin":
            raise AuthError(
                403,
                "This API key has scope 'inference'; this route needs an 'admin' key.",
                "insufficient_scope",
            )
        return Principal(key_id=entry.id, scope=entry.scope, name=entry.name)


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (case-insensitive scheme), else None."""
    if not header:
        return None
    parts = header.strip().split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "bearer" or not parts[1].strip():
        return None
    return parts[1].strip()


# -- network origin -------------------------------------------------------------------


def is_loopback_address(host: str | None) -> bool:
    """Whether ``host`` is a loopback IP address: 127.0.0.0/8, ``::1`` or IPv4-mapped ``::ffff:127.x.x.x``
    (brackets and an IPv6 zone ``%eth0`` are ignored). Host names, ``None`` and anything unparsable: False."""
    if not host:
        return False
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def is_loopback_host(host: str) -> bool:
    """Whether binding to ``host`` keeps a server reachable from this machine only: a loopback address, or
    ``localhost`` (``*.localhost``). ``0.0.0.0``, ``::``, ``""``, a LAN address or any other name: False."""
    name = host.strip().rstrip(".").lower()
    return is_loopback_address(name) or name == "localhost" or name.endswith(".localhost")


def peer_host(connection: Any) -> str | None:
    """The client address of the socket a request came in on (ASGI ``scope["client"]``), None when unknown.
    Headers (``X-Forwarded-For``, ``Forwarded``) are never read: any client can send them."""
    scope = getattr(connection, "scope", None)
    client = scope.get("client") if isinstance(scope, dict) else None
    if not client:
        return None
    host = client[0]
    return host if isinstance(host, str) else None


ADMIN_KEY_HINT = (
    "create an admin key on the server's machine with `tuneloop keys create --scope admin --name ops` and send it "
    "as 'Authorization: Bearer <key>' (once a key exists, /v1 needs keys too: `tuneloop keys create --scope "
    "inference`)"
)


def check_admin_origin(principal: Principal, connection: Any) -> None:
    """Anonymous access to an admin route (no key exists) only from loopback: else :class:`AuthError` 403
    ``admin_loopback_only``."""
    if principal.key_id is not None:
        return
    host = peer_host(connection)
    if is_loopback_address(host):
        return
    raise AuthError(
        403,
        f"The admin API answers only loopback clients (127.0.0.1, ::1) while no API key exists; this request came "
        f"from {host or 'an unknown address'}. To use it from another machine, {ADMIN_KEY_HINT}.",
        "admin_loopback_only",
    )


# -- route guards ---------------------------------------------------------------------


async def _authenticate(connection: ASGIConnection[Any, Any, Any, Any], scope: str) -> Principal:
    auth: Auth = connection.app.state.auth
    principal = await auth.authenticate(connection, scope)
    connection.scope.setdefault("state", {})["principal"] = principal
    return principal


async def inference_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Litestar guard: an ``inference`` (or ``admin``) key, per ``app.state.auth``; the principal goes to the scope state."""
    await _authenticate(connection, "inference")


async def admin_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Litestar guard: an ``admin`` key, per ``app.state.auth``; anonymous (no key exists) from loopback only."""
    principal = await _authenticate(connection, "admin")
    check_admin_origin(principal, connection)
