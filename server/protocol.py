"""Typed request and response bodies of the HTTP API (OpenAI's wire format, plus the admin API).

Contract: every body the server accepts or returns is a ``msgspec.Struct``
here. Litestar validates requests against them (a violation is a 400 with an
OpenAI-style error, see :mod:`tuneloop.server.errors`) and the OpenAPI document
carries msgspec's own JSON Schema of them (:func:`tuneloop.server.app.document_api`),
so the bounds below (``Meta(ge=..., le=...)``) are both the validation and the
documentation. What the server checks after decoding (exactly one of two
fields, a field that needs another, a declared parameter that is always
refused) is stated for the document in a struct's ``json_schema_extra`` class
attribute; it changes nothing in decoding. Request bodies forbid unknown fields: a
parameter this server does not implement is a 400 that names it
(``unsupported_parameter``), never silently ignored. Besides OpenAI's
parameters, the request bodies accept the vLLM extras listed in
:data:`VLLM_EXTRAS` (documented in docs/serving.md). Field names and shapes
follow the OpenAI API reference for chat completions, completions and models,
and vLLM's server for ``/tokenize`` and ``/detokenize``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

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
TopK = Annotated[
    int, Meta(ge=-1, le=1_000_000, description="vLLM extra: sample from the k likeliest tokens (-1 = all)")
]
MinP = Annotated[float, Meta(ge=0.0, le=1.0, description="vLLM extra: drop tokens below min_p x the top probability")]
RepetitionPenalty = Annotated[
    float, Meta(gt=0.0, le=2.0, description="vLLM extra: >1 discourages repeating prompt and output tokens")
]
TokenId = Annotated[int, Meta(ge=0, le=2**31 - 1)]
LogitBias = Annotated[
    dict[
        Annotated[str, Meta(extra_json_schema={"pattern": "^[0-9]+$"})],  # a token id; checked by the server
        Annotated[float, Meta(ge=-100.0, le=100.0)],
    ],
    Meta(description="token id (as a string) -> bias added to its logit, -100..100"),
]
FunctionName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="a-z, A-Z, 0-9, _ . -; at most 64")]

#: JSON Schema of a token id (as :data:`TokenId` decodes it), for the ``json_schema_extra`` rules below
TOKEN_ID_SCHEMA: dict[str, Any] = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}


def _null(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` or null (JSON Schema)."""
    return {"anyOf": [schema, {"type": "null"}]}


def _given_one_of(*names: str) -> dict[str, Any]:
    """JSON Schema: exactly one of ``names`` is present and not null."""
    return {
        "oneOf": [
            {
                "required": [n],
                "properties": {k: {"not": {"type": "null"}} if k == n else {"type": "null"} for k in names},
            }
            for n in names
        ]
    }


#: ``response_format`` (other than text) and ``structured_outputs`` exclude each other (chat and completions)
_ONE_STRUCTURED_OUTPUT = {
    "anyOf": [
        {"properties": {"structured_outputs": {"type": "null"}}},
        {"properties": {"response_format": _null({"properties": {"type": {"const": "text"}}})}},
    ]
}

#: vLLM samples greedily at temperature 0 (it raises any other temperature below 0.01 to 0.01), and then refuses
#: n > 1 (chat and completions)
_N_NEEDS_SAMPLING = {
    "anyOf": [
        {"properties": {"n": {"maximum": 1}}},
        {"properties": {"temperature": _null({"type": "number", "exclusiveMinimum": 0})}},
    ]
}

#: The vLLM request extras this server accepts on top of OpenAI's parameters (all other unknown fields are a 400).
VLLM_EXTRAS = (
    "top_k",
    "min_p",
    "repetition_penalty",
    "ignore_eos",
    "min_tokens",
    "stop_token_ids",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "structured_outputs",
    "prompt_logprobs",
)


class SamplingExtras(msgspec.Struct, kw_only=True):
    """vLLM's sampling extras (see :data:`VLLM_EXTRAS`), shared by chat and completions."""

    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Meta(ge=0)] = 0
    stop_token_ids: Annotated[list[TokenId], Meta(max_length=64)] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True


class StructuredOutputs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM extra ``structured_outputs``: constrain the output to exactly one of these."""

    #: exactly one of them (else 400 ``invalid_parameter``); json_object, if given, is true; no NUL in a regex
    json_schema_extra: ClassVar[dict[str, Any]] = {
        **_given_one_of("json", "regex", "choice", "grammar", "json_object"),
        "properties": {
            "json_object": {"enum": [True, None], "default": None},
            "regex": _null({"type": "string", "minLength": 1, "pattern": "^[^\\u0000]*$"}),
        },
    }

    json: dict[str, Any] | None = None
    regex: Annotated[str, Meta(min_length=1)] | None = None
    choice: Annotated[list[str], Meta(min_length=1)] | None = None
    grammar: Annotated[str, Meta(min_length=1)] | None = None
    json_object: bool | None = None


# -- structured outputs (response_format) --------------------------------------------


class JSONSchemaSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    #: the server refuses a ``json_schema`` format without a schema (400 ``invalid_parameter``)
    json_schema_extra: ClassVar[dict[str, Any]] = {"properties": {"schema": {"type": "object"}}, "required": ["schema"]}

    name: FunctionName
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(msgspec.Struct, tag_field="type", tag="text", forbid_unknown_fields=True):
    """Free text (the default)."""


class JSONObjectFormat(msgspec.Struct, tag_field="type", tag="json_object", forbid_unknown_fields=True):
    """Any valid JSON object."""


class JSONSchemaFormat(msgspec.Struct, tag_field="type", tag="json_schema", forbid_unknown_fields=True):
    """JSON that validates against ``json_schema.schema`` (enforced by vLLM's structured-output backend)."""

    json_schema: JSONSchemaSpec


ResponseFormat = TextFormat | JSONObjectFormat | JSONSchemaFormat


# -- tools ----------------------------------------------------------------------------


class FunctionDefinition(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(msgspec.Struct, forbid_unknown_fields=True):
    name: FunctionName


class NamedToolChoice(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str


class ToolCall(msgspec.Struct, kw_only=True):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


# -- chat ------------------------------------------------------------------------


class TextPart(msgspec.Struct, kw_only=True):
    type: Literal["text"]
    text: str


class ChatMessage(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    #: tool_calls only on assistant messages; tool_call_id (non-empty) on tool messages and only there (else 400
    #: ``invalid_messages``)
    json_schema_extra: ClassVar[dict[str, Any]] = {
        "allOf": [
            {
                "anyOf": [
                    {"properties": {"role": {"const": "assistant"}}},
                    {"properties": {"tool_calls": _null({"type": "array", "maxItems": 0})}},
                ]
            },
            {
                "anyOf": [
                    {
                        "properties": {"role": {"const": "tool"}, "tool_call_id": {"type": "string", "minLength": 1}},
                        "required": ["tool_call_id"],
                    },
                    {
                        "properties": {
                            "role": {"enum": ["system", "developer", "user", "assistant"]},
                            "tool_call_id": {"type": "null"},
                        }
                    },
                ]
            },
        ]
    }

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class StreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    include_usage: bool = False


class ChatCompletionRequest(SamplingExtras, kw_only=True, forbid_unknown_fields=True):
    #: what the server refuses after decoding (400 ``invalid_parameter``): top_logprobs without logprobs: true,
    #: a tool_choice other than "none" without tools, response_format with structured_outputs, either of them
    #: with a tool_choice that forces a call ("required" or a named function), n > 1 with greedy sampling
    json_schema_extra: ClassVar[dict[str, Any]] = {
        "allOf": [
            {
                "anyOf": [
                    {"properties": {"top_logprobs": {"type": "null"}}},
                    {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
                ]
            },
            {
                "anyOf": [
                    {"properties": {"tool_choice": _null({"const": "none"})}},
                    {"properties": {"tools": {"type": "array", "minItems": 1}}, "required": ["tools"]},
                ]
            },
            _ONE_STRUCTURED_OUTPUT,
            _N_NEEDS_SAMPLING,
            {
                "anyOf": [
                    {"properties": {"tool_choice": _null({"enum": ["none", "auto"]})}},
                    {"properties": {"tools": _null({"type": "array", "maxItems": 0})}},
                    {
                        "properties": {
                            "structured_outputs": {"type": "null"},
                            "response_format": _null({"properties": {"type": {"const": "text"}}}),
                        }
                    },
                ]
            },
        ]
    }

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
    response_format: ResponseFormat | None = None
    tools: Annotated[list[ToolDefinition], Meta(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    logit_bias: LogitBias | None = None
    structured_outputs: StructuredOutputs | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None


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


class AssistantMessage(msgspec.Struct, omit_defaults=True):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] = msgspec.field(default_factory=list)


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


class FunctionCallDelta(msgspec.Struct, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(msgspec.Struct, omit_defaults=True):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class ChatDelta(msgspec.Struct, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


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


CompletionPrompt = (
    str
    | Annotated[
        list[str | TokenId | Annotated[list[TokenId], Meta(min_length=1)]],
        Meta(
            min_length=1,
            max_length=4096,
            description="a string, a list of strings (at most 64), a list of token ids, or a list of token-id lists "
            "(at most 64)",
        ),
    ]
)


class CompletionRequest(SamplingExtras, kw_only=True, forbid_unknown_fields=True):
    #: what the server refuses after decoding (400): an empty prompt, more than 64 prompts, a list mixing texts and
    #: token ids, any suffix, max_tokens 0 without echo, prompt_logprobs with stream, response_format with
    #: structured_outputs, n > 1 with greedy sampling
    json_schema_extra: ClassVar[dict[str, Any]] = {
        "properties": {
            "prompt": {
                "description": "a string, a list of strings (at most 64), a list of token ids, or a list of token-id "
                "lists (at most 64); never empty",
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 64},
                    {"type": "array", "items": TOKEN_ID_SCHEMA, "minItems": 1, "maxItems": 4096},
                    {
                        "type": "array",
                        "items": {"type": "array", "items": TOKEN_ID_SCHEMA, "minItems": 1},
                        "minItems": 1,
                        "maxItems": 64,
                    },
                ],
            },
            "suffix": {
                "type": "null",
                "description": "not supported (vLLM's engine has no insertion mode): any value is a 400 "
                "`unsupported_parameter`",
            },
        },
        "allOf": [
            {
                "anyOf": [
                    {"properties": {"max_tokens": _null({"type": "integer", "minimum": 1})}},
                    {"properties": {"echo": {"const": True}}, "required": ["echo"]},
                ]
            },
            {
                "anyOf": [
                    {"properties": {"prompt_logprobs": {"type": "null"}}},
                    {"properties": {"stream": {"const": False}}},
                ]
            },
            _ONE_STRUCTURED_OUTPUT,
            _N_NEEDS_SAMPLING,
        ],
    }

    model: ModelName
    prompt: CompletionPrompt
    max_tokens: Annotated[int, Meta(ge=0, description="0 only with echo: score the prompt")] | None = 16
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[int, Meta(ge=1, le=64)] = 1
    stop: Annotated[str, Meta(min_length=1)] | StopList | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    echo: bool = False
    suffix: str | None = None
    prompt_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: UserName | None = None
    response_format: ResponseFormat | None = None
    logit_bias: LogitBias | None = None
    structured_outputs: StructuredOutputs | None = None


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
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


# -- tokenize / detokenize (vLLM's server) ------------------------------------------------


class TokenizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's ``/tokenize``: a text ``prompt``, or chat ``messages`` rendered with the chat template."""

    json_schema_extra: ClassVar[dict[str, Any]] = _given_one_of("prompt", "messages")

    model: ModelName | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Meta(min_length=1)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    tools: list[ToolDefinition] | None = None


class TokenizeResponse(msgspec.Struct):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: ModelName | None = None
    tokens: Annotated[list[TokenId], Meta(max_length=1_000_000)]


class DetokenizeResponse(msgspec.Struct):
    prompt: str


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

    json_schema_extra: ClassVar[dict[str, Any]] = _given_one_of("version", "path")

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
    # a classifier server's extra engines (tuneloop.server.engine_pool): version name -> "ready" | "starting"
    engines: dict[str, str] = msgspec.field(default_factory=dict)


class Health(msgspec.Struct):
    status: str
    detail: str | None = None
