"""Who is using the web console: sign-in with an API key, held in a server-side session; admin checks.

Contract
--------
* Signing in (``POST /ui/login``, a form with the key) checks the key like the API does
  (:meth:`tuneloop.server.auth.Auth.check_secret`) and stores only the key's **id**, name and scope in a
  server-side session (Litestar's ``ServerSideSessionConfig`` over the database's ``console_sessions``,
  :mod:`tuneloop.store_sessions`); the browser holds a
  random session id in an ``HttpOnly``, ``SameSite=Strict`` cookie scoped to ``/ui``. The key itself is never
  stored, rendered or logged.
* Every console request re-checks the session's key (:meth:`Auth.key_principal`): a key revoked since sign-in
  ends the session at the next click.
* While no API key exists and ``auth.require_keys`` is off (a fresh install), the console needs no sign-in, as
  the API does: the visitor is ``anonymous``; admin actions are then allowed only from a loopback client, as
  the admin API's (:func:`tuneloop.server.auth.check_admin_origin`).
* :func:`console_principal` is the ``before_request`` hook of the console's router: it redirects to the sign-in
  page when needed and stores the :class:`Principal` in the request's scope state (``console_principal``);
  routes with ``opt={"public": True}`` (sign-in, static files) skip it. :func:`require_admin` raises a 403
  :class:`ConsoleError` for a non-admin.
* :func:`reviewer_of` names the reviewer recorded in the annotation queue and in feedback sources.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from litestar import Request, Response
from litestar.response import Redirect

from tuneloop.server.auth import Auth, AuthError, Principal, check_admin_origin

PRINCIPAL = "console_principal"
SESSION_COOKIE = "tuneloop_session"
CSRF_COOKIE = "tuneloop_csrf"


class ConsoleError(Exception):
    """A console request refused with an HTTP status and a message shown on the error page."""

    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code = status_code
        self.message = message


def safe_next(target: str | None) -> str:
    """``target`` if it is a path inside the console, else the overview (no open redirect)."""
    if target and target.startswith("/ui") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui"


async def session_principal(request: Request[Any, Any, Any]) -> Principal | None:
    """The console's principal for ``request`` (see module doc); None when a sign-in is needed."""
    auth: Auth = request.app.state.auth
    await auth.refresh()
    if not auth.enabled:
        return Principal(key_id=None, scope="anonymous")
    sess = request.session if "session" in request.scope else {}
    key_id = sess.get("key_id") if isinstance(sess, dict) else None
    if not key_id:
        return None
    principal = await auth.key_principal(key_id)
    if principal is None:
        request.clear_session()
    return principal


async def console_principal(request: Request[Any, Any, Any]) -> Response[Any] | None:
    """``before_request`` hook: the principal goes to the scope state, or a redirect to the sign-in page."""
    if request.route_handler.opt.get("public"):
        return None
    principal = await session_principal(request)
    if principal is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return Redirect(f"/ui/login?next={quote(target, safe='')}", status_code=303)
    request.scope.setdefault("state", {})[PRINCIPAL] = principal
    return None


def principal_of(request: Request[Any, Any, Any]) -> Principal:
    p: Principal = request.scope.get("state", {}).get(PRINCIPAL) or Principal(key_id=None, scope="anonymous")
    return p


def is_admin(request: Request[Any, Any, Any]) -> bool:
    """Whether the visitor may take admin actions: an admin key, or anonymous from loopback (no key exists)."""
    p = principal_of(request)
    if p.scope == "admin":
        return True
    if p.scope == "anonymous":
        try:
            check_admin_origin(p, request)
        except AuthError:
            return False
        return True
    return False


def require_admin(request: Request[Any, Any, Any]) -> None:
    if not is_admin(request):
        p = principal_of(request)
        who = f"key {p.name!r}" if p.name else "this key"
        raise ConsoleError(
            403,
            f"Only an admin may do this; {who} has scope {p.scope!r}. Sign in with an admin key "
            "(`tuneloop keys create --scope admin`).",
        )


def reviewer_of(principal: Principal) -> str:
    """The reviewer's name: the key's name, else its id's first characters; ``local`` when anonymous."""
    if principal.key_id is None:
        return "local"
    return principal.name or f"key-{principal.key_id[-8:]}"
