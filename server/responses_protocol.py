"""Request and response bodies of ``POST /v1/responses``: OpenAI's Responses API, text in and text out.

Contract
--------
* :class:`ResponsesRequest` is the body Litestar validates (a violation is a
  400 naming the field, see :mod:`tuneloop.server.errors`). Unlike the chat
  and completions bodies it forbids unknown fields: the Responses API has many
  parameters this server does not implement (``reasoning``, ``top_logprobs``,
  ``conversation``, ...), and a client that sends one gets a 400 naming it
  instead of an answer that silently ignored it. Fields that are declared but
  only partly supported (``tools``, ``tool_choice``,
  ``previous_response_id``, ``include``, ``background``) are refused by
  :class:`tuneloop.server.responses_serving.ResponsesServing` with a 400
  naming them.
* ``input`` is a string (one user message) or a list of message items
  ``{"role", "content"}`` (``type: "message"`` optional; items copied from a
  previous response's ``output`` are accepted, their ``id`` / ``status``
  ignored) whose ``content`` is a string or a list of ``input_text`` /
  ``output_text`` parts. Other item types (function calls, images, files,
  item references) are a 400 naming ``input``.
* :class:`ResponseObject` is OpenAI's ``response`` object with one
  assistant ``message`` output item holding one ``output_text`` part; every
  field the ``openai`` SDK requires is present. The streaming events are
  the ``*Event`` structs, each with ``type`` and ``sequence_number``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import Meta

from tuneloop.server.protocol import ModelName, PositiveInt, Temperature, TopP, UserName

MetadataKey = Annotated[str, Meta(max_length=64)]
MetadataValue = Annotated[str, Meta(max_length=512)]
Metadata = Annotated[
    dict[MetadataKey, MetadataValue], Meta(max_length=16, description="up to 16 string pairs, echoed back")
]


# -- request ---------------------------------------------------------------------------


class InputTextPart(msgspec.Struct, tag="input_text", tag_field="type", forbid_unknown_fields=True):
    text: str


class OutputTextPartIn(msgspec.Struct, tag="output_text", tag_field="type", forbid_unknown_fields=True):
    """An ``output_text`` part of an assistant turn (as a previous response's ``output`` holds it)."""

    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class InputMessage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One conversation turn of ``input``."""

    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputTextPart | OutputTextPartIn]
    type: Literal["message"] = "message"
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None


class TextFormat(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``text.format``: ``text`` (default), ``json_object``, or ``json_schema`` (``name`` and ``schema``
    required), enforced by vLLM's structured outputs as on chat completions."""

    #: for the OpenAPI document (:func:`tuneloop.server.app.document_api`): json_schema needs name and schema
    json_schema_extra: ClassVar[dict[str, Any]] = {
        "if": {"properties": {"type": {"const": "json_schema"}}, "required": ["type"]},
        "then": {
            "required": ["name", "schema"],
            "properties": {"name": {"type": "string"}, "schema": {"type": "object"}},
        },
    }

    type: Literal["text", "json_schema", "json_object"] = "text"
    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesStreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    include_obfuscation: bool | None = None


class ResponsesRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/responses``; see module docstring."""

    #: for the OpenAPI document (:func:`tuneloop.server.app.document_api`): the declared parameters the server
    #: refuses unless empty or off (400 ``unsupported_parameter`` naming them)
    json_schema_extra: ClassVar[dict[str, Any]] = {
        "properties": {
            "previous_response_id": {
                "type": "null",
                "description": "refused: this server keeps no responses to chain; send the whole `input`",
            },
            "tools": {
                "anyOf": [{"type": "array", "maxItems": 0}, {"type": "null"}],
                "description": "must be empty: no tool calling",
            },
            "tool_choice": {"enum": ["auto", "none", None], "description": '"auto" or "none" (there are no tools)'},
            "include": {"anyOf": [{"type": "array", "maxItems": 0}, {"type": "null"}], "description": "must be empty"},
            "background": {"enum": [False, None], "description": "must be false"},
        }
    }

    model: ModelName
    input: str | Annotated[list[InputMessage], Meta(min_length=1)]
    instructions: Annotated[str | None, Meta(description="sent to the model as a system message before `input`")] = None
    max_output_tokens: Annotated[
        PositiveInt | None, Meta(description="cap on generated tokens (default: the rest of the context)")
    ] = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stream: bool = False
    stream_options: ResponsesStreamOptions | None = None
    user: UserName | None = None
    metadata: Metadata | None = None
    previous_response_id: Annotated[
        str | None, Meta(description="refused: this server keeps no responses to chain; send the whole `input`")
    ] = None
    store: Annotated[bool | None, Meta(description="accepted; responses are never stored for retrieval")] = None
    text: TextConfig | None = None
    tools: Annotated[list[dict[str, Any]] | None, Meta(description="must be empty: no tool calling")] = None
    tool_choice: Annotated[str | dict[str, Any] | None, Meta(description='"auto" or "none" (there are no tools)')] = (
        None
    )
    parallel_tool_calls: bool | None = None
    max_tool_calls: PositiveInt | None = None
    truncation: Annotated[
        Literal["auto", "disabled"] | None,
        Meta(description='"auto": drop the oldest input turns until the prompt fits the context'),
    ] = None
    include: Annotated[list[str] | None, Meta(description="must be empty")] = None
    background: Annotated[bool | None, Meta(description="must be false")] = None


# -- response ---------------------------------------------------------------------------

ItemStatus = Literal["in_progress", "completed", "incomplete"]
ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed"]


class OutputText(msgspec.Struct, kw_only=True):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = msgspec.field(default_factory=list)
    logprobs: list[Any] = msgspec.field(default_factory=list)


class OutputMessage(msgspec.Struct, kw_only=True):
    type: Literal["message"] = "message"
    id: str
    status: ItemStatus
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class InputTokensDetails(msgspec.Struct):
    cached_tokens: int = 0


class OutputTokensDetails(msgspec.Struct):
    reasoning_tokens: int = 0


class ResponseUsage(msgspec.Struct, kw_only=True):
    input_tokens: int
    input_tokens_details: InputTokensDetails = msgspec.field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = msgspec.field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(msgspec.Struct):
    reason: Literal["max_output_tokens", "content_filter"]


class FormatText(msgspec.Struct, omit_defaults=True):
    """The ``text.format`` a response was generated under (echoes the request's)."""

    type: Literal["text", "json_schema", "json_object"]
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextConfigOut(msgspec.Struct):
    format: FormatText = msgspec.field(default_factory=lambda: FormatText("text"))


class ResponseObject(msgspec.Struct, kw_only=True):
    """OpenAI's ``response`` object (what ``client.responses.create`` parses)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    completed_at: int | None = None
    error: Any = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputMessage]
    parallel_tool_calls: bool = True
    previous_response_id: None = None
    temperature: float | None = None
    text: TextConfigOut = msgspec.field(default_factory=TextConfigOut)
    tool_choice: str = "auto"
    tools: list[Any] = msgspec.field(default_factory=list)
    top_p: float | None = None
    truncation: str = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    store: bool = False
    background: bool = False


# -- streaming events --------------------------------------------------------------------


class ResponseLifecycleEvent(msgspec.Struct, kw_only=True):
    """``response.created`` / ``.in_progress`` / ``.completed`` / ``.incomplete``."""

    type: str
    sequence_number: int
    response: ResponseObject


class OutputItemEvent(msgspec.Struct, kw_only=True):
    """``response.output_item.added`` / ``.done``."""

    type: str
    sequence_number: int
    output_index: int
    item: OutputMessage


class ContentPartEvent(msgspec.Struct, kw_only=True):
    """``response.content_part.added`` / ``.done``."""

    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class TextDeltaEvent(msgspec.Struct, kw_only=True):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = msgspec.field(default_factory=list)


class TextDoneEvent(msgspec.Struct, kw_only=True):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = msgspec.field(default_factory=list)


class ErrorEvent(msgspec.Struct, kw_only=True):
    """An engine error mid-stream (OpenAI's ``error`` event)."""

    type: Literal["error"] = "error"
    sequence_number: int
    code: str | None
    message: str
    param: str | None
