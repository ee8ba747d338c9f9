"""Record shapes: detect which one the input has and convert each record to one dataset row.

Contract
--------
* Four shapes (:data:`FORMATS` besides ``auto``): ``chat`` (``messages``),
  ``prompt_completion`` (``prompt`` + ``completion``), ``alpaca``
  (``instruction`` + ``output``, optional ``input`` and ``system``) and
  ``preference`` (``prompt`` + ``chosen`` + ``rejected``).
* :func:`apply_field_map` renames fields in place before detection; a field it
  names that no record has raises :class:`~tuneloop.trainer.data_io.DataError`.
* :func:`detect_format` names the shape from the first record whose fields say
  it (preference before chat before alpaca before prompt_completion) and raises
  ``DataError`` listing the fields when none does. A prompt + completion record
  with a true/false ``label`` is an unpaired preference (KTO) row, which this
  preparation does not convert: it raises ``DataError`` rather than train the
  undesirable completions as SFT answers (``tuneloop feedback sample`` writes
  KTO sets).
* :func:`to_row` converts one record to the row schema of
  :mod:`tuneloop.dataset_store` without ``id``: ``{"messages": [...]}`` (SFT,
  ending with the assistant's answer) or ``{"prompt", "chosen", "rejected"}``
  (preference, each a message list). An unusable record raises
  :class:`InvalidRow` (the caller drops and counts it). ``system`` is prepended
  to conversations (and preference prompts) that have no system message.
"""

from __future__ import annotations

from typing import Any

from tuneloop.trainer.data_io import DataError, Record

FORMATS = ("auto", "chat", "prompt_completion", "alpaca", "preference")
ROLES = ("system", "user", "assistant")
REQUIRED = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "preference": ("prompt", "chosen", "rejected"),
}

Messages = list[dict[str, str]]


class InvalidRow(ValueError):
    """A record that parses but is not a usable example (dropped and counted)."""


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
    fields = sorted(set().union(*(r.data.keys() for r in records))) if records else []
    raise DataError(
        "cannot detect the record format from the fields "
        + (", ".join(fields) or "(none)")
        + ": expected messages (chat), prompt+completion, instruction+output (alpaca) or prompt+chosen+rejected "
        "(preference); rename fields with --field-map old=new or name --format"
    )


def _messages(v: Any, what: str, default_role: str) -> Messages:
    if isinstance(v, str):
        return [{"role": default_role, "content": v}]
    if not isinstance(v, list) or not v:
        raise InvalidRow(f"{what} must be a string or a non-empty list of messages")
    out = []
    for m in v:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise InvalidRow(f"{what}: every message needs a role ({'/'.join(ROLES)}) and a string content")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def to_row(fmt: str, data: dict[str, Any], system: str | None = None) -> dict[str, Any]:
    """One record as a dataset row (without id); raises :class:`InvalidRow`."""
    missing = [k for k in REQUIRED[fmt] if data.get(k) in (None, "")]
    if missing:
        raise InvalidRow(f"missing {', '.join(missing)}")
    if fmt == "preference":
        prompt = _messages(data["prompt"], "prompt", "user")
        chosen = _messages(data["chosen"], "chosen", "assistant")
        rejected = _messages(data["rejected"], "rejected", "assistant")
        if prompt[-1]["role"] != "user":
            raise InvalidRow("the prompt must end with a user message")
        if any(m["role"] != "assistant" for m in chosen + rejected):
            raise InvalidRow("chosen and rejected must be assistant messages")
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
    if not any(m["role"] == "user" for m in msgs):
        raise InvalidRow("no user message")
    return {"messages": _with_system(msgs, system)}


def _with_system(msgs: Messages, system: str | None) -> Messages:
    if system and msgs[0]["role"] != "system":
        return [{"role": "system", "content": system}, *msgs]
    return msgs


def all_messages(row: dict[str, Any]) -> Messages:
    """Every message of a row: the conversation (SFT), prompt + chosen + rejected (preference) or prompt + completion (kto)."""
    if "messages" in row:
        return row["messages"]
    if "completion" in row:
        return row["prompt"] + row["completion"]
    return row["prompt"] + row["chosen"] + row["rejected"]
