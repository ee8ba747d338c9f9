"""One chat rendering for training and serving: the trainer and the server tokenize a conversation identically.

Contract
--------
* :func:`render_prompt` — the token ids of a conversation *prompt* exactly as
  the server feeds it to the engine: the tokenizer's chat template over the
  messages with the generation prompt added (``<|im_start|>assistant\\n`` for
  ChatML). The server calls this; so does the trainer. ``tools`` (OpenAI
  function definitions) go to the template's ``tools`` variable, and the
  assistant's ``tool_calls`` arguments are handed to the template as objects
  (:func:`template_messages`), as Hugging Face tool-calling templates expect;
  a template that does not use ``tools`` renders the messages alone.
* :func:`completion_ids` — the tokens the model must emit for an answer: the
  answer's tokens followed by the end-of-turn token (the tokenizer's EOS,
  ``<|im_end|>`` for ChatML), so a trained model learns to stop.
* :func:`training_example` — ``{"input_ids", "completion_mask"}`` for one
  conversation whose last message is the assistant's answer:
  ``render_prompt(messages[:-1]) + completion_ids(answer)``, loss only on the
  completion (mask 1), truncated to ``max_length`` by dropping the oldest prompt
  tokens (the answer and its EOS are kept whole when they fit).
Bad conversations (empty, last message not from the assistant) raise
:class:`~tuneloop.errors.UserError`.
"""

from __future__ import annotations

import json
from typing import Any

from tuneloop.errors import UserError

# a Hugging Face tokenizer with a chat template, or an engine's wrapper of one (vLLM's)
Tokenizer = Any


def _ids(out: Any) -> list[int]:
    if hasattr(out, "keys") and "input_ids" in out:  # BatchEncoding
        out = out["input_ids"]
    return [int(t) for t in out]


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` as chat templates expect them: a missing ``content`` is ``""`` and tool-call
    ``arguments`` (a JSON string on the wire) are objects."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("content") is None:
            m["content"] = ""
        calls = m.get("tool_calls")
        if calls:
            m["tool_calls"] = [_template_call(c) for c in calls]
        out.append(m)
    return out


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    fn = dict(call.get("function") or {})
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            fn["arguments"] = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            pass  # a template that prints it verbatim still works
    return {**call, "function": fn}


def render_prompt(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template plus (unless ``add_generation_prompt`` is
    false, as ``/tokenize`` may ask) the generation prompt."""
    if not messages:
        raise UserError("a conversation needs at least one message")
    kw: dict[str, Any] = {"tools": tools} if tools else {}
    return _ids(
        tokenizer.apply_chat_template(
            template_messages(messages),
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            return_dict=False,
            **kw,
        )
    )


def completion_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """Tokens of an assistant answer followed by EOS (the end-of-turn token the server stops on)."""
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token; the model could not learn to stop")
    return _ids(tokenizer(text, add_special_tokens=False)["input_ids"]) + [int(tokenizer.eos_token_id)]


def split_answer(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """(prompt messages, answer text) of a training conversation."""
    if not messages or len(messages) < 2:
        raise UserError("a training conversation needs a prompt and an assistant answer")
    last = messages[-1]
    if last.get("role") != "assistant":
        raise UserError(
            f"the last message of a training conversation must be the assistant's, got {last.get('role')!r}"
        )
    keep = ("role", "content", "name", "tool_calls", "tool_call_id")
    return [{k: m[k] for k in keep if k in m} for m in messages[:-1]], last.get("content") or ""


def training_example(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    max_length: int | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> dict[str, list[int]]:
    """``input_ids`` + ``completion_mask`` of one conversation (see module doc); ``tools`` as in
    :func:`render_prompt` (the definitions the served request carried)."""
    prompt, answer = split_answer(messages)
    p = render_prompt(tokenizer, prompt, tools)
    c = completion_ids(tokenizer, answer)
    if max_length is not None and len(p) + len(c) > max_length:
        if max_length < 2:
            raise UserError(f"max_length must be at least 2, got {max_length}")
        if len(c) >= max_length:  # keep the last prompt token (assistant header) and the EOS
            c = c[: max_length - 2] + [c[-1]]
            p = p[-1:]
        else:
            p = p[len(p) + len(c) - max_length :]
    return {"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)}
