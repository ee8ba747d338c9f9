"""The server's one HTTP error model: every refusal is OpenAI-style JSON ``{"error": {"message", "type", "code", "param"}}``.

Contract
--------
* :class:`APIError` is the only error type the HTTP layer raises for a request
  it refuses: the OpenAI routes, the feedback routes, the admin routes, the
  model router and the auth guards all raise it (or a subclass that only sets
  defaults, such as ``AuthError`` or ``RoutingError``). It carries the HTTP
  ``status_code``, a ``message`` that says what to change, the OpenAI
  ``type``, a machine-readable ``code``, the offending ``param`` and extra
  response ``headers`` (``WWW-Authenticate`` on 401, ``Retry-After`` on 503).
  Defaults: ``type`` is ``permission_error`` for 403, ``invalid_request_error``
  for every other 4xx (401 included, as OpenAI answers a bad key) and
  ``server_error`` for 5xx; ``code`` follows the status (``invalid_api_key``
  for 401, ``not_found`` for 404, ...). :meth:`APIError.to_dict` is the body.
* :func:`to_api_error` maps any exception to an :class:`APIError`: the
  engine's input and adapter errors (400), an unavailable or dead engine
  (503), a busy database (503 ``database_busy`` with ``Retry-After``), a
  :class:`tuneloop.errors.UserError` (400), Litestar's validation errors
  (invalid JSON, wrong types, out-of-bound values -> 400 with the field in
  ``param``; a field the body does not define -> 400 ``unsupported_parameter``
  naming it, its path in ``param``), its HTTP errors (401, 404, 405, 413 over
  ``server.max_body_bytes``, ...), a client that went away while sending (499),
  and anything unexpected (500; the message never leaks internals).
* :func:`exception_handlers` is the one set of Litestar exception handlers
  built on it; the app registers it (with an ``on_error`` hook that logs
  failed inference requests), and so does any controller that must answer the
  same way when mounted in another app. Unexpected errors are logged with
  their traceback.
* :func:`error_responses` is the OpenAPI side of the same contract: every
  route declares the error statuses it answers with it (``responses=``), each
  documented with the :class:`ErrorResponse` body. It also replaces the
  ``{status_code, detail}`` 400 body Litestar documents by default for every
  route with a body or a path parameter, which this server never sends.

This module imports nothing from the route modules.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import ResponseSpec

from tuneloop.db import DatabaseBusy
from tuneloop.errors import UserError
from tuneloop.server.engine import AdapterError, EngineInputError, EngineUnavailable
from tuneloop.server.protocol import ErrorDetail, ErrorResponse

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

#: Called by the exception handler with every refused request; may return a request id for ``X-Request-Id``.
OnError = Callable[[Request, "APIError"], "str | None"]

#: When each error status is answered (the OpenAPI description of :func:`error_responses`; routes may say more).
ERROR_DESCRIPTIONS = {
    400: "invalid request: bad JSON, a wrong type or an out-of-range value, a parameter this server does not "
    "implement (`unsupported_parameter`), or a value the server refuses after reading it (`param` names the field)",
    401: "missing or invalid API key (`invalid_api_key`; once any key exists, or with auth.require_keys)",
    403: "an `inference` key on an admin route (`insufficient_scope`), or an anonymous admin request from a "
    "non-loopback client (`admin_loopback_only`)",
    404: "not found",
    409: "conflict with the server's current state",
    413: "body over server.max_body_bytes (`request_too_large`)",
    503: "the engine or the database is unavailable (`engine_unavailable`, `engine_dead`, `database_busy` with "
    "Retry-After)",
}


def error_responses(*codes: int, notes: dict[int, str] | None = None) -> dict[int, ResponseSpec]:
    """OpenAPI ``responses=`` of a route for these error statuses, each with the :class:`ErrorResponse` body.

    ``notes`` replaces the generic description of a status with what it means on that route. A 400 here
    replaces Litestar's default 400 (its ``{status_code, detail}`` body, which this server never sends)."""
    notes = notes or {}
    return {
        code: ResponseSpec(
            data_container=ErrorResponse,
            description=notes.get(code) or ERROR_DESCRIPTIONS.get(code) or _CODES.get(code, "error"),
            generate_examples=False,
        )
        for code in codes
    }


def default_type(status_code: int) -> str:
    """The OpenAI error ``type`` of a status: ``permission_error`` (403), ``invalid_request_error`` (4xx), ``server_error``."""
    if status_code == 403:
        return "permission_error"
    return "invalid_request_error" if status_code < 500 else "server_error"


class APIError(Exception):
    """A refused request: HTTP status, OpenAI-style error fields and response headers (see module docstring)."""

    def __init__(
        self,
        status_code: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        *,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.code = code or _CODES.get(status_code, "error")
        self.param = param
        self.type = type or default_type(status_code)
        self.headers = dict(headers or {})

    def to_dict(self) -> dict[str, Any]:
        """The response body as a dict."""
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}

    def body(self) -> bytes:
        """The response body as JSON bytes."""
        return msgspec.json.encode(ErrorResponse(ErrorDetail(self.message, self.type, self.code, self.param)))

    def response(self, extra_headers: dict[str, str] | None = None) -> Response[bytes]:
        return Response(
            content=self.body(),
            status_code=self.status_code,
            media_type="application/json",
            headers={**self.headers, **(extra_headers or {})},
        )


def to_api_error(exc: BaseException) -> APIError:
    """Map any exception to an :class:`APIError` (unexpected ones become a 500 without internals)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineInputError):
        return APIError(400, str(exc), exc.code, exc.param)
    if isinstance(exc, AdapterError):
        return APIError(400, str(exc), "invalid_adapter")
    if isinstance(exc, EngineUnavailable):
        return APIError(503, f"the model engine is unavailable: {exc}", "engine_unavailable")
    if isinstance(exc, ValidationException):
        unknown = _unknown_parameter(exc)
        if unknown is not None:
            return unknown
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


def _validation_items(exc: ValidationException) -> list[dict[str, Any]]:
    extra = exc.extra
    return [e for e in extra if isinstance(e, dict)] if isinstance(extra, list) else []


def _field_of(item: dict[str, Any]) -> str | None:
    """The body field an error item is about: its key (``data`` means the whole body), else the field it names."""
    key = item.get("key")
    if key and key != "data":
        return str(key).split(".", 1)[0].split("[", 1)[0] or None
    m = re.search(r"field `([A-Za-z_][A-Za-z0-9_]*)`", str(item.get("message", "")))
    return m.group(1) if m else None


def _unknown_parameter(exc: ValidationException) -> APIError | None:
    """A body field this server does not implement: 400 ``unsupported_parameter`` naming it (never ignored)."""
    items = _validation_items(exc)
    if len(items) != 1:
        return None
    m = re.fullmatch(r"Object contains unknown field `([^`]+)`", str(items[0].get("message", "")))
    if m is None:
        return None
    name, where = m.group(1), str(items[0].get("key") or "data")
    if where == "data":
        return APIError(
            400,
            f"unsupported parameter: {name!r} is not implemented by this server (see the compatibility table in "
            "docs/serving.md); remove it",
            "unsupported_parameter",
            name,
        )
    return APIError(
        400,
        f"unsupported parameter: {where}.{name} is not implemented by this server; remove it",
        "unsupported_parameter",
        f"{where}.{name}",
    )


def _validation_message(exc: ValidationException) -> str:
    parts = []
    for e in _validation_items(exc)[:5]:
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
    items = _validation_items(exc)
    return _field_of(items[0]) if items else None


def _is_expected(exc: Exception, err: APIError) -> bool:
    """Whether an error needs no traceback in the log (a refusal, or a known engine state)."""
    return (
        err.status_code < 500
        or isinstance(exc, (APIError, EngineUnavailable))
        or type(exc).__name__ == "EngineDeadError"
    )


def exception_handlers(on_error: OnError | None = None) -> dict[type[Exception] | int, Any]:
    """Litestar exception handlers answering every exception with :meth:`APIError.response`.

    ``on_error(request, err)`` runs first for each refused request (failures in it are logged, never
    raised); a string it returns is sent as ``X-Request-Id``."""

    def handle(request: Request, exc: Exception) -> Response[bytes]:
        err = to_api_error(exc)
        if not _is_expected(exc, err):
            log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        headers: dict[str, str] = {}
        if on_error is not None:
            try:
                rid = on_error(request, err)
                if rid:
                    headers["X-Request-Id"] = rid
            except Exception:
                log.exception("could not log a failed request")
        return err.response(headers)

    return {Exception: handle, HTTPException: handle}
