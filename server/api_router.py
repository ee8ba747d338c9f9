"""The OpenAI-compatible routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``,
and vLLM's ``POST /tokenize`` / ``POST /detokenize``.

Contract: :class:`OpenAIController` only declares the routes and their
OpenAPI documentation, lets Litestar parse the body into the structs of
:mod:`tuneloop.server.protocol`, and hands it to ``app.state.serving``
(:class:`tuneloop.server.serving.OpenAIServing`), which does the work and
builds the response. Errors (including body validation) are answered by the
app's exception handlers (:mod:`tuneloop.server.errors`). The app mounts it
behind the inference-scope guard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Reference, Schema
from litestar.params import JSONBody

from tuneloop.server.errors import error_responses
from tuneloop.server.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from tuneloop.server.serving import OpenAIServing

#: the errors of every generating route (``model`` names what to run: 404 when nothing by that name is served)
GENERATION_ERRORS = error_responses(
    400,
    401,
    404,
    413,
    503,
    notes={
        400: "invalid request: bad JSON, a wrong type or an out-of-range value, a parameter this server does not "
        "implement (`unsupported_parameter`), a combination it refuses (`invalid_parameter`, `invalid_messages`), "
        "a prompt or token budget over the model's context (`context_length_exceeded`); `param` names the field",
        404: "no model by that name is served here (`model_not_found`; see GET /v1/models)",
    },
)
_TOKENIZER_ERRORS = error_responses(
    400,
    401,
    404,
    413,
    503,
    notes={404: "`model` is given and is not served here (`model_not_found`)"},
)


def streaming_operation(*payloads: type[msgspec.Struct], done: bool = True) -> type[Operation]:
    """Litestar ``operation_class`` of a route that answers ``stream: true`` with server-sent events: its 200
    response documents ``text/event-stream`` next to the JSON body, one schema per event whose ``data`` is the
    JSON of one of ``payloads`` (``contentSchema``; an engine failure mid-stream is one too), or ``[DONE]`` (when
    ``done``, as OpenAI ends chat and completion streams). :func:`tuneloop.server.app.document_api` adds the
    ``payloads`` to the document's schemas."""
    json_data = Schema(
        type=OpenAPIType.STRING,
        content_media_type="application/json",
        content_schema=Schema(any_of=[Reference(ref=f"#/components/schemas/{p.__name__}") for p in payloads]),
    )
    data = (
        Schema(type=OpenAPIType.STRING, schema_if=Schema(const="[DONE]"), schema_else=json_data) if done else json_data
    )
    event = Schema(
        type=OpenAPIType.OBJECT,
        required=["data"],
        properties={"data": data, "event": Schema(type=OpenAPIType.STRING)},
        description="one server-sent event (`stream: true`)",
    )

    @dataclass
    class StreamingOperation(Operation):
        event_payloads: ClassVar[tuple[type[msgspec.Struct], ...]] = payloads

        def __post_init__(self) -> None:
            ok = (self.responses or {}).get("200")
            if isinstance(ok, OpenAPIResponse):
                ok.content = {**(ok.content or {}), "text/event-stream": OpenAPIMediaType(schema=event)}

    return StreamingOperation


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
        responses=error_responses(401),
    )
    async def models(self, request: Request) -> ModelList:
        return _serving(request).models()

    @post(
        "/chat/completions",
        status_code=200,
        summary="Chat completion (OpenAI-compatible)",
        description="Generate a reply to `messages` with the model named by `model`. `stream: true` answers with "
        "server-sent events in OpenAI's chunk format (`data: <ChatCompletionChunk>`), ended by `data: [DONE]`.",
        responses={
            200: ResponseSpec(ChatCompletion, description="the completion (`stream: true`: server-sent events)"),
            **GENERATION_ERRORS,
        },
        operation_class=streaming_operation(ChatCompletionChunk, ErrorResponse),
    )
    async def chat_completions(self, request: Request, data: JSONBody[ChatCompletionRequest]) -> Response[Any]:
        return await _serving(request).chat(request, data)

    @post(
        "/completions",
        status_code=200,
        summary="Text completion (OpenAI-compatible, legacy)",
        description="Continue `prompt` (a string, a list of strings, a list of token ids or a list of token-id "
        "lists) with the model named by `model`. `stream: true` answers with server-sent events "
        "(`data: <Completion>` chunks), ended by `data: [DONE]`.",
        responses={
            200: ResponseSpec(Completion, description="the completion (`stream: true`: server-sent events)"),
            **GENERATION_ERRORS,
        },
        operation_class=streaming_operation(Completion, ErrorResponse),
    )
    async def completions(self, request: Request, data: JSONBody[CompletionRequest]) -> Response[Any]:
        return await _serving(request).completions(request, data)


class TokenizerController(Controller):
    """vLLM's tokenizer endpoints (inference scope): the serving tokenizer and chat template, no generation."""

    path = "/"
    tags = ["vLLM"]

    @post(
        "/tokenize",
        status_code=200,
        summary="Token ids of a prompt or of a conversation (vLLM-compatible)",
        description="`prompt`: the text's token ids (`add_special_tokens`, default true). `messages`: the "
        "conversation rendered with the chat template exactly as `/v1/chat/completions` renders it "
        "(`add_generation_prompt`, default true; `tools`). `max_model_len` is the engine's context length.",
        responses=_TOKENIZER_ERRORS,
    )
    async def tokenize(self, request: Request, data: JSONBody[TokenizeRequest]) -> TokenizeResponse:
        return _serving(request).tokenize(data)

    @post(
        "/detokenize",
        status_code=200,
        summary="Text of token ids (vLLM-compatible)",
        responses=_TOKENIZER_ERRORS,
    )
    async def detokenize(self, request: Request, data: JSONBody[DetokenizeRequest]) -> DetokenizeResponse:
        return _serving(request).detokenize(data)
