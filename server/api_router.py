"""The OpenAI-compatible routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``.

Contract: :class:`OpenAIController` only declares the routes and their
OpenAPI documentation, lets Litestar parse the body into the structs of
:mod:`tuneloop.server.protocol`, and hands it to ``app.state.serving``
(:class:`tuneloop.server.serving.OpenAIServing`), which does the work and
builds the response. Errors (including body validation) are answered by the
app's exception handlers (:mod:`tuneloop.server.errors`). The app mounts it
behind the inference-scope guard.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.openapi import ResponseSpec

from tuneloop.server.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse, ModelList
from tuneloop.server.serving import OpenAIServing

_ERRORS = {
    s: ResponseSpec(data_container=ErrorResponse, description=d, generate_examples=False)
    for s, d in {
        400: "invalid request (bad JSON, types, values, prompt too long for the context)",
        401: "missing or invalid API key",
        403: "key lacks the scope",
        404: "unknown model",
        413: "body over server.max_body_bytes",
        503: "engine unavailable",
    }.items()
}


def _serving(request: Request) -> OpenAIServing:
    serving: OpenAIServing = request.app.state.serving
    return serving


class OpenAIController(Controller):
    """OpenAI-compatible inference endpoints (inference scope)."""

    path = "/v1"
    tags = ["OpenAI"]

    @get(
        "/models",
        summary="List the models this server answers to",
        description="The base model's served name, the `production` alias (and `canary` while one exists), "
        "adapters loaded in the engine and registered adapter versions of this base (loaded on first use).",
    )
    async def models(self, request: Request) -> ModelList:
        return _serving(request).models()

    @post(
        "/chat/completions",
        status_code=200,
        summary="Chat completion (OpenAI-compatible)",
        description="Generate a reply to `messages` with the model named by `model`. `stream: true` answers with "
        "server-sent events in OpenAI's chunk format, ended by `data: [DONE]`.",
        responses=_ERRORS,
    )
    async def chat_completions(self, request: Request, data: ChatCompletionRequest) -> Response[Any]:
        return await _serving(request).chat(request, data)

    @post(
        "/completions",
        status_code=200,
        summary="Text completion (OpenAI-compatible, legacy)",
        description="Continue `prompt` (a string or a list of strings) with the model named by `model`.",
        responses=_ERRORS,
    )
    async def completions(self, request: Request, data: CompletionRequest) -> Response[Any]:
        return await _serving(request).completions(request, data)
