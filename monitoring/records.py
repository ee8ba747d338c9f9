"""The typed row of the request log: one served request, the columns of the ``requests`` table.

Contract: :class:`RequestRecord` is a ``msgspec.Struct`` with exactly the columns
of the ``requests`` table (:mod:`tuneloop.migrations`), same names. ``prompt``,
``params`` and ``tool_calls`` are Python objects (messages list / prompt string,
sampling parameters with any ``tools`` definitions, the parsed tool calls of a
chat answer as OpenAI ``[{"id", "type", "function": {"name", "arguments"}}]``,
a classify answer's ``scores`` ``{label: probability}``)
serialised to JSON when written; ``received_at`` is UTC (naive, or
aware and converted); ``status`` is the HTTP status, 499 when the client went
away. The server builds one per request; the request log
(:mod:`monitoring.requestlog`) writes it and the serving metrics
(:mod:`monitoring.metrics`) count it.

**Synthetic traffic.** A request that carries the header :data:`ORIGIN_HEADER` with the value
:data:`SYNTHETIC` (``tuneloop data synthesize`` sends it on every generation request) is not production
traffic: its record gets ``arm = "synthetic"``, is counted only in ``tuneloop_synthetic_requests_total``
and is never written to the ``requests`` table, so drift, sampling, canary judging, the gate's production
prompts and the serving metrics never see it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

ORIGIN_HEADER = "X-Tuneloop-Origin"
"""The request header that marks where a request comes from; :data:`SYNTHETIC` marks generated data."""
SYNTHETIC = "synthetic"


class RequestRecord(msgspec.Struct, kw_only=True):
    """One served request: the columns of the ``requests`` table."""

    id: str
    received_at: datetime
    route: str
    status: int
    model: str | None = None
    model_version: str | None = None
    arm: str | None = None
    prompt: Any = None
    response: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    error: str | None = None
    stream: bool | None = None
    params: Any = None
    user_id: str | None = None
    key_id: str | None = None
    tool_calls: Any = None
    replica: str | None = None  # the server replica that answered (server.replica)
    scores: Any = None  # a classify request's {label: probability} (migration 9); None for other routes
