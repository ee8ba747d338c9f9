"""The web console's actions (POST forms): sign in and out, review a request, promote or roll back a canary.

Contract
--------
* Every form carries Litestar's CSRF token (``_csrf_token``; the CSRF middleware on the console's router refuses
  a POST without a matching one with 403 before any handler runs).
* ``POST /ui/login`` (public) — ``api_key`` checked as the API checks a Bearer key; success stores the key's id in
  the session (:mod:`tuneloop.server.console_auth`) and redirects to ``next`` (a console path only); a wrong key
  re-renders the form with 401 and the key's display prefix at most. ``POST /ui/logout`` ends the session.
* ``POST /ui/review/{request_id}`` — the reviewer's feedback on one request: ``rating`` (``up`` / ``down`` / 1-5,
  or empty), ``correction`` (kept only when it differs from the served answer) and ``comment``. It is validated
  and saved exactly as ``POST /v1/feedback`` saves feedback (same rules, same Prometheus counter), with
  ``source = review:<reviewer>`` (:func:`tuneloop.store_review.reviewer_source`), so the next ``feedback sample``
  uses it; the queue item is marked reviewed. Nothing to save is a 400 error page.
* ``POST /ui/canary/promote`` and ``/ui/canary/rollback`` (admin only, :func:`console_auth.require_admin`; the
  page asks for confirmation first) — :func:`tuneloop.monitoring.canary.promote` / ``rollback`` of the running
  canary named in the form, recorded with actor ``console:<reviewer>``; a canary decided meanwhile is a 409.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from litestar import Controller, Request, Response, post
from litestar.params import FromPath, URLEncodedBody
from litestar.response import Redirect, Template

from tuneloop import store_review
from tuneloop.dbapi import DatabaseBusy
from tuneloop.server.auth import Auth, AuthError
from tuneloop.server.console_auth import (
    ConsoleError,
    principal_of,
    require_admin,
    reviewer_of,
    safe_next,
)
from tuneloop.server.errors import APIError
from tuneloop.server.feedback_routes import FeedbackIn, normalise, upsert_feedback
from tuneloop.store_feedback import RequestNotFound


class LoginForm(msgspec.Struct):
    api_key: str = ""
    next: str = "/ui"


class ReviewForm(msgspec.Struct):
    rating: str = ""
    correction: str = ""
    comment: str = ""
    next: str = ""


class CanaryForm(msgspec.Struct):
    canary_id: str = ""
    reason: str = ""


def _rating(text: str) -> str | int | msgspec.UnsetType | None:
    t = text.strip().lower()
    if not t:
        return msgspec.UNSET
    return int(t) if t.isdigit() else t


class ConsoleActions(Controller):
    """POST forms of the console."""

    path = "/"
    include_in_schema = False

    @post("/login", opt={"public": True}, status_code=303)
    async def login(self, request: Request, data: URLEncodedBody[LoginForm]) -> Response[Any]:
        auth: Auth = request.app.state.auth
        target = safe_next(data.next)
        try:
            principal = await auth.check_secret(data.api_key.strip() or None, "inference")
        except AuthError as e:
            return Template(
                template_name="console/login.html",
                context={"error": e.message, "next": target, "nav": "login", "principal": None},
                status_code=401,
            )
        if principal.key_id is not None:
            request.set_session({"key_id": principal.key_id})
        return Redirect(target, status_code=303)

    @post("/logout", status_code=303)
    async def logout(self, request: Request) -> Redirect:
        request.clear_session()
        return Redirect("/ui/login", status_code=303)

    @post("/review/{request_id:str}", status_code=303)
    async def review(self, request: Request, request_id: FromPath[str], data: URLEncodedBody[ReviewForm]) -> Redirect:
        reviewer = reviewer_of(principal_of(request))
        source = store_review.reviewer_source(reviewer)
        db = request.app.state.db
        served = await asyncio.to_thread(
            db.query, "SELECT response, model_version FROM requests WHERE id = ?", [request_id]
        )
        if not served:
            raise ConsoleError(404, f"No logged request has id {request_id!r}.")
        correction = data.correction.replace("\r\n", "\n").strip()
        same = correction == (served[0]["response"] or "").strip()
        body = FeedbackIn(
            request_id=request_id,
            source=source,
            rating=_rating(data.rating),
            correction=correction if correction and not same else msgspec.UNSET,
            comment=data.comment.strip() or msgspec.UNSET,
        )
        try:
            fields = normalise(body)
        except APIError as e:
            raise ConsoleError(400, e.message) from None
        if not fields:
            raise ConsoleError(
                400, "Nothing to save: give a rating, a correction that differs from the answer, or a comment."
            )
        try:
            out, created, prev = await asyncio.to_thread(upsert_feedback, db, request_id, source, fields)
        except DatabaseBusy as e:
            raise ConsoleError(503, f"The database is busy ({e}); try again.") from None
        except RequestNotFound:
            raise ConsoleError(404, f"No logged request has id {request_id!r}.") from None
        metrics = request.app.state.metrics
        rating = fields.get("rating")
        if rating is not None and (created or prev != (rating, fields.get("rating_kind"))):
            metrics.observe_feedback(rating, fields.get("rating_kind"), out.model_version)
        await asyncio.to_thread(store_review.mark_reviewed, db, request_id, reviewer)
        return Redirect(safe_next(data.next or f"/ui/requests/{request_id}"), status_code=303)

    @post("/canary/promote", status_code=303)
    async def promote(self, request: Request, data: URLEncodedBody[CanaryForm]) -> Redirect:
        return await self._decide(request, data, "promote")

    @post("/canary/rollback", status_code=303)
    async def rollback(self, request: Request, data: URLEncodedBody[CanaryForm]) -> Redirect:
        return await self._decide(request, data, "rollback")

    async def _decide(self, request: Request, data: CanaryForm, action: str) -> Redirect:
        from tuneloop.monitoring import canary
        from tuneloop.store_deploy import CanaryError

        require_admin(request)
        if not data.canary_id:
            raise ConsoleError(400, "canary_id: which canary to decide is missing from the form.")
        actor = "console:" + reviewer_of(principal_of(request))
        reason = data.reason.strip() or f"{action} from the web console"
        fn = canary.promote if action == "promote" else canary.rollback
        try:
            await asyncio.to_thread(fn, request.app.state.db, data.canary_id, actor, reason)
        except CanaryError as e:
            raise ConsoleError(409, str(e)) from None
        await request.app.state.router.refresh()
        return Redirect("/ui/canary", status_code=303)
