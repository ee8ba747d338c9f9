"""vLLM's tool-calling machinery for one chat request: the constraining schema and the parsers.

Contract
--------
This module is part of the engine wrapper (with :mod:`tuneloop.server.engine`):
it is the only other server module that imports vLLM, and only inside
functions. It does not re-implement tool calling; it drives vLLM's:

* :func:`choose_parser` maps a model to a vLLM tool parser name:
  ``server.tool_parser`` when set, else by model family from the chat
  template (``<tool_call>`` or ChatML -> ``hermes``, ``<|python_tag|>`` ->
  ``llama3_json``, ``[TOOL_CALLS]`` -> ``mistral``), else none.
  :func:`parser_names` lists what the installed vLLM registers.
* :class:`ToolCalling` wraps one request's ``tools`` / ``tool_choice`` /
  ``parallel_tool_calls`` (OpenAI dicts):

  - :meth:`ToolCalling.schema` is the JSON schema the output must follow
    (vLLM's ``get_json_schema_from_tools``): for ``required``, an array of
    ``{"name", "parameters"}`` objects (at most one item when
    ``parallel_tool_calls`` is false); for a named function, that function's
    parameters. ``none`` and ``auto`` do not constrain the output.
  - :meth:`ToolCalling.parse` turns a finished answer into
    ``(content, tool_calls)`` with tool calls in OpenAI's shape (``id``,
    ``type: function``, ``function: {name, arguments}`` where ``arguments``
    is a JSON string): the JSON of ``required`` / named choices is read
    directly (as vLLM's server does), and ``auto`` goes through the vLLM tool
    parser chosen for the model.
  - :meth:`ToolCalling.stream` turns one streamed text delta into OpenAI
    chunk pieces ``(content, tool_call_deltas)``: a named function streams
    its arguments as they are generated; ``auto`` streams through the
    parser's ``extract_tool_calls_streaming``; ``required`` holds the text
    back and sends each call whole when the answer ends (the array can only
    be split into calls once it is complete).
"""

from __future__ import annotations

import json
import secrets
from typing import Any

#: chat-template marker -> vLLM tool parser, checked in order
FAMILY_PARSERS: tuple[tuple[str, str], ...] = (
    ("<tool_call>", "hermes"),
    ("<|python_tag|>", "llama3_json"),
    ("[TOOL_CALLS]", "mistral"),
    ("<|im_start|>", "hermes"),  # ChatML models without their own tool format: Hermes/Qwen style
)


def parser_names() -> list[str]:
    """Tool parser names the installed vLLM registers."""
    from vllm.tool_parsers import ToolParserManager

    return sorted(ToolParserManager.list_registered())


def choose_parser(setting: str, chat_template: str | None) -> str | None:
    """The tool parser for a model: ``setting`` unless ``auto``/empty, else by the chat template's family."""
    if setting and setting not in ("auto",):
        return None if setting == "none" else setting
    template = chat_template or ""
    for marker, name in FAMILY_PARSERS:
        if marker in template:
            return name
    return None


def new_call_id() -> str:
    """An OpenAI-style tool call id."""
    return "call_" + secrets.token_hex(12)


class ToolCalling:
    """Tool calling for one chat request; see module docstring."""

    def __init__(
        self,
        tokenizer: Any,
        tools: list[dict[str, Any]],
        tool_choice: str | dict[str, Any],
        parallel_tool_calls: bool,
        parser_name: str | None,
    ):
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        self.tools, self.tool_choice, self.parallel = tools, tool_choice, parallel_tool_calls
        self.named = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
        self.mode = "named" if self.named else str(tool_choice)
        self._request = ChatCompletionRequest.model_validate(
            {
                "model": "tuneloop",
                "messages": [{"role": "user", "content": ""}],
                "tools": tools,
                "tool_choice": tool_choice,
                "parallel_tool_calls": parallel_tool_calls,
            }
        )
        self._parser: Any = None
        if self.mode == "auto":
            if parser_name is None:
                raise ValueError("no tool parser")
            from vllm.tool_parsers import ToolParserManager

            self._parser = ToolParserManager.get_tool_parser(parser_name)(tokenizer, list(self._request.tools or []))
        # streaming state
        self._text = ""
        self._ids: list[int] = []
        self._named_started = False
        self.streamed_calls = 0

    @property
    def constrains(self) -> bool:
        return self.mode in ("required", "named")

    def schema(self) -> dict[str, Any] | None:
        """The JSON schema that structured outputs must enforce (``required`` / named), else None."""
        from vllm.tool_parsers.utils import get_json_schema_from_tools

        if not self.constrains:
            return None
        req: Any = self._request
        s: Any = get_json_schema_from_tools(req.tool_choice, req.tools, req.parallel_tool_calls)
        return json.loads(s) if isinstance(s, str) else s

    # -- whole answers ---------------------------------------------------------------
    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, tool calls) of a finished answer."""
        if self.mode == "named":
            return None, [_call(str(self.named), text)]
        if self.mode == "required":
            return None, [_call(c["name"], _args(c.get("parameters", {}))) for c in _json_list(text)]
        if self._parser is None:
            return text, []
        info = self._parser.extract_tool_calls(text, self._request)
        if not info.tools_called:
            return text, []
        calls = [
            {"id": c.id or new_call_id(), "type": "function", "function": c.function.model_dump()}
            for c in info.tool_calls
        ]
        return info.content, calls

    # -- streaming ----------------------------------------------------------------
    def stream(self, delta_text: str, delta_ids: list[int], finished: bool) -> tuple[str | None, list[dict[str, Any]]]:
        """OpenAI delta pieces (content, tool-call deltas) for the next streamed text of the answer."""
        prev_text, prev_ids = self._text, self._ids
        self._text, self._ids = prev_text + delta_text, prev_ids + list(delta_ids)
        if self.mode == "named":
            out: list[dict[str, Any]] = []
            if not self._named_started:
                self._named_started = True
                self.streamed_calls = 1
                out.append(
                    {
                        "index": 0,
                        "id": new_call_id(),
                        "type": "function",
                        "function": {"name": self.named, "arguments": ""},
                    }
                )
            if delta_text:
                out.append({"index": 0, "function": {"arguments": delta_text}})
            return None, out
        if self.mode == "required":
            if not finished:
                return None, []
            _, calls = self.parse(self._text)
            self.streamed_calls = len(calls)
            return None, [{"index": i, **c} for i, c in enumerate(calls)]
        if self._parser is None:
            return delta_text, []
        msg = self._parser.extract_tool_calls_streaming(
            prev_text, self._text, delta_text, prev_ids, self._ids, list(delta_ids), self._request
        )
        content, deltas = None, []
        if msg is not None:
            content = msg.content
            for d in msg.tool_calls:
                deltas.append(d.model_dump(exclude_none=True))
        if finished and self._parser.prev_tool_call_arr:
            rest = self._parser.get_remaining_unstreamed_args()
            if rest:
                deltas.append({"index": len(self._parser.prev_tool_call_arr) - 1, "function": {"arguments": rest}})
        self.streamed_calls = len(self._parser.prev_tool_call_arr)
        return content, deltas


def _args(params: Any) -> str:
    return params if isinstance(params, str) else json.dumps(params, ensure_ascii=False)


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def _json_list(text: str) -> list[dict[str, Any]]:
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        return []  # cut off by max_tokens: no complete call
    if not isinstance(calls, list):
        return []
    return [c for c in calls if isinstance(c, dict) and isinstance(c.get("name"), str)]
