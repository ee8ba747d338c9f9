"""``POST /v1/classify``: vLLM's classification endpoint over the server's classifier engine.

Contract
--------
* Body :class:`tuneloop.server.classify_protocol.ClassificationRequest`, answer
  :class:`~tuneloop.server.classify_protocol.ClassificationResponse` — vLLM's
  request and response shape (its server answers the same at ``/classify``).
  ``input`` is one text, a list of texts, a list of token ids or a list of
  token-id lists (at most :data:`~tuneloop.server.classify_protocol.MAX_INPUTS`
  inputs, not mixed: else a 400 ``invalid_input``). ``model`` (default: the
  served model's name) resolves through the server's
  :class:`tuneloop.server.routing.ModelRouter` like chat's ``model``
  (aliases, canary split sticky per ``user`` / API key); another classifier
  version than the engine's own folder is served by its extra engine of the
  server's pool (:mod:`tuneloop.server.engine_pool`, started on first use;
  ``server.classifier_engines`` 0: the router's 400 ``model_not_servable``). The response ``model`` and ``X-Model-Version`` name
  the served version; ``id`` is the request id (``classify-...``, also
  ``X-Request-Id``).
* The work is :meth:`tuneloop.server.engine.Engine.classify` of the routed engine:
  ``AsyncLLM.encode`` with ``PoolingParams(task="classify")``, one engine
  request per input, all in flight together. On a server whose engine is not
  a classifier the route is a 400 ``model_not_classifier`` saying how to serve
  one; on a classifier server the generating routes are a 400
  ``model_is_classifier`` (raised by the engine).
* Auth, request id, body checks and error bodies are the app's: the controller
  is mounted behind the inference-scope guard, the request context
  (:class:`tuneloop.server.request_context.RequestContext`, route
  ``classify``) is the one chat uses, refusals are
  :class:`tuneloop.server.errors.APIError` answered (and logged) by the app's
  exception handlers.
* Logging: **one ``requests`` row per input**. A single input is logged under
  the request id; the inputs of a batched request under ``<id>-<index>`` (the
  id a client sends to ``/v1/feedback`` for that input). Each row: route
  ``classify``, ``prompt`` = the input (JSON string, or token-id list),
  ``response`` = the predicted label, ``scores`` = ``{label: probability}``,
  ``prompt_tokens`` of that input, ``completion_tokens`` 0, the request's
  ``latency_s``, status, model, version, arm, user and key. A refused request
  is one row with its error. Metrics count the request once and every input's
  prediction (:meth:`tuneloop.monitoring.metrics.ServingMetrics.observe`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
from litestar import Controller, Request, Response, post
from litestar.openapi import ResponseSpec
from litestar.params import JSONBody

from tuneloop.monitoring.records import RequestRecord
from tuneloop.server.api_router import GENERATION_ERRORS
from tuneloop.server.classify_protocol import (
    MAX_INPUTS,
    ClassificationData,
    ClassificationRequest,
    ClassificationResponse,
    ClassificationUsage,
)
from tuneloop.server.engine import ClassResult, Engine
from tuneloop.server.errors import APIError
from tuneloop.server.request_context import RequestContext
from tuneloop.server.routing import ModelRouter

_enc = msgspec.json.Encoder()
#: request fields logged as parameters when set to other than their default
_PARAMS = ("truncate_prompt_tokens", "truncation_side", "add_special_tokens", "use_activation")
_DEFAULTS = {f.name: f.default for f in msgspec.structs.fields(ClassificationRequest) if f.name in _PARAMS}


def inputs(value: str | list[Any]) -> list[str] | list[list[int]]:
    """The inputs of a classify request: one text, texts, one token-id list or token-id lists (not mixed)."""
    if isinstance(value, str):
        return [value]
    kinds = {type(v) for v in value}
    out: list[Any]
    if kinds == {int}:
        return [list(value)]
    if kinds == {str}:
        out = list(value)
    elif kinds == {list}:
        out = [list(v) for v in value]
    else:
        raise APIError(
            400,
            "input must be a string, a list of strings, a list of token ids or a list of token-id lists (not mixed)",
            "invalid_input",
            "input",
        )
    if len(out) > MAX_INPUTS:
        raise APIError(400, f"at most {MAX_INPUTS} inputs per request", "invalid_input", "input")
    return out


def _params(data: ClassificationRequest) -> dict[str, Any] | None:
    """The parameters a request set to other than their defaults (logged with each row)."""
    out = {k: getattr(data, k) for k in _PARAMS if getattr(data, k) != _DEFAULTS[k]}
    return out or None


class ClassifyController(Controller):
    """``POST /v1/classify`` (inference scope)."""

    path = "/v1"
    tags = ["vLLM"]

    @post(
        "/classify",
        status_code=200,
        summary="Classify texts with the served sequence classifier (vLLM-compatible)",
        description="The probabilities of each class (`probs`, in label-id order) and the predicted `label` for "
        "every input, as vLLM's `/classify` answers. Needs a server on a `*ForSequenceClassification` model "
        "(a 400 `model_not_classifier` otherwise). `truncate_prompt_tokens` keeps that many tokens of each input "
        "(-1: the context length).",
        responses={
            200: ResponseSpec(ClassificationResponse, description="one result per input, in input order"),
            **GENERATION_ERRORS,
        },
    )
    async def classify(self, request: Request, data: JSONBody[ClassificationRequest]) -> Response[bytes]:
        ctx = RequestContext.require(request)
        engine: Engine = request.app.state.engine
        router: ModelRouter = request.app.state.router
        ctx.model, ctx.user, ctx.stream = data.model, data.user, False
        ctx.prompt = data.input
        ctx.params = _params(data)
        if not engine.is_classifier:
            raise APIError(
                400,
                f"the served model {engine.served_name!r} is not a classifier: /v1/classify needs a server on a "
                "*ForSequenceClassification model folder or version (tuneloop serve --model <classifier>)",
                "model_not_classifier",
                "model",
            )
        items = inputs(data.input)
        route = await router.resolve(data.model or engine.served_name, data.user or ctx.key_id)
        ctx.version, ctx.arm = route.version, route.arm
        async with router.engine_for(route) as served_by:  # the main engine, or another classifier's extra engine
            ids = served_by.classify_ids(
                items, data.truncate_prompt_tokens, data.truncation_side, data.add_special_tokens
            )
            try:
                results = await served_by.classify(ids, ctx.id, data.use_activation)
            except asyncio.CancelledError:  # the client went away: log it as such, then let the cancellation through
                ctx.submit(request, 499, error="client_closed_request: the client disconnected")
                raise
            labels = served_by.labels or []
        served = ctx.version or engine.served_name
        body = ClassificationResponse(
            id=ctx.id,
            created=int(time.time()),
            model=served,
            data=[ClassificationData(i, r.label, r.probs, len(r.probs)) for i, r in enumerate(results)],
            usage=ClassificationUsage(prompt_tokens=sum(len(i) for i in ids), total_tokens=sum(len(i) for i in ids)),
        )
        _log(request, ctx, items, results, labels)
        return Response(_enc.encode(body), media_type="application/json", headers=ctx.headers())


def _log(
    request: Request, ctx: RequestContext, items: list[Any], results: list[ClassResult], labels: list[str]
) -> None:
    """One ``requests`` row per input (see module doc); the request's context is marked logged."""
    ctx.logged = True
    writer = getattr(request.app.state, "log_writer", None)
    if writer is None:
        return
    latency = time.perf_counter() - ctx.t0
    many = len(results) > 1
    for i, (item, r) in enumerate(zip(items, results)):
        rec = RequestRecord(
            id=f"{ctx.id}-{i}" if many else ctx.id,
            received_at=ctx.received_at,
            route=ctx.route,
            status=200,
            model=ctx.model,
            model_version=ctx.version,
            arm=ctx.log_arm(request),
            prompt=item,
            response=r.label,
            prompt_tokens=r.prompt_tokens,
            completion_tokens=0,
            latency_s=latency,
            stream=False,
            params=ctx.params,
            user_id=ctx.user,
            key_id=ctx.key_id,
            scores=dict(zip(labels, r.probs)) if len(labels) == len(r.probs) else None,
        )
        writer.submit(rec, count_request=i == 0)
