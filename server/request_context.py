"""One inference request's log record in the making: :class:`RequestContext`, and :func:`record_failure`.

Contract
--------
* Every request on an inference route (``/v1/chat/completions``,
  ``/v1/completions``, ``/v1/responses``, ``/v1/classify``) gets one :class:`RequestContext`, created on first use
  by :meth:`RequestContext.of` and kept in the ASGI scope state: its id
  (UUIDv7 with ``chatcmpl-`` / ``cmpl-`` / ``resp_``, the response ``id`` and
  ``X-Request-Id``), the receipt time stamped by the app's timing middleware,
  and what the serving layer learns (model, served version, arm, prompt,
  parameters, user, key id, time to first token).
* :meth:`RequestContext.submit` turns it into exactly one
  :class:`tuneloop.monitoring.records.RequestRecord` (later calls do
  nothing) and queues it on ``app.state.log_writer``, which also feeds the
  metrics. ``latency_s`` runs from receipt to the call.
* :func:`record_failure` is the app's ``on_error`` hook of
  :func:`tuneloop.server.errors.exception_handlers`: a refused inference
  request (401, 400, 404, ...) is logged too, and its id returned.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from litestar import Request

from tuneloop.db import utcnow
from tuneloop.ids import new_id
from tuneloop.monitoring.records import ORIGIN_HEADER, SYNTHETIC, RequestRecord
from tuneloop.server.errors import APIError

#: inference route path -> (logged route name, response id prefix)
ROUTES = {
    "/v1/chat/completions": ("chat.completions", "chatcmpl-"),
    "/v1/completions": ("completions", "cmpl-"),
    "/v1/responses": ("responses", "resp_"),
    "/v1/classify": ("classify", "classify-"),
}


@dataclass
class RequestContext:
    """What one inference request has accumulated for its log record."""

    id: str
    route: str
    t0: float
    received_at: datetime
    model: str | None = None
    version: str | None = None
    arm: str | None = None
    prompt: Any = None
    params: dict[str, Any] | None = None
    stream: bool | None = None
    user: str | None = None
    key_id: str | None = None
    ttft_s: float | None = None
    logged: bool = False

    @classmethod
    def of(cls, request: Request) -> RequestContext | None:
        """The context of ``request`` (created on first use for an inference route), else None."""
        st = request.scope.setdefault("state", {})
        ctx: RequestContext | None = st.get("tuneloop_ctx")
        if ctx is None:
            spec = ROUTES.get(request.scope.get("path", ""))
            if spec is None:
                return None
            principal = st.get("principal")
            ctx = cls(
                id=new_id(spec[1]),
                route=spec[0],
                t0=st.get("tuneloop_t0") or time.perf_counter(),
                received_at=st.get("tuneloop_received_at") or utcnow(),
                key_id=getattr(principal, "key_id", None),
            )
            st["tuneloop_ctx"] = ctx
        return ctx

    @classmethod
    def require(cls, request: Request) -> RequestContext:
        """The context of a request on an inference route (a RuntimeError on any other route)."""
        ctx = cls.of(request)
        if ctx is None:
            raise RuntimeError(f"{request.url.path} is not an inference route")
        return ctx

    def headers(self) -> dict[str, str]:
        """``X-Request-Id`` and ``X-Model-Version`` of the response."""
        return {"X-Request-Id": self.id, "X-Model-Version": self.version or ""}

    def log_arm(self, request: Request) -> str | None:
        """The ``arm`` of this request's log records: ``synthetic`` for a request marked synthetic
        (:data:`tuneloop.monitoring.records.ORIGIN_HEADER`), which is never logged nor counted as production."""
        return SYNTHETIC if request.headers.get(ORIGIN_HEADER, "").strip().lower() == SYNTHETIC else self.arm

    def submit(
        self,
        request: Request,
        status: int,
        *,
        response: str | None = None,
        finish_reason: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        error: str | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> None:
        """Queue this request's one log record (later calls do nothing); ``tool_calls``: the parsed tool
        calls of choice 0 (OpenAI shape), logged in ``requests.tool_calls``."""
        if self.logged:
            return
        self.logged = True
        rec = RequestRecord(
            id=self.id,
            received_at=self.received_at,
            route=self.route,
            status=status,
            model=self.model,
            model_version=self.version,
            arm=self.log_arm(request),
            prompt=self.prompt,
            response=response,
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            ttft_s=self.ttft_s,
            latency_s=time.perf_counter() - self.t0,
            error=error,
            stream=self.stream,
            params=self.params,
            user_id=self.user,
            key_id=self.key_id,
            tool_calls=tool_calls or None,
        )
        writer = getattr(request.app.state, "log_writer", None)
        if writer is not None:
            writer.submit(rec)


def record_failure(request: Request, err: APIError) -> str | None:
    """Log a refused inference request (the app's exception-handler hook); return its request id."""
    ctx = RequestContext.of(request)
    if ctx is None:
        return None
    ctx.submit(request, err.status_code, error=f"{err.code}: {err.message}"[:2000])
    return ctx.id
