"""Cleaning steps over converted rows: whitespace, PII scrub, duplicates, token length.

Contract
--------
Each step takes rows in the schema of :func:`tuneloop.trainer.data_formats.to_row`
(plus a parallel list of strata where rows are dropped) and returns the rows
it keeps, in order, together with what it counted; the caller records the
counts in the data card. No step reads files or touches the database.

* :func:`normalise_row` unifies line ends, collapses runs of spaces, keeps at
  most one blank line and strips every message (and a classification row's
  ``text``); :func:`has_empty_turn` tells
  rows whose user/assistant message is then empty (an assistant turn holding
  tool calls is not). Tool-call arguments, tool call ids and a row's ``tools``
  are left as they are.
* :func:`scrub_rows` replaces emails, phone numbers, Luhn-valid card numbers
  and IPs with placeholders (:func:`tuneloop.pii.scrub`) in message contents
  and tool-call arguments (a classification row: its ``text``), and counts them.
* :func:`dedup_rows` drops exact duplicates (same cleaned row) and, optionally,
  near duplicates (same text after lowercasing, removing punctuation and
  collapsing whitespace); the first occurrence wins. Classification rows are
  duplicates when their ``text`` is (whatever their labels: the first label wins).
* :func:`token_lengths` measures each row rendered with the tokenizer's chat
  template, with the row's ``tools`` as the server renders them (preference
  rows: prompt + the longer answer; classification rows: the raw ``text``,
  no template, no special tokens);
  :func:`length_filter` drops rows outside ``[min_tokens, max_tokens]``.
* :func:`load_tokenizer` loads a base model's tokenizer and (unless
  ``chat_template=False``: classification needs none) requires a chat
  template (:func:`require_chat_template`); failures are
  :class:`~tuneloop.trainer.data_io.DataError`.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneloop.chat import Tokenizer, template_messages
from tuneloop.trainer.data_formats import all_messages
from tuneloop.trainer.data_io import DataError

Row = dict[str, Any]

_WS = re.compile(r"[ \t\f\v\u00a0\u2000-\u200b\u3000]+")
_NL = re.compile(r"\n{3,}")
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}\u2018\u2019\u201c\u201d\u2026\u2013\u2014]")


def normalise_text(s: str) -> str:
    """Unify line ends, collapse runs of spaces, at most one blank line, strip."""
    s = s.replace("\r\n", "\n").replace("\r", "\n")
    s = "\n".join(_WS.sub(" ", line).strip() for line in s.split("\n"))
    return _NL.sub("\n\n", s).strip()


MESSAGE_FIELDS = ("messages", "prompt", "chosen", "rejected", "completion")


def map_contents(row: Row, fn: Callable[[str], str], arguments: bool = False) -> Row:
    """``row`` with ``fn`` applied to the content of every message (and, if ``arguments``, to the
    arguments of its tool calls); other fields and message keys are kept."""

    def one(m: dict[str, Any]) -> dict[str, Any]:
        out = dict(m, content=fn(m["content"]) if isinstance(m.get("content"), str) else m.get("content"))
        if arguments and m.get("tool_calls"):
            out["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": fn(c["function"]["arguments"])}}
                for c in m["tool_calls"]
            ]
        return out

    return {
        k: [one(m) for m in v] if k in MESSAGE_FIELDS else fn(v) if k == "text" and isinstance(v, str) else v
        for k, v in row.items()
    }


def normalise_row(row: Row) -> Row:
    """``row`` with every message's text normalised (:func:`normalise_text`)."""
    return map_contents(row, normalise_text)


def has_empty_turn(row: Row) -> bool:
    """Whether a user or assistant message of ``row`` has no text (an assistant's tool calls count as text)."""
    return any(
        not m.get("content") and not m.get("tool_calls")
        for m in all_messages(row)
        if m["role"] in ("user", "assistant")
    )


def scrub_rows(rows: list[Row]) -> tuple[list[Row], int, dict[str, int]]:
    """PII-scrubbed rows, how many rows changed, and counts per PII kind."""
    from tuneloop.pii import add_counts, scrub

    out: list[Row] = []
    rows_scrubbed = 0
    pii: dict[str, int] = {}
    for row in rows:
        found: dict[str, int] = {}

        def fn(text: str) -> str:
            clean, c = scrub(text)
            add_counts(found, c)  # noqa: B023
            return clean

        out.append(map_contents(row, fn, arguments=True))
        rows_scrubbed += bool(found)
        add_counts(pii, found)
    return out, rows_scrubbed, pii


def exact_key(row: Row) -> str:
    """Hash of the row's canonical JSON (also the source of row ids)."""
    return hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def near_key(row: Row) -> str:
    """Hash of the conversation lowercased, without punctuation, whitespace collapsed (tool calls, tool
    call ids and the row's tools count as they are)."""
    parts = []
    for m in all_messages(row):
        t = _PUNCT.sub(" ", (m.get("content") or "").lower())
        part = m["role"] + ":" + " ".join(t.split())
        if m.get("tool_calls") or m.get("tool_call_id"):
            part += "\x1f" + json.dumps([m.get("tool_calls"), m.get("tool_call_id")], sort_keys=True)
        parts.append(part)
    if row.get("tools"):
        parts.append(json.dumps(row["tools"], sort_keys=True))
    return hashlib.sha256("\x1e".join(parts).encode()).hexdigest()


def dedup_rows(rows: list[Row], strata: list[Any], near: bool) -> tuple[list[Row], list[Any], int, int]:
    """Rows and strata without exact (and, if ``near``, near) duplicates, plus both counts."""
    seen_exact: set[str] = set()
    seen_near: set[str] = set()
    kept: list[Row] = []
    kept_strata: list[Any] = []
    n_exact = n_near = 0
    for row, st in zip(rows, strata):
        ek = exact_key({"text": row["text"]} if "text" in row else row)
        if ek in seen_exact:
            n_exact += 1
            continue
        seen_exact.add(ek)
        if near:
            nk = near_key(row)
            if nk in seen_near:
                n_near += 1
                continue
            seen_near.add(nk)
        kept.append(row)
        kept_strata.append(st)
    return kept, kept_strata, n_exact, n_near


def load_tokenizer(base_dir: str | Path, chat_template: bool = True) -> Tokenizer:
    """The tokenizer of the model folder ``base_dir``; it must have a chat template unless ``chat_template=False``."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(base_dir))
    except (OSError, ValueError) as e:
        raise DataError(
            f"cannot load the tokenizer of {base_dir}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    if chat_template:
        require_chat_template(tok, base_dir)
    return tok


def require_chat_template(tok: Tokenizer, base_dir: str | Path) -> None:
    """A DataError unless ``tok`` (the tokenizer of ``base_dir``) has a chat template."""
    if not getattr(tok, "chat_template", None):
        raise DataError(
            f"the tokenizer of {base_dir} has no chat template; pick a chat (instruct) base model with --base"
        )


def token_lengths(tok: Tokenizer, rows: list[Row], progress: bool = False, batch: int = 256) -> list[int]:
    """Tokens of each row rendered with the chat template (preference: prompt + the longer answer; classification:
    the raw text, without template or special tokens)."""
    from tqdm.auto import tqdm

    if rows and all("text" in r and "label" in r for r in rows):
        texts = [r["text"] for r in rows]
        return [
            len(t)
            for s in range(0, len(texts), batch)
            for t in tok(texts[s : s + batch], add_special_tokens=False)["input_ids"]
        ]
    convs: list[tuple[int, list[dict[str, Any]]]] = []
    for i, r in enumerate(rows):
        if "messages" in r:
            convs.append((i, r["messages"]))
        else:
            convs += [(i, r["prompt"] + r["chosen"]), (i, r["prompt"] + r["rejected"])]
    out = [0] * len(rows)
    bar = tqdm(total=len(convs), desc="tokenize", unit="conv", disable=not progress)
    for s in range(0, len(convs), batch):
        chunk = convs[s : s + batch]
        texts = [_render(tok, c, rows[i].get("tools")) for i, c in chunk]
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        for (i, _), t in zip(chunk, ids):
            out[i] = max(out[i], len(t))
        bar.update(len(chunk))
    bar.close()
    return out


def _render(tok: Tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
    """A conversation as text through the chat template, as :func:`tuneloop.chat.render_prompt` hands it over
    (tool-call arguments as objects, the row's tools; no generation prompt: the answer is included)."""
    kw: dict[str, Any] = {"tools": tools} if tools else {}
    return str(tok.apply_chat_template(template_messages(messages), tokenize=False, **kw))


def length_filter(
    rows: list[Row], strata: list[Any], lengths: list[int], min_tokens: int, max_tokens: int
) -> tuple[list[tuple[Row, Any, int]], int, int]:
    """``(row, stratum, length)`` of the rows within the bounds, plus the too-short and too-long counts."""
    kept: list[tuple[Row, Any, int]] = []
    too_short = too_long = 0
    for row, st, n in zip(rows, strata, lengths):
        if n < min_tokens:
            too_short += 1
            continue
        if n > max_tokens:
            too_long += 1
            continue
        kept.append((row, st, n))
    return kept, too_short, too_long
