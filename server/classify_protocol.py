"""Bodies of ``POST /v1/classify``: vLLM's classification request and response shape, as msgspec structs.

Contract: :class:`ClassificationRequest` accepts the fields of vLLM's
``ClassificationCompletionRequest`` (vllm/entrypoints/pooling/classify/protocol.py)
that this server honours: ``model``, ``input`` (a string, a list of strings, a
list of token ids or a list of token-id lists), ``user``,
``truncate_prompt_tokens`` (-1 = the context length), ``truncation_side``,
``add_special_tokens`` and ``use_activation``. Like every request body here it
forbids unknown fields, so vLLM's other extras (``priority``, ``padding``,
``request_id``, ``cache_salt``, ``mm_processor_kwargs``, the chat form with
``messages``) are a 400 ``unsupported_parameter`` naming the field.
:class:`ClassificationResponse` is vLLM's response: ``id``, ``object`` ``"list"``,
``created``, ``model``, ``data`` [``{index, label, probs, num_classes}``] and
``usage`` (``prompt_tokens``, ``total_tokens``, ``completion_tokens`` 0).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import Meta

from tuneloop.server.protocol import TOKEN_ID_SCHEMA, ModelName, TokenId, UserName

#: most inputs in one classify request
MAX_INPUTS = 256

#: msgspec allows one array type in a union: the list forms (texts, token ids, token-id lists, not mixed; at most
#: MAX_INPUTS inputs) are checked by the server after decoding (:func:`tuneloop.server.classify_routes.inputs`)
ClassifyInput = (
    Annotated[str, Meta(min_length=1)]
    | Annotated[
        list[Annotated[str, Meta(min_length=1)] | TokenId | Annotated[list[TokenId], Meta(min_length=1)]],
        Meta(min_length=1, max_length=8192),
    ]
)


class ClassificationRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/classify``: classify one input or a batch (vLLM's request shape)."""

    #: the server refuses after decoding (400 ``invalid_input``): a list mixing texts and token ids
    json_schema_extra: ClassVar[dict[str, Any]] = {
        "properties": {
            "input": {
                "description": f"a string, a list of strings (at most {MAX_INPUTS}), a list of token ids, or a list "
                f"of token-id lists (at most {MAX_INPUTS}); never empty",
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {
                        "type": "array",
                        "items": {"type": "string", "minLength": 1},
                        "minItems": 1,
                        "maxItems": MAX_INPUTS,
                    },
                    {"type": "array", "items": TOKEN_ID_SCHEMA, "minItems": 1, "maxItems": 8192},
                    {
                        "type": "array",
                        "items": {"type": "array", "items": TOKEN_ID_SCHEMA, "minItems": 1},
                        "minItems": 1,
                        "maxItems": MAX_INPUTS,
                    },
                ],
            }
        }
    }

    input: ClassifyInput
    model: ModelName | None = None
    user: UserName | None = None
    truncate_prompt_tokens: Annotated[int, Meta(ge=-1)] | None = None
    truncation_side: Literal["left", "right"] | None = None
    add_special_tokens: bool = True
    use_activation: bool | None = None


class ClassificationData(msgspec.Struct):
    index: int
    label: str | None
    probs: list[float]
    num_classes: int


class ClassificationUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class ClassificationResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    data: list[ClassificationData]
    usage: ClassificationUsage
    object: Literal["list"] = "list"
