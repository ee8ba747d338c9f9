"""Typed request and response bodies of the HTTP API (OpenAI's wire format, plus the admin API).

Contract: every body the server accepts or returns is a ``msgspec.Struct``
here. Litestar validates requests against them (a violation is a 400 with an
OpenAI-style error, see :mod:`tuneloop.server.errors`) and builds the OpenAPI schema
from them, so the bounds below (``Meta(ge=..., le=...)``) are both the
validation and the documentation. Unknown request fields are ignored, as
OpenAI clients send fields this server does not implement (``tools``,
``response_format``...). Field names and shapes follow the OpenAI API
reference for chat completions, completions and models.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

PositiveInt = Annotated[int, Meta(ge=1, description="at least 1")]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0, description="0 = greedy; 0..2")]
TopP = Annotated[float, Meta(gt=0.0, le=1.0, description="nucleus mass in (0, 1]")]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0, description="-2..2")]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1, description="64-bit seed for reproducible sampling")]
StopList = Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(max_length=4)]
ModelName = Annotated[
    str,
    Meta(
        min_length=1, max_length=512, description="base model name, adapter version name, or alias (production, canary)"
    ),
]
UserName = Annotated[str, Meta(max_length=256, description="end-user id; also the sticky key of canary routing")]


# -- chat ------------------------------------------------------------------------


class TextPart(msgspec.Struct, kw_only=True):
    type: Literal["text"]
    text: str


class ChatMessage(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class ChatCompletionRequest(msgspec.Struct, kw_only=True):
    model: ModelName
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[int, Meta(ge=1, le=64)] = 1
    stop: Annotated[str, Meta(min_length=1)] | StopList | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: UserName | None = None


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct):
    content: list[ChatTokenLogprob] | None


class AssistantMessage(msgspec.Struct):
    role: Literal["assistant"]
    content: str | None


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: Literal["chat.completion"] = "chat.completion"
    system_fingerprint: str | None = None


class ChatDelta(msgspec.Struct, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    system_fingerprint: str | None = None
    usage: Usage | None = None


# -- completions -----------------------------------------------------------------------


class CompletionRequest(msgspec.Struct, kw_only=True):
    model: ModelName
    prompt: str | Annotated[list[str], Meta(min_length=1, max_length=64)]
    max_tokens: PositiveInt | None = 16
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[int, Meta(ge=1, le=64)] = 1
    stop: Annotated[str, Meta(min_length=1)] | StopList | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: UserName | None = None


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None
    object: Literal["text_completion"] = "text_completion"
    system_fingerprint: str | None = None


# -- models ---------------------------------------------------------------------


class ModelCard(msgspec.Struct):
    id: str
    created: int
    owned_by: str
    object: Literal["model"] = "model"
    root: str | None = None
    parent: str | None = None


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: Literal["list"] = "list"


# -- errors ------------------------------------------------------------------------


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorDetail


# -- admin -------------------------------------------------------------------------


class LoadAdapterRequest(msgspec.Struct, kw_only=True):
    """Load a registered adapter version (``version``) or a PEFT folder (``path``, served as ``name``)."""

    version: Annotated[str, Meta(min_length=1)] | None = None
    path: Annotated[str, Meta(min_length=1)] | None = None
    name: Annotated[str, Meta(min_length=1, max_length=256)] | None = None


class AdapterOut(msgspec.Struct):
    name: str
    path: str
    rank: int
    in_flight: int
    loaded_at: float
    version: str | None = None


class AdapterList(msgspec.Struct):
    base_model: str
    served_name: str
    adapters: list[AdapterOut]
    max_loras: int
    max_lora_rank: int


class RoutingStateOut(msgspec.Struct):
    served_name: str
    base_model: str
    production: str | None
    canary: str | None
    canary_share: float
    canary_production: str | None
    refreshed_at: float | None
    adapters: list[str]


class Health(msgspec.Struct):
    status: str
    detail: str | None = None
