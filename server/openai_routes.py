"""The OpenAI-compatible API: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``.

Contract
--------
* Bodies are the structs of :mod:`server.protocol`; responses and SSE chunks
  follow OpenAI's format (``data: {chunk}\\n\\n`` ... ``data: [DONE]\\n\\n``, a
  final usage chunk with ``choices: []`` when ``stream_options.include_usage``).
* The response ``id`` is the request id (UUIDv7 with ``chatcmpl-`` / ``cmpl-``),
  also sent as ``X-Request-Id``; the served version is sent as
  ``X-Model-Version`` and is the response's ``model`` (as OpenAI answers an
  alias with the snapshot that served it).
* Every request on these routes becomes exactly one
  :class:`monitoring.requestlog.RequestRecord`, submitted to
  ``app.state.log_writer`` (which also feeds ``app.state.metrics``): successes,
  refusals (4xx, through :func:`record_failure` from :mod:`server.errors`),
  engine errors, and requests whose client went away (status 499; the engine
  request is aborted). ``ttft_s`` runs from receipt of the request to the
  first token out of the engine; ``latency_s`` to the last byte. The record is
  queued in memory: no response waits on disk. For ``n`` > 1 (or several
  prompts) the logged ``response`` is choice 0's text; token counts cover all.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.openapi import ResponseSpec
from litestar.response import Stream

from tuneloop.db import utcnow
from tuneloop.ids import new_id
from tuneloop.server.engine import Delta, GenParams
from tuneloop.server.errors import APIError, to_api_error
from tuneloop.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    TopLogprob,
    Usage,
)

ROUTES = {"/v1/chat/completions": ("chat.completions", "chatcmpl-"), "/v1/completions": ("completions", "cmpl-")}
_enc = msgspec.json.Encoder()
_DONE = b"data: [DONE]\n\n"
_ERRORS = {
    s: ResponseSpec(data_container=ErrorResponse, description=d, generate_examples=False)
    for s, d in {
        400: "invalid request (bad JSON, types, values, prompt too long for the context)",
        401: "missing or invalid API key",
        403: "key lacks the scope",
        404: "unknown model",
        413: "body over server.max_body_bytes",
        503: "engine unavailable",
    }.items()
}


@dataclass
class RequestContext:
    """What one inference request has accumulated for its log record."""

    id: str
    route: str
    t0: float
    received_at: Any
    model: str | None = None
    version: str | None = None
    arm: str | None = None
    prompt: Any = None
    params: dict[str, Any] | None = None
    stream: bool | None = None
    user: str | None = None
    key_id: str | None = None
    ttft_s: float | None = None
    logged: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, request: Request) -> RequestContext | None:
        """The context of ``request`` (created on first use for an inference route), else None."""
        st = request.scope.setdefault("state", {})
        ctx = st.get("tuneloop_ctx")
        if ctx is None:
            spec = ROUTES.get(request.scope.get("path", ""))
            if spec is None:
                return None
            principal = st.get("principal")
            ctx = cls(
                id=new_id(spec[1]),
                route=spec[0],
                t0=st.get("tuneloop_t0") or time.perf_counter(),
                received_at=st.get("tuneloop_received_at") or utcnow(),
                key_id=getattr(principal, "key_id", None),
            )
            st["tuneloop_ctx"] = ctx
        return ctx

    def submit(
        self,
        request: Request,
        status: int,
        *,
        response: str | None = None,
        finish_reason: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        error: str | None = None,
    ) -> None:
        if self.logged:
            return
        self.logged = True
        from tuneloop.monitoring.requestlog import RequestRecord

        rec = RequestRecord(
            id=self.id,
            received_at=self.received_at,
            route=self.route,
            status=status,
            model=self.model,
            model_version=self.version,
            arm=self.arm,
            prompt=self.prompt,
            response=response,
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            ttft_s=self.ttft_s,
            latency_s=time.perf_counter() - self.t0,
            error=error,
            stream=self.stream,
            params=self.params,
            user_id=self.user,
            key_id=self.key_id,
        )
        writer = getattr(request.app.state, "log_writer", None)
        if writer is not None:
            writer.submit(rec)


def record_failure(request: Request, err: APIError) -> str | None:
    """Log a refused inference request (called by the exception handler); return its request id."""
    ctx = RequestContext.of(request)
    if ctx is None:
        return None
    ctx.submit(request, err.status, error=f"{err.code}: {err.message}"[:2000])
    return ctx.id


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.text for p in content)


def _headers(ctx: RequestContext) -> dict[str, str]:
    return {"X-Request-Id": ctx.id, "X-Model-Version": ctx.version or ""}


async def _wait_disconnect(request: Request) -> None:
    """Return when the client of a (fully read) request disconnects."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def _merged(gens: list[AsyncIterator[Delta]]) -> AsyncIterator[tuple[int, Delta]]:
    """Interleave several engine streams as (stream index, delta); closing it closes (aborts) them all."""
    if len(gens) == 1:
        try:
            async for d in gens[0]:
                yield 0, d
        finally:
            await gens[0].aclose()
        return
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, g: AsyncIterator[Delta]) -> None:
        try:
            async for d in g:
                await q.put((i, d))
        except BaseException as e:
            await q.put((i, e))
            return
        finally:
            await g.aclose()
        await q.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    left = len(tasks)
    try:
        while left:
            i, item = await q.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Acc:
    """Accumulates choices of a request (text, tokens, finish reason, logprobs)."""

    def __init__(self, n_choices: int):
        self.texts = [[] for _ in range(n_choices)]
        self.finish: list[str | None] = [None] * n_choices
        self.tokens = 0
        self.logprobs: list[list] = [[] for _ in range(n_choices)]

    def add(self, idx: int, d: Delta) -> None:
        if d.text:
            self.texts[idx].append(d.text)
        self.tokens += d.num_tokens
        if d.finish_reason:
            self.finish[idx] = d.finish_reason
        if d.logprobs:
            self.logprobs[idx].extend(d.logprobs)

    def text(self, idx: int) -> str:
        return "".join(self.texts[idx])


def _chat_logprobs(items) -> ChatLogprobs:
    b = lambda s: list(s.encode("utf-8", "replace"))  # noqa: E731
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(t.token, t.logprob, b(t.token), [TopLogprob(tok, lp, b(tok)) for tok, lp in t.top])
            for t in items
        ]
    )


def _cmpl_logprobs(items, offset0: int = 0) -> CompletionLogprobs:
    tokens, lps, tops, offs = [], [], [], []
    off = offset0
    for t in items:
        tokens.append(t.token)
        lps.append(t.logprob)
        tops.append(dict(t.top))
        offs.append(off)
        off += len(t.token)
    return CompletionLogprobs(tokens, lps, tops, offs)


class OpenAIController(Controller):
    """OpenAI-compatible inference endpoints (inference scope)."""

    path = "/v1"
    tags = ["OpenAI"]

    @get(
        "/models",
        summary="List the models this server answers to",
        description="The base model's served name, the `production` alias (and `canary` while one exists), "
        "adapters loaded in the engine and registered adapter versions of this base (loaded on first use).",
    )
    async def models(self, request: Request) -> ModelList:
        router = request.app.state.router
        created = int(request.app.state.engine.started_at or time.time())
        base = request.app.state.engine.served_name
        return ModelList(
            data=[
                ModelCard(id=n, created=created, owned_by="tuneloop", parent=None if n == base else base)
                for n in router.model_names()
            ]
        )

    @post(
        "/chat/completions",
        status_code=200,
        summary="Chat completion (OpenAI-compatible)",
        description="Generate a reply to `messages` with the model named by `model`. `stream: true` answers with "
        "server-sent events in OpenAI's chunk format, ended by `data: [DONE]`.",
        responses=_ERRORS,
    )
    async def chat_completions(self, request: Request, data: ChatCompletionRequest) -> Response:
        ctx = RequestContext.of(request)
        ctx.model, ctx.user, ctx.stream = data.model, data.user, data.stream
        messages = [{"role": m.role, "content": _text(m.content)} for m in data.messages]
        ctx.prompt = messages
        ctx.params = _params(
            data,
            (
                "max_tokens",
                "max_completion_tokens",
                "temperature",
                "top_p",
                "n",
                "stop",
                "seed",
                "presence_penalty",
                "frequency_penalty",
                "logprobs",
                "top_logprobs",
            ),
        )
        if data.top_logprobs is not None and not data.logprobs:
            raise APIError(400, "top_logprobs requires logprobs: true", "invalid_parameter", "top_logprobs")
        engine = request.app.state.engine
        route = await request.app.state.router.resolve(data.model, data.user or ctx.key_id)
        ctx.version, ctx.arm = route.version, route.arm
        prompt_ids = engine.render_chat(messages)
        param = "max_completion_tokens" if data.max_completion_tokens is not None else "max_tokens"
        max_tokens = engine.check_length(len(prompt_ids), data.max_completion_tokens or data.max_tokens, param)
        gp = GenParams(
            max_tokens=max_tokens,
            temperature=data.temperature,
            top_p=data.top_p,
            n=data.n,
            stop=_stops(data.stop),
            seed=data.seed,
            presence_penalty=data.presence_penalty,
            frequency_penalty=data.frequency_penalty,
            logprobs=(data.top_logprobs or 0) if data.logprobs else None,
        )
        sp = engine.sampling_params(gp, max_tokens, stream=data.stream)
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        job = _Job(request, ctx, engine, [prompt_ids], sp, route.adapter, data.n)
        if data.stream:
            return Stream(
                job.chat_sse(include_usage),
                media_type="text/event-stream",
                headers={**_headers(ctx), "Cache-Control": "no-cache"},
            )
        acc = await job.collect()
        choices = [
            ChatChoice(
                i,
                AssistantMessage("assistant", acc.text(i)),
                _chat_logprobs(acc.logprobs[i]) if data.logprobs else None,
                acc.finish[i],
            )
            for i in range(data.n)
        ]
        body = ChatCompletion(ctx.id, job.created, ctx.version, choices, job.usage(acc))
        return Response(_enc.encode(body), media_type="application/json", headers=_headers(ctx))

    @post(
        "/completions",
        status_code=200,
        summary="Text completion (OpenAI-compatible, legacy)",
        description="Continue `prompt` (a string or a list of strings) with the model named by `model`.",
        responses=_ERRORS,
    )
    async def completions(self, request: Request, data: CompletionRequest) -> Response:
        ctx = RequestContext.of(request)
        ctx.model, ctx.user, ctx.stream = data.model, data.user, data.stream
        prompts = [data.prompt] if isinstance(data.prompt, str) else list(data.prompt)
        ctx.prompt = data.prompt
        ctx.params = _params(
            data,
            (
                "max_tokens",
                "temperature",
                "top_p",
                "n",
                "stop",
                "seed",
                "presence_penalty",
                "frequency_penalty",
                "logprobs",
            ),
        )
        engine = request.app.state.engine
        route = await request.app.state.router.resolve(data.model, data.user or ctx.key_id)
        ctx.version, ctx.arm = route.version, route.arm
        ids = [engine.encode(p) for p in prompts]
        if any(len(i) == 0 for i in ids):
            raise APIError(400, "prompt must not be empty", "invalid_prompt", "prompt")
        max_tokens = min(engine.check_length(len(i), data.max_tokens, prompt_param="prompt") for i in ids)
        gp = GenParams(
            max_tokens=max_tokens,
            temperature=data.temperature,
            top_p=data.top_p,
            n=data.n,
            stop=_stops(data.stop),
            seed=data.seed,
            presence_penalty=data.presence_penalty,
            frequency_penalty=data.frequency_penalty,
            logprobs=data.logprobs,
        )
        sp = engine.sampling_params(gp, max_tokens, stream=data.stream)
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        job = _Job(request, ctx, engine, ids, sp, route.adapter, data.n)
        if data.stream:
            return Stream(
                job.completion_sse(include_usage),
                media_type="text/event-stream",
                headers={**_headers(ctx), "Cache-Control": "no-cache"},
            )
        acc = await job.collect()
        choices = [
            CompletionChoice(
                i, acc.text(i), _cmpl_logprobs(acc.logprobs[i]) if data.logprobs is not None else None, acc.finish[i]
            )
            for i in range(len(acc.texts))
        ]
        body = Completion(ctx.id, job.created, ctx.version, choices, job.usage(acc))
        return Response(_enc.encode(body), media_type="application/json", headers=_headers(ctx))


def _params(data: Any, names: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for k in names:
        v = getattr(data, k)
        if v is not None and v is not False:
            out[k] = v
    return out


def _stops(stop: Any) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


class _Job:
    """One generation request against the engine: collect it, or stream it as SSE, and log it once."""

    def __init__(self, request: Request, ctx: RequestContext, engine, prompts: list[list[int]], sp, adapter, n: int):
        self.request, self.ctx, self.engine = request, ctx, engine
        self.prompts, self.sp, self.adapter, self.n = prompts, sp, adapter, n
        self.created = int(time.time())
        self.prompt_tokens = sum(len(p) for p in prompts)

    def usage(self, acc: _Acc) -> Usage:
        return Usage(self.prompt_tokens, acc.tokens, self.prompt_tokens + acc.tokens)

    def _stream(self) -> AsyncIterator[tuple[int, Delta]]:
        ids = [self.ctx.id] if len(self.prompts) == 1 else [f"{self.ctx.id}-{i}" for i in range(len(self.prompts))]
        return _merged([self.engine.generate(p, self.sp, rid, self.adapter) for p, rid in zip(self.prompts, ids)])

    def _log(self, acc: _Acc, status: int, error: str | None = None) -> None:
        fr = acc.finish[0] if acc.finish else None
        self.ctx.submit(
            self.request,
            status,
            response=acc.text(0),
            finish_reason=fr if status == 200 else (fr or ("abort" if status == 499 else None)),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=acc.tokens,
            error=error,
        )

    async def _run(self, acc: _Acc) -> None:
        stream = self._stream()
        try:
            async for i, d in stream:
                if self.ctx.ttft_s is None:
                    self.ctx.ttft_s = time.perf_counter() - self.ctx.t0
                acc.add(i * self.n + d.index, d)
        finally:
            await stream.aclose()

    def _in_flight(self):
        metrics = getattr(self.request.app.state, "metrics", None)
        return metrics.in_flight(self.ctx.route) if metrics is not None else None

    async def collect(self) -> _Acc:
        gauge = self._in_flight()
        if gauge is not None:
            gauge.inc()
        try:
            return await self._collect()
        finally:
            if gauge is not None:
                gauge.dec()

    async def _collect(self) -> _Acc:
        acc = _Acc(len(self.prompts) * self.n)
        work = asyncio.ensure_future(self._run(acc))
        watch = asyncio.ensure_future(_wait_disconnect(self.request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            work.cancel()
            watch.cancel()
            self._log(acc, 499, "client closed the request")
            raise
        if not work.done():  # the client went away: abort the engine request
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            self._log(acc, 499, "client closed the request")
            raise APIError(499, "client closed the request")
        watch.cancel()
        exc = work.exception()
        if exc is not None:
            err = to_api_error(exc)
            if err.status >= 500:
                import logging

                logging.getLogger(__name__).error("generation failed for %s", self.ctx.id, exc_info=exc)
            self._log(acc, err.status, f"{err.code}: {err.message}")
            raise err
        self._log(acc, 200)
        return acc

    async def _sse(self, include_usage: bool, first_chunks, chunk_of) -> AsyncIterator[bytes]:
        acc = _Acc(len(self.prompts) * self.n)
        stream = self._stream()
        status, error = 200, None
        gauge = self._in_flight()
        if gauge is not None:
            gauge.inc()
        try:
            for c in first_chunks:
                yield b"data: " + _enc.encode(c) + b"\n\n"
            async for i, d in stream:
                if self.ctx.ttft_s is None:
                    self.ctx.ttft_s = time.perf_counter() - self.ctx.t0
                idx = i * self.n + d.index
                acc.add(idx, d)
                yield b"data: " + _enc.encode(chunk_of(idx, d)) + b"\n\n"
            if include_usage:
                yield b"data: " + _enc.encode(self.usage_chunk(acc)) + b"\n\n"
            yield _DONE
        except (asyncio.CancelledError, GeneratorExit):
            status, error = 499, "client closed the request"
            raise
        except Exception as e:
            err = to_api_error(e)
            status, error = err.status, f"{err.code}: {err.message}"
            if err.status >= 500:
                import logging

                logging.getLogger(__name__).error("generation failed for %s", self.ctx.id, exc_info=e)
            yield (
                b"data: "
                + msgspec.json.encode({"error": {"message": err.message, "type": err.type, "code": err.code}})
                + b"\n\n"
            )
            yield _DONE
        finally:
            if gauge is not None:
                gauge.dec()
            await stream.aclose()
            self._log(acc, status, error)

    def usage_chunk(self, acc: _Acc):
        raise NotImplementedError

    def chat_sse(self, include_usage: bool) -> AsyncIterator[bytes]:
        ctx, created = self.ctx, self.created
        want_lp = self.sp.logprobs is not None
        usage_none = None

        def chunk(idx: int, d: Delta) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                ctx.id,
                created,
                ctx.version,
                [
                    ChatChunkChoice(
                        idx,
                        ChatDelta(content=d.text),
                        _chat_logprobs(d.logprobs or []) if want_lp else None,
                        d.finish_reason,
                    )
                ],
                usage=usage_none,
            )

        self.usage_chunk = lambda acc: ChatCompletionChunk(ctx.id, created, ctx.version, [], usage=self.usage(acc))  # type: ignore[method-assign]
        first = [
            ChatCompletionChunk(
                ctx.id, created, ctx.version, [ChatChunkChoice(i, ChatDelta(role="assistant", content=""), None, None)]
            )
            for i in range(self.n)
        ]
        return self._sse(include_usage, first, chunk)

    def completion_sse(self, include_usage: bool) -> AsyncIterator[bytes]:
        ctx, created = self.ctx, self.created
        want_lp = self.sp.logprobs is not None
        offsets: dict[int, int] = {}

        def chunk(idx: int, d: Delta) -> Completion:
            lp = None
            if want_lp:
                lp = _cmpl_logprobs(d.logprobs or [], offsets.get(idx, 0))
            offsets[idx] = offsets.get(idx, 0) + len(d.text)
            return Completion(ctx.id, created, ctx.version, [CompletionChoice(idx, d.text, lp, d.finish_reason)], None)

        self.usage_chunk = lambda acc: Completion(ctx.id, created, ctx.version, [], self.usage(acc))  # type: ignore[method-assign]
        return self._sse(include_usage, [], chunk)
