"""Every error the API returns, as OpenAI-style JSON: ``{"error": {"message", "type", "code", "param"}}``.

Contract
--------
* :class:`APIError` is what handlers raise for a request they refuse; it
  carries the HTTP status, a message that says what to change, the OpenAI
  ``type`` (``invalid_request_error`` for 4xx, ``server_error`` for 5xx) and a
  machine-readable ``code``.
* :func:`exception_handlers` maps every exception that can reach Litestar to
  such a body: our own errors, the engine's input and adapter errors, routing
  errors, auth errors (401/403 with ``WWW-Authenticate``), Litestar's own
  validation errors (invalid JSON, wrong types, out-of-bound values -> 400),
  404, 405, 413 (body over ``server.max_body_bytes``) and anything unexpected
  (500, logged with its traceback, the message never leaks internals).
* An error on an inference route (``/v1/chat/completions``, ``/v1/completions``)
  is also one request-log row (see :func:`server.openai_routes.record_failure`),
  so failed requests count in the log and in the metrics.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from tuneloop.db import DatabaseBusy
from tuneloop.errors import UserError
from tuneloop.server.engine import AdapterError, EngineInputError, EngineUnavailable
from tuneloop.server.protocol import ErrorDetail, ErrorResponse
from tuneloop.server.routing import RoutingError

log = logging.getLogger(__name__)

_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    403: "insufficient_scope",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "request_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    499: "client_closed_request",
    500: "internal_error",
    503: "unavailable",
}


class APIError(Exception):
    """A refused request with its HTTP status and OpenAI-style error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message = status, message
        self.code = code or _CODES.get(status, "error")
        self.param = param
        self.headers = headers or {}

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        if self.status == 403:
            return "permission_error"
        return "invalid_request_error" if self.status < 500 else "server_error"


def error_body(err: APIError) -> bytes:
    return msgspec.json.encode(ErrorResponse(ErrorDetail(err.message, err.type, err.code, err.param)))


def to_api_error(exc: BaseException) -> APIError:
    """Map any exception to an :class:`APIError` (unexpected ones become a 500 without internals)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineInputError):
        return APIError(400, str(exc), exc.code, exc.param)
    if isinstance(exc, AdapterError):
        return APIError(400, str(exc), "invalid_adapter")
    if isinstance(exc, RoutingError):
        return APIError(exc.status, exc.message, exc.code, "model")
    if isinstance(exc, EngineUnavailable):
        return APIError(503, f"the model engine is unavailable: {exc}", "engine_unavailable")
    try:
        from tuneloop.server.auth import AuthError
    except ImportError:  # pragma: no cover - LOGS' module not present
        AuthError = ()  # type: ignore[assignment]
    if AuthError and isinstance(exc, AuthError):
        return APIError(exc.status_code, exc.message, exc.code, headers=dict(exc.headers))
    if isinstance(exc, ValidationException):
        return APIError(400, _validation_message(exc), "invalid_request", _validation_param(exc))
    if isinstance(exc, HTTPException) and "disconnected" in str(exc.detail or ""):
        return APIError(499, "client closed the request while sending it")
    if isinstance(exc, HTTPException):
        status = exc.status_code
        msg = exc.detail or "error"
        if status == 404:
            msg = "no such endpoint; see /schema for the API"
        elif status == 405:
            msg = f"method not allowed: {exc.detail}"
        elif status == 413:
            msg = "request body too large (server.max_body_bytes)"
        return APIError(status, msg, headers=dict(exc.headers or {}))
    if isinstance(exc, DatabaseBusy):
        return APIError(503, "the database is busy; retry shortly", "database_busy", headers={"Retry-After": "1"})
    if isinstance(exc, UserError):
        return APIError(400, str(exc))
    if type(exc).__name__ == "EngineDeadError":
        return APIError(503, "the model engine stopped; the server must be restarted", "engine_dead")
    return APIError(500, "internal server error; see the server log", "internal_error")


def _validation_message(exc: ValidationException) -> str:
    extra = exc.extra
    if isinstance(extra, list) and extra:
        parts = []
        for e in extra[:5]:
            if isinstance(e, dict):
                key = e.get("key")
                parts.append(
                    f"{e.get('message', 'invalid value')}"
                    + (f" (at {key})" if key and key not in str(e.get("message")) else "")
                )
        if parts:
            return "invalid request body: " + "; ".join(parts)
    detail = exc.detail or "invalid request"
    return detail if "body" in detail.lower() or "json" in detail.lower() else f"invalid request body: {detail}"


def _validation_param(exc: ValidationException) -> str | None:
    extra = exc.extra
    if isinstance(extra, list) and extra and isinstance(extra[0], dict) and extra[0].get("key"):
        return str(extra[0]["key"]).split(".", 1)[0].split("[", 1)[0] or None
    return None


def handle(request: Request, exc: Exception) -> Response:
    err = to_api_error(exc)
    if (
        err.status >= 500
        and err.status != 499
        and not isinstance(exc, (APIError, EngineUnavailable))
        and type(exc).__name__ != "EngineDeadError"
    ):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    headers = dict(err.headers)
    try:
        from tuneloop.server.openai_routes import record_failure

        rid = record_failure(request, err)
        if rid:
            headers["X-Request-Id"] = rid
    except Exception:
        log.exception("could not log a failed request")
    return Response(content=error_body(err), status_code=err.status, media_type="application/json", headers=headers)


def exception_handlers() -> dict[Any, Any]:
    return {Exception: handle, HTTPException: handle}
