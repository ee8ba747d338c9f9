"""Record shapes: detect which one the input has and convert each record to one dataset row.

Contract
--------
* Five shapes (:data:`FORMATS` besides ``auto``): ``chat`` (``messages``),
  ``prompt_completion`` (``prompt`` + ``completion``), ``alpaca``
  (``instruction`` + ``output``, optional ``input`` and ``system``),
  ``preference`` (``prompt`` + ``chosen`` + ``rejected``) and
  ``classification`` (``text`` + ``label``: the class name; a number or a
  boolean is converted to its text).
* :func:`apply_field_map` renames fields in place before detection; a field it
  names that no record has raises :class:`~tuneloop.trainer.data_io.DataError`.
* :func:`detect_format` names the shape from the first record whose fields say
  it (preference before chat before alpaca before prompt_completion before
  classification) and raises
  ``DataError`` listing the fields when none does. A prompt + completion record
  with a true/false ``label`` is an unpaired preference (KTO) row, which this
  preparation does not convert: it raises ``DataError`` rather than train the
  undesirable completions as SFT answers (``tuneloop feedback sample`` writes
  KTO sets).
* :func:`to_row` converts one record to the row schema of
  :mod:`tuneloop.dataset_store` without ``id``: ``{"messages": [...]}`` (SFT,
  ending with the assistant's answer) or ``{"prompt", "chosen", "rejected"}``
  (preference, each a message list) or ``{"text", "label"}`` (classification,
  the label a non-empty string). An unusable record raises
  :class:`InvalidRow` (the caller drops and counts it); a classification
  record whose label is empty or not convertible to text raises
  :class:`LabelError`, which the caller turns into a ``DataError`` naming the
  record (a wrong label is fixed, not silently dropped). ``system`` is prepended
  to conversations (and preference prompts) that have no system message.
* Tool calling (OpenAI shapes): a record may carry ``tools`` (a list of
  ``{"type": "function", "function": {"name", "description"?, "parameters"?}}``,
  or that list as JSON text), kept as the row's ``tools`` so the prompt is
  rendered with them as the server did; messages may be ``tool`` results (a
  ``tool_call_id`` and string content) and assistant turns may carry
  ``tool_calls`` (``[{"id"?, "type": "function", "function": {"name",
  "arguments"}}]``, arguments a JSON text or object; content may then be null).
  The answer (last message) must be the text the model emits, a tool call
  included (e.g. ``<tool_call>{...}</tool_call>``, as ``requests.response``
  logs it). A malformed tool definition, tool call or tool message raises
  :class:`ToolSchemaError` (an :class:`InvalidRow`), which
  :func:`tuneloop.trainer.prepare.prepare_records` turns into a
  ``DataError`` naming the record: such input is fixed, not skipped.
"""

from __future__ import annotations

import json
from typing import Any

from tuneloop.trainer.data_io import DataError, Record

FORMATS = ("auto", "chat", "prompt_completion", "alpaca", "preference", "classification")
ROLES = ("system", "user", "assistant", "tool")
REQUIRED = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "preference": ("prompt", "chosen", "rejected"),
    "classification": ("text", "label"),
}

Messages = list[dict[str, Any]]


_NO_TEXT = (
    "{what} has tool_calls but no content: give the text the model emits for the call as its content "
    "(e.g. <tool_call>{{...}}</tool_call>, what requests.response logs)"
)


class InvalidRow(ValueError):
    """A record that parses but is not a usable example (dropped and counted)."""


class ToolSchemaError(InvalidRow):
    """A malformed ``tools`` definition, tool call or tool message: the input must be fixed (not dropped)."""


class LabelError(InvalidRow):
    """A classification record whose label is empty or cannot be converted to text: fixed, not dropped."""


def apply_field_map(records: list[Record], field_map: dict[str, str]) -> None:
    """Rename fields in place; a field named in the map that no record has is an error."""
    if not field_map:
        return
    present: set[str] = set().union(*(r.data.keys() for r in records)) if records else set()
    missing = [k for k in field_map if k not in present]
    if missing:
        raise DataError(
            f"--field-map names unknown field(s) {', '.join(missing)}; the input has: {', '.join(sorted(present)) or 'no fields'}"
        )
    for r in records:
        r.data = {field_map.get(k, k): v for k, v in r.data.items()}


def detect_format(records: list[Record]) -> str:
    """The record shape shared by the records (from the first one whose fields say it)."""
    for r in records:
        keys = set(r.data)
        if {"prompt", "chosen", "rejected"} <= keys:
            return "preference"
        if "messages" in keys:
            return "chat"
        if {"instruction", "output"} <= keys:
            return "alpaca"
        if {"prompt", "completion"} <= keys:
            if isinstance(r.data.get("label"), bool):
                raise DataError(
                    f"{r.loc}: prompt/completion/label rows are unpaired preference (KTO) data; `tuneloop data "
                    "prepare` would train every completion, the undesirable (label false) ones included, as an SFT "
                    "answer. Drop the label field for SFT, or build a KTO set with `tuneloop feedback sample`"
                )
            return "prompt_completion"
        if {"text", "label"} <= keys:
            return "classification"
    fields = sorted(set().union(*(r.data.keys() for r in records))) if records else []
    raise DataError(
        "cannot detect the record format from the fields "
        + (", ".join(fields) or "(none)")
        + ": expected messages (chat), prompt+completion, instruction+output (alpaca), prompt+chosen+rejected "
        "(preference) or text+label (classification); rename fields with --field-map old=new or name --format"
    )


def _messages(v: Any, what: str, default_role: str) -> Messages:
    if isinstance(v, str):
        return [{"role": default_role, "content": v}]
    if not isinstance(v, list) or not v:
        raise InvalidRow(f"{what} must be a string or a non-empty list of messages")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InvalidRow(f"{what}: every message needs a role ({'/'.join(ROLES)}) and a string content")
        calls = m.get("tool_calls")
        if calls is not None and calls != []:
            if m["role"] != "assistant":
                raise ToolSchemaError(f"{what}[{i}]: only assistant messages carry tool_calls, not {m['role']!r}")
            msg: dict[str, Any] = {"role": "assistant", "content": m.get("content")}
            if msg["content"] is not None and not isinstance(msg["content"], str):
                raise InvalidRow(f"{what}[{i}]: content must be a string (or null next to tool_calls)")
            msg["tool_calls"] = [_tool_call(c, f"{what}[{i}].tool_calls[{j}]") for j, c in enumerate(_list(calls))]
        elif not isinstance(m.get("content"), str):
            raise InvalidRow(f"{what}: every message needs a role ({'/'.join(ROLES)}) and a string content")
        else:
            msg = {"role": m["role"], "content": m["content"]}
        call_id = m.get("tool_call_id")
        if m["role"] == "tool":
            if not isinstance(call_id, str) or not call_id:
                raise ToolSchemaError(
                    f"{what}[{i}]: a tool message needs a tool_call_id (the id of the call it answers)"
                )
            msg["tool_call_id"] = call_id
        elif call_id is not None:
            raise ToolSchemaError(f"{what}[{i}]: only tool messages carry tool_call_id, not {m['role']!r}")
        if m.get("name") is not None:
            if not isinstance(m["name"], str):
                raise InvalidRow(f"{what}[{i}]: name must be a string")
            msg["name"] = m["name"]
        out.append(msg)
    return out


def _list(v: Any) -> list[Any]:
    if not isinstance(v, list):
        raise ToolSchemaError(f"expected a list, got {type(v).__name__}")
    return v


def _tool_call(c: Any, where: str) -> dict[str, Any]:
    """One OpenAI tool call, ``arguments`` as JSON text."""
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ToolSchemaError(f'{where}: a tool call is {{"type": "function", "function": {{"name", "arguments"}}}}')
    if c.get("type", "function") not in ("function", None):
        raise ToolSchemaError(f"{where}: type must be 'function', got {c['type']!r}")
    if c.get("id") is not None and not isinstance(c["id"], str):
        raise ToolSchemaError(f"{where}: id must be a string")
    args = fn.get("arguments")
    if args is None:
        args = "{}"
    elif isinstance(args, dict):
        args = json.dumps(args, ensure_ascii=False)
    elif isinstance(args, str):
        try:
            json.loads(args)
        except ValueError:
            raise ToolSchemaError(f"{where}: arguments must be JSON (text or an object), got {args[:60]!r}") from None
    else:
        raise ToolSchemaError(f"{where}: arguments must be JSON (text or an object), got {type(args).__name__}")
    out: dict[str, Any] = {"id": c.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}}
    if out["id"] is None:
        del out["id"]
    return out


def parse_tools(v: Any) -> list[dict[str, Any]] | None:
    """A record's ``tools``: OpenAI function definitions (a list, or the list as JSON text); None when absent
    or empty. Raises :class:`ToolSchemaError` on anything else."""
    if v is None or v == "" or v == []:
        return None
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError as e:
            raise ToolSchemaError(f"tools is not valid JSON ({e})") from None
        if v is None or v == []:
            return None
    if not isinstance(v, list):
        raise ToolSchemaError(f"tools must be a list of function definitions, got {type(v).__name__}")
    names: set[str] = set()
    for i, t in enumerate(v):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise ToolSchemaError(
                f'tools[{i}] must be {{"type": "function", "function": {{"name", "description", "parameters"}}}}'
            )
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ToolSchemaError(f"tools[{i}].function.name must be a non-empty string")
        if name in names:
            raise ToolSchemaError(f"tools[{i}]: function {name!r} is defined twice")
        names.add(name)
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise ToolSchemaError(f"tools[{i}].function.parameters must be a JSON schema object")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise ToolSchemaError(f"tools[{i}].function.description must be a string")
    return v


def to_row(fmt: str, data: dict[str, Any], system: str | None = None) -> dict[str, Any]:
    """One record as a dataset row (without id); raises :class:`InvalidRow`."""
    if fmt == "classification":
        return classification_row(data)
    missing = [k for k in REQUIRED[fmt] if data.get(k) in (None, "")]
    if missing:
        raise InvalidRow(f"missing {', '.join(missing)}")
    tools = parse_tools(data.get("tools"))
    row = _to_row(fmt, data, system)
    if tools:
        row["tools"] = tools
    return row


def _to_row(fmt: str, data: dict[str, Any], system: str | None) -> dict[str, Any]:
    if fmt == "preference":
        prompt = _messages(data["prompt"], "prompt", "user")
        chosen = _messages(data["chosen"], "chosen", "assistant")
        rejected = _messages(data["rejected"], "rejected", "assistant")
        if prompt[-1]["role"] not in ("user", "tool"):
            raise InvalidRow("the prompt must end with a user (or tool result) message")
        if any(m["role"] != "assistant" for m in chosen + rejected):
            raise InvalidRow("chosen and rejected must be assistant messages")
        if any(not isinstance(m["content"], str) for m in chosen + rejected):
            raise ToolSchemaError(_NO_TEXT.format(what="a chosen or rejected answer"))
        return {"prompt": _with_system(prompt, system), "chosen": chosen, "rejected": rejected}
    if fmt == "chat":
        msgs = _messages(data["messages"], "messages", "user")
    elif fmt == "prompt_completion":
        msgs = _messages(data["prompt"], "prompt", "user") + _messages(data["completion"], "completion", "assistant")
    else:  # alpaca
        inp = data.get("input")
        user = str(data["instruction"]) + (f"\n\n{inp}" if isinstance(inp, str) and inp.strip() else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": str(data["output"])}]
        if isinstance(data.get("system"), str) and data["system"].strip():
            msgs.insert(0, {"role": "system", "content": data["system"]})
    if msgs[-1]["role"] != "assistant":
        raise InvalidRow("the last message must be the assistant's answer")
    if not isinstance(msgs[-1]["content"], str):
        raise ToolSchemaError(_NO_TEXT.format(what="the answer (last message)"))
    if not any(m["role"] == "user" for m in msgs):
        raise InvalidRow("no user message")
    return {"messages": _with_system(msgs, system)}


def label_text(v: Any) -> str:
    """A class label as text: a string (stripped), an integer, a whole float (``1.0`` -> ``"1"``) or a boolean
    (``"true"``/``"false"``); raises :class:`LabelError` for anything else or an empty label."""
    if isinstance(v, bool):
        out = "true" if v else "false"
    elif isinstance(v, int):
        out = str(v)
    elif isinstance(v, float) and v.is_integer():
        out = str(int(v))
    elif isinstance(v, float) and v == v:  # not NaN
        out = repr(v)
    elif isinstance(v, str):
        out = v.strip()
    else:
        raise LabelError(f"label must be a string (the class name), got {type(v).__name__} {v!r}"[:200])
    if not out:
        raise LabelError("label is empty: every text needs its class name")
    return out


def classification_row(data: dict[str, Any]) -> dict[str, Any]:
    """``{"text", "label"}`` of a classification record (see module doc)."""
    label = label_text(data.get("label"))
    text = data.get("text")
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str) or not text:  # whitespace-only text is dropped (and counted) as empty
        raise InvalidRow("missing text")
    return {"text": text, "label": label}


def _with_system(msgs: Messages, system: str | None) -> Messages:
    if system and msgs[0]["role"] != "system":
        return [{"role": "system", "content": system}, *msgs]
    return msgs


def all_messages(row: dict[str, Any]) -> Messages:
    """Every message of a row: the conversation (SFT), prompt + chosen + rejected (preference), prompt + completion
    (kto) or the text as one user message (classification)."""
    if "text" in row and "messages" not in row and "prompt" not in row:
        return [{"role": "user", "content": row["text"]}]
    if "messages" in row:
        return row["messages"]
    if "completion" in row:
        return row["prompt"] + row["completion"]
    return row["prompt"] + row["chosen"] + row["rejected"]
