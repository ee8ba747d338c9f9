"""Candidates for a training set: logged production requests with their feedback, cleaned.

Contract
--------
* :func:`read_candidates` reads the request log (``requests``) joined with the
  newest ``feedback`` per request in a time window (optionally for one model
  version) through a :class:`~tuneloop.monitoring.sources.LogSource` — the
  database's own tables, or Parquet exports. Its SQL is DuckDB SQL, run on the
  source's DuckDB connection: the file itself, or (database on PostgreSQL) an
  in-memory DuckDB holding copies of the rows (:meth:`tuneloop.db.Database.analytics`),
  so both backends give the same candidates. It
  drops, counting each in ``counts``: errors (HTTP status >= 400), client aborts
  (499), truncated answers (``finish_reason = length``, unless corrected),
  redacted or unreadable prompts, empty answers, and thumbs-down without a
  correction. Ratings are read with :func:`tuneloop.ratings.sentiment`
  (thumbs, or stars: 4-5 positive, 1-2 negative). A thumbs-down response
  without a correction is **never** a candidate, so no SFT set trains on it;
  given a ``negatives`` list, those rows (past every other filter) are put
  there instead, for the KTO set's undesirable examples. It reads chat and
  completion traffic only: ``classify`` requests are never chat candidates.
* :func:`read_classify_candidates` reads the ``classify`` requests the same
  way (same window, version and newest-feedback-per-request rules): the
  input text is the logged ``prompt`` (a JSON string), the predicted label
  ``response``, the confidence the largest of the logged ``scores``. The
  class to train on is the feedback ``label`` when one was given (stored as
  the candidate's ``correction``), else the predicted label of a positively
  rated request. It drops, counting each in ``counts``
  (:data:`CLASSIFY_FILTERS`): errors, aborts, redacted or unreadable inputs,
  rows with no class at all, thumbs-down without a label
  (``negative_feedback``: the prediction was wrong and the right class is
  unknown) and unrated (or 3-star), unlabelled requests (``unrated``: an unconfirmed
  prediction teaches the model nothing but its own mistakes).
* Tool calling: a candidate keeps its prompt messages' ``tool_calls`` /
  ``tool_call_id`` / ``name`` (as :func:`tuneloop.dataset_store.chat_message`
  writes them) and the request's tool definitions (``params.tools``) as
  :attr:`Candidate.tools`; its ``response`` is the raw text the model
  generated (a tool call included), which is what a model must learn to emit.
  Two prompts differing only in tool calls or tool definitions are different
  prompts for every dedup key.
* :func:`scrub_candidates` replaces PII (:func:`tuneloop.pii.scrub`) in every
  prompt message (tool-call arguments included), response and correction, in
  place (``answers=False``: the prompt only, for classify candidates, whose
  answers are class names).
* :func:`dedup_within` keeps one candidate per normalised prompt (corrected >
  positively rated > unrated, then the newest); :func:`earlier_keys` gives the
  normalised prompt + answer keys (:func:`example_key`) of earlier datasets, so
  the caller can drop candidates already trained on (a ``classification``
  row's prompt is its ``text`` as one user message, its answer its
  ``label``).

Nothing here picks, writes or registers; the functions are deterministic for a
given log content, whichever backend holds it (:func:`earlier_keys` reads the
registry with portable SQL and the datasets from disk).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tuneloop.dataset_store import chat_message, row_tools
from tuneloop.db import Database, loads
from tuneloop.monitoring.sources import LogSource, log_source
from tuneloop.ratings import sentiment


@dataclass
class Candidate:
    """One logged request that may become a training row."""

    request_id: str
    received_at: datetime
    model_version: str | None
    messages: list[dict[str, Any]]
    response: str
    correction: str | None
    feedback: str | None  # positive | negative | neutral | None
    tokens: int
    pii: dict[str, int] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None  # the request's tool definitions (params.tools)
    confidence: float | None = None  # classify requests: the largest logged class probability
    label_set: tuple[str, ...] = ()  # classify requests: the classifier's labels (the keys of its scores)

    @property
    def target(self) -> str:
        """The answer to train on: the user's correction when there is one, else the logged response."""
        return self.correction if self.correction else self.response

    @property
    def text(self) -> str:
        """A classify request's input text (its one user message)."""
        return self.messages[0]["content"] or ""

    @property
    def priority(self) -> int:
        """Which duplicate wins: 2 corrected, 1 positively rated, 0 otherwise."""
        return 2 if self.correction else (1 if self.feedback == "positive" else 0)

    def prompt_text(self) -> str:
        """The user messages' text, one per line."""
        return "\n".join(m["content"] for m in self.messages if m.get("role") == "user")


# ---- normalisation and dedup keys ------------------------------------------------------------

_WS = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s<>]")


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed (the dedup key's text)."""
    return _WS.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


def prompt_key(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
    """Hash of the normalised non-assistant-final conversation (role + content; tool calls, tool call ids
    and tool definitions as they are, when there are any)."""
    h = hashlib.sha256()
    for m in messages:
        h.update(f"{m.get('role')}\0{normalise(m.get('content') or '')}\0".encode())
        calls, call_id = m.get("tool_calls") or None, m.get("tool_call_id")
        if calls is not None or call_id is not None:
            h.update(json.dumps([calls, call_id], sort_keys=True).encode() + b"\0")
    if tools:
        h.update(b"tools\0" + json.dumps(tools, sort_keys=True).encode())
    return h.hexdigest()


def example_key(messages: list[dict[str, Any]], answer: str, tools: list[dict[str, Any]] | None = None) -> str:
    """Hash of the normalised prompt (with its tools) and answer (dedup against earlier training sets)."""
    return hashlib.sha256((prompt_key(messages, tools) + "\0" + normalise(answer)).encode()).hexdigest()


# ---- reading ------------------------------------------------------------------------------------

_SQL = """
SELECT r.id, r.received_at, r.route, r.model_version, r.prompt, r.response, r.finish_reason, r.status,
       r.prompt_tokens, r.completion_tokens, r.params, f.correction, f.rating, f.rating_kind
FROM requests r
LEFT JOIN (
    SELECT request_id,
           arg_max(correction, created_at) FILTER (WHERE correction IS NOT NULL AND trim(correction) <> '') AS correction,
           arg_max(rating, created_at) FILTER (WHERE rating IS NOT NULL) AS rating,
           arg_max(rating_kind, created_at) FILTER (WHERE rating IS NOT NULL) AS rating_kind
    FROM feedback GROUP BY request_id
) f ON f.request_id = r.id
WHERE r.received_at >= ? AND r.received_at < ? AND r.route <> 'classify' {version}
ORDER BY r.received_at, r.id
"""

_CLASSIFY_SQL = """
SELECT r.id, r.received_at, r.model_version, r.prompt, r.response, r.status, r.prompt_tokens, r.scores,
       f.label, f.rating, f.rating_kind
FROM requests r
LEFT JOIN (
    SELECT request_id,
           arg_max(label, created_at) FILTER (WHERE label IS NOT NULL AND trim(label) <> '') AS label,
           arg_max(rating, created_at) FILTER (WHERE rating IS NOT NULL) AS rating,
           arg_max(rating_kind, created_at) FILTER (WHERE rating IS NOT NULL) AS rating_kind
    FROM feedback GROUP BY request_id
) f ON f.request_id = r.id
WHERE r.received_at >= ? AND r.received_at < ? AND r.route = 'classify' {version}
ORDER BY r.received_at, r.id
"""

FILTERS = ("error", "aborted", "truncated", "redacted", "empty", "negative_feedback")
"""The ``counts`` keys of :func:`read_candidates`' filters, in the order they apply."""

CLASSIFY_FILTERS = ("error", "aborted", "redacted", "empty", "negative_feedback", "unrated")
"""The ``counts`` keys of :func:`read_classify_candidates`' filters, in the order they apply."""


def prompt_messages(prompt: Any) -> list[dict[str, Any]] | None:
    """The logged ``requests.prompt`` (messages list, ``{"messages": ...}`` or completion text) as chat messages
    (string content, null only next to tool calls; ``name`` / ``tool_calls`` / ``tool_call_id`` kept where set)."""
    p = loads(prompt) if isinstance(prompt, str) else prompt
    if isinstance(p, str):
        try:  # a JSON column can hold a JSON string holding JSON
            p2 = json.loads(p)
            p = p2 if isinstance(p2, (list, dict)) else p
        except ValueError:
            pass
    if isinstance(p, dict):
        p = p.get("messages", p.get("prompt"))
    if isinstance(p, str):
        return [{"role": "user", "content": p}] if p.strip() else None
    if isinstance(p, list) and p and all(isinstance(m, dict) for m in p):
        out = []
        for m in p:
            content = m.get("content")
            if isinstance(content, list):  # OpenAI content parts
                content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
            msg = chat_message({**m, "role": str(m.get("role", "user")), "content": str(content or "")})
            if content is None and msg.get("tool_calls"):
                msg["content"] = None  # an assistant turn that only called tools, as logged
            out.append(msg)
        while out and out[-1]["role"] == "assistant":  # a trailing assistant prefill is not part of the prompt
            out.pop()
        return out or None
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        return [{"role": "user", "content": p[0]}]
    return None


def request_tools(params: Any) -> list[dict[str, Any]] | None:
    """The tool definitions a logged request carried (``requests.params.tools``), None when none."""
    p = loads(params) if isinstance(params, str) else params
    if not isinstance(p, dict):
        return None
    tools = p.get("tools")
    if isinstance(tools, list) and tools and all(isinstance(t, dict) for t in tools):
        return tools
    return None


def read_candidates(
    db: Database | LogSource,
    since: datetime,
    until: datetime,
    model_version: str | None,
    counts: dict[str, int],
    negatives: list[Candidate] | None = None,
    truncated: list[Candidate] | None = None,
) -> list[Candidate]:
    """Requests in the window that survive the filters; ``counts`` gets one entry per filter.

    ``db`` is a :class:`~tuneloop.monitoring.sources.LogSource` (the database's log, or Parquet exports), or a
    database, read through ``log_source(db)``: the query is DuckDB SQL (``arg_max``), run on the source's DuckDB
    connection, which on PostgreSQL holds copies of the rows.
    Uncorrected thumbs-down rows are dropped (counted in ``negative_feedback``); when ``negatives`` is
    given, those that pass every other filter are appended to it (still never returned). Likewise
    ``truncated`` gets the requests dropped as truncated (answer cut at the token limit, no correction) whose
    prompt is readable: prompts a model failed on, which ``tuneloop data synthesize`` has a teacher answer.
    """
    sql = _SQL.format(version="AND r.model_version = ?" if model_version else "")
    params: list[Any] = [since, until] + ([model_version] if model_version else [])
    logs = db if isinstance(db, LogSource) else log_source(db)  # DuckDB SQL: never on a PostgreSQL connection
    # on PostgreSQL only the window's requests (and their feedback) are copied for the query
    rows = logs.query(sql, params, since=since, until=until, model_version=model_version)
    counts["requests_in_window"] = len(rows)
    for k in FILTERS:
        counts.setdefault(k, 0)
    out: list[Candidate] = []
    for r in rows:
        status = int(r["status"])
        correction = (r["correction"] or "").strip() or None
        label = sentiment(r["rating"], r["rating_kind"])
        if status == 499:
            counts["aborted"] += 1
            continue
        if status >= 400:
            counts["error"] += 1
            continue
        msgs = prompt_messages(r["prompt"])
        if r["finish_reason"] == "length" and not correction:
            counts["truncated"] += 1
            if truncated is not None and msgs:
                c = Candidate(r["id"], r["received_at"], r["model_version"], msgs, r["response"] or "", None, label, 0)
                c.tools = request_tools(r["params"])
                truncated.append(c)
            continue
        if not msgs:
            counts["redacted"] += 1
            continue
        response = r["response"] or ""
        if not response.strip() and not correction:
            counts["empty"] += 1
            continue
        tokens = int(r["prompt_tokens"] or 0) + int(r["completion_tokens"] or 0)
        if tokens == 0:
            tokens = (sum(len(m["content"]) for m in msgs) + len(response)) // 4
        c = Candidate(r["id"], r["received_at"], r["model_version"], msgs, response, correction, label, tokens)
        c.tools = request_tools(r["params"])
        if label == "negative" and not correction:
            counts["negative_feedback"] += 1
            if negatives is not None:
                negatives.append(c)
            continue
        out.append(c)
    return out


def classify_text(prompt: Any) -> str | None:
    """The input text of a logged classify request (``requests.prompt``: a JSON string, or a list of one)."""
    p = loads(prompt) if isinstance(prompt, str) else prompt
    if isinstance(p, list) and len(p) == 1:
        p = p[0]
    if isinstance(p, dict):  # {"input": ...} / {"text": ...}
        p = p.get("input", p.get("text"))
    return p if isinstance(p, str) and p.strip() else None


def read_classify_candidates(
    db: Database | LogSource, since: datetime, until: datetime, model_version: str | None, counts: dict[str, int]
) -> list[Candidate]:
    """The ``classify`` requests in the window that have a class to train on (see module doc); ``counts`` gets
    ``requests_in_window`` and one entry per filter of :data:`CLASSIFY_FILTERS`."""
    sql = _CLASSIFY_SQL.format(version="AND r.model_version = ?" if model_version else "")
    params: list[Any] = [since, until] + ([model_version] if model_version else [])
    logs = db if isinstance(db, LogSource) else log_source(db)
    rows = logs.query(sql, params, since=since, until=until, model_version=model_version)
    counts["requests_in_window"] = len(rows)
    for k in CLASSIFY_FILTERS:
        counts.setdefault(k, 0)
    out: list[Candidate] = []
    for r in rows:
        status = int(r["status"])
        if status == 499:
            counts["aborted"] += 1
            continue
        if status >= 400:
            counts["error"] += 1
            continue
        text = classify_text(r["prompt"])
        if text is None:
            counts["redacted"] += 1
            continue
        label = r["label"] or None
        predicted = r["response"] if (r["response"] or "").strip() else None
        if not label and not predicted:
            counts["empty"] += 1
            continue
        rating = sentiment(r["rating"], r["rating_kind"])
        if not label and rating == "negative":
            counts["negative_feedback"] += 1
            continue
        if not label and rating != "positive":
            counts["unrated"] += 1
            continue
        scores = loads(r["scores"]) if isinstance(r["scores"], str) else r["scores"]
        scores = scores if isinstance(scores, dict) and scores else None
        tokens = int(r["prompt_tokens"] or 0) or len(text) // 4
        c = Candidate(
            r["id"],
            r["received_at"],
            r["model_version"],
            [{"role": "user", "content": text}],
            predicted or "",
            label,
            rating,
            tokens,
        )
        if scores:
            c.confidence = float(max(scores.values()))
            c.label_set = tuple(sorted(scores))
        out.append(c)
    return out


# ---- cleaning -----------------------------------------------------------------------------------


def scrub_candidates(cands: list[Candidate], counts: dict[str, int], answers: bool = True) -> None:
    """Scrub PII in place from every prompt message, response and correction (``answers=False``: the prompt
    messages only); add totals to ``counts``."""
    from tuneloop.pii import scrub

    total: dict[str, int] = {}

    def s(text: str, c: Candidate) -> str:
        clean, found = scrub(text)
        for k, v in found.items():
            if v:
                total[k] = total.get(k, 0) + v
                c.pii[k] = c.pii.get(k, 0) + v
        return clean

    def _maybe(text: str | None, c: Candidate) -> str | None:
        return None if text is None else s(text, c)

    def msg(m: dict[str, Any], c: Candidate) -> dict[str, Any]:
        out = dict(m, content=_maybe(m["content"], c))
        if m.get("tool_calls"):
            out["tool_calls"] = [
                {**t, "function": {**t["function"], "arguments": _maybe(t["function"]["arguments"], c)}}
                for t in m["tool_calls"]
            ]
        return out

    for c in cands:
        c.messages = [msg(m, c) for m in c.messages]
        if not answers:
            continue
        c.response = s(c.response, c)
        if c.correction:
            c.correction = s(c.correction, c)
    counts.update({f"pii_{k}": v for k, v in sorted(total.items())})
    counts["rows_with_pii"] = sum(1 for c in cands if c.pii)


def dedup_within(cands: list[Candidate]) -> tuple[list[Candidate], int]:
    """One row per normalised prompt: corrected > positive > unrated, then newest."""
    best: dict[str, Candidate] = {}
    for c in cands:
        k = prompt_key(c.messages, c.tools)
        b = best.get(k)
        if b is None or (c.priority, c.received_at, c.request_id) > (b.priority, b.received_at, b.request_id):
            best[k] = c
    kept = sorted(best.values(), key=lambda c: (c.received_at, c.request_id))
    return kept, len(cands) - len(kept)


def earlier_keys(
    db: Database, refs: list[str] | None, kind: str = "sft", prompts: set[str] | None = None
) -> tuple[set[str], list[str]]:
    """Example keys of every row of the given datasets (None = every registered dataset of ``kind``), and their
    ids. A classification row's key is that of its text as one user message and its label. ``prompts``, when
    given, also gets each chat row's :func:`prompt_key` (same pass over the data)."""
    from tuneloop.dataset_store import load_splits
    from tuneloop.registry import get_dataset, list_datasets

    if refs is None:
        recs = [d for d in list_datasets(db) if d.kind == kind]
    else:
        recs = [get_dataset(db, r) for r in refs]
    keys: set[str] = set()
    for rec in recs:
        dd = load_splits(db, rec.id)
        for split in dd:
            for row in dd[split]:
                if row.get("text") is not None and row.get("label") is not None and "messages" not in row:
                    keys.add(example_key([{"role": "user", "content": row["text"]}], str(row["label"])))
                    continue
                msgs = [chat_message(m) for m in row.get("messages") or []]
                if msgs and msgs[-1].get("role") == "assistant":
                    keys.add(example_key(msgs[:-1], msgs[-1].get("content") or "", row_tools(row)))
                    if prompts is not None:
                        prompts.add(prompt_key(msgs[:-1], row_tools(row)))
    return keys, [r.id for r in recs]
