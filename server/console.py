"""The web console: a Litestar router under ``/ui`` on the serving app, server-rendered, no JavaScript framework.

Contract
--------
* :func:`console_router` returns the ``/ui`` router: the pages (:mod:`tuneloop.server.console_pages`), the
  forms (:mod:`tuneloop.server.console_actions`) and the static files (``server/static``: one stylesheet, one
  small script for keyboard shortcuts, the live numbers and the correction diff). Nothing is fetched from the
  internet; charts are SVG rendered on the server (:mod:`tuneloop.monitoring.charts`).
* The router's own middleware: a server-side session (cookie ``tuneloop_session``: ``HttpOnly``,
  ``SameSite=Strict``, path ``/ui``, ``ui.session_max_age_s``, renewed on use) and Litestar's CSRF middleware
  (cookie ``tuneloop_csrf``, ``HttpOnly``, ``SameSite=Strict``; every form posts the token). Neither touches the
  API routes. Sessions live in the database (:class:`tuneloop.store_sessions.DatabaseSessionStore`, the app's
  store ``SESSION_STORE``) and the CSRF secret is the database's (``ui.secret`` overrides it), so every replica
  of one database accepts a session and a form from any other, and a restart signs nobody out. Its ``before_request`` hook signs visitors in (:func:`tuneloop.server.console_auth.console_principal`).
* Errors on console pages are HTML pages with the status and the reason (not the API's JSON bodies).
* :func:`template_config` is the app's Jinja configuration (``server/templates``, autoescaped).
* :func:`attach` puts the console's state on the app: ``console_live``, ``console_queue`` and
  ``console_embedder`` (loaded on first use), and registers the session store.
* ``ui.queue_rules`` naming an unknown rule is a :class:`tuneloop.errors.UserError` when the app is built.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from litestar import Litestar, Request, Response, Router
from litestar.config.csrf import CSRFConfig
from litestar.exceptions import HTTPException
from litestar.middleware import DefineMiddleware
from litestar.middleware.csrf import CSRFMiddleware
from litestar.middleware.session.server_side import ServerSideSessionConfig
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Template
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig

from tuneloop import store_review
from tuneloop.db import Database
from tuneloop.dbapi import loads
from tuneloop.errors import UserError
from tuneloop.server.console_actions import ConsoleActions
from tuneloop.server.console_auth import (
    CSRF_COOKIE,
    SESSION_COOKIE,
    ConsoleError,
    console_principal,
    is_admin,
    principal_of,
    reviewer_of,
)
from tuneloop.server.console_live import LiveStats
from tuneloop.server.console_pages import ConsolePages
from tuneloop.server.console_queue import ReviewQueue
from tuneloop.server.errors import APIError
from tuneloop.settings import Settings
from tuneloop.store_sessions import DatabaseSessionStore, console_secret

SESSION_STORE = "tuneloop-console-sessions"
log = logging.getLogger(__name__)
HERE = Path(__file__).parent


def _fmt_s(v: Any) -> str:
    if v is None:
        return "–"
    v = float(v)
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"


def _fmt_num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _fmt_time(v: Any) -> str:
    if v is None:
        return "–"
    return v.strftime("%Y-%m-%d %H:%M:%S") if hasattr(v, "strftime") else str(v)


def template_config(settings: Settings) -> TemplateConfig[JinjaTemplateEngine]:
    """Jinja over ``server/templates`` with the console's filters (``secs``, ``num``, ``when``, ``text``, ``fromjson``, ``diff``)."""
    from tuneloop.pii import scrub

    scrub_on = settings.log.scrub_pii

    def text(v: Any) -> str:
        s = "" if v is None else str(v)
        return scrub(s)[0] if scrub_on else s

    def diff(a: Any, b: Any) -> list[tuple[str, str]]:
        """Word-level diff of ``a`` -> ``b``: (op, text) with op in ``=``, ``-``, ``+``."""
        import difflib

        wa, wb = text(a).split(" "), text(b).split(" ")
        out: list[tuple[str, str]] = []
        for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=wa, b=wb, autojunk=False).get_opcodes():
            if op == "equal":
                out.append(("=", " ".join(wa[i1:i2])))
            if op in ("delete", "replace"):
                out.append(("-", " ".join(wa[i1:i2])))
            if op in ("insert", "replace"):
                out.append(("+", " ".join(wb[j1:j2])))
        return out

    def setup(engine: JinjaTemplateEngine) -> None:
        env = engine.engine
        env.filters.update({"secs": _fmt_s, "num": _fmt_num, "when": _fmt_time, "text": text, "fromjson": loads})
        env.globals["diff"] = diff
        env.trim_blocks = env.lstrip_blocks = True

    return TemplateConfig(directory=HERE / "templates", engine=JinjaTemplateEngine, engine_callback=setup)


def _error_page(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    if isinstance(exc, (ConsoleError, APIError)):
        status, message = exc.status_code, exc.message
    elif isinstance(exc, HTTPException):
        status, message = exc.status_code, str(exc.detail)
        if status == 403 and "CSRF" in message:
            message = "The form expired or did not come from this console (CSRF check failed). Reload the page."
    else:
        log.exception("console: %s %s failed", request.method, request.url.path)
        status, message = 500, "Internal error; the server log has the details."
    p = principal_of(request)
    return Template(
        template_name="console/error.html",
        context={
            "status": status,
            "message": message,
            "nav": "",
            "principal": p,
            "reviewer": reviewer_of(p),
            "admin": is_admin(request),
        },
        status_code=status,
    )


def console_router(settings: Settings, db: Database) -> Router:
    """The ``/ui`` router (see module docstring)."""
    ui = settings.ui
    unknown = [r for r in ui.queue_rules if r not in store_review.RULES]
    if unknown:
        raise UserError(
            f"ui.queue_rules: unknown rule(s) {', '.join(unknown)} (known: {', '.join(store_review.RULES)})"
        )
    session = ServerSideSessionConfig(
        key=SESSION_COOKIE,
        max_age=ui.session_max_age_s,
        path="/ui",
        httponly=True,
        samesite="strict",
        renew_on_access=True,
        store=SESSION_STORE,
    )
    csrf = CSRFConfig(
        secret=ui.secret or console_secret(db),
        cookie_name=CSRF_COOKIE,
        cookie_path="/ui",
        cookie_httponly=True,
        cookie_samesite="strict",
    )
    static = create_static_files_router(
        path="/static",
        directories=[HERE / "static"],
        opt={"public": True},
        include_in_schema=False,
        name="console-static",
    )
    return Router(
        "/ui",
        route_handlers=[ConsolePages, ConsoleActions, static],
        middleware=[session.middleware, DefineMiddleware(CSRFMiddleware, config=csrf)],
        before_request=console_principal,
        exception_handlers={Exception: _error_page},
        include_in_schema=False,
    )


def attach(app: Litestar, settings: Settings) -> None:
    """The console's state on ``app.state`` (see module docstring)."""
    from tuneloop.monitoring.embeddings import Embedder

    app.state.console_live = LiveStats(app.state.registry)
    app.state.console_queue = ReviewQueue(app.state.db, settings.ui)
    app.state.console_embedder = Embedder()  # loads its model on first use (the drift page's clusters)
    app.stores.register(SESSION_STORE, DatabaseSessionStore(app.state.db), allow_override=True)
