"""The work behind the OpenAI-compatible API: :class:`OpenAIServing` turns a parsed request into a response.

Contract
--------
* :class:`OpenAIServing` (one per app, ``app.state.serving``) holds the
  :class:`tuneloop.server.engine.Engine` and the
  :class:`tuneloop.server.routing.ModelRouter`. Its methods take a request
  already parsed into the structs of :mod:`tuneloop.server.protocol` and
  return the response: :meth:`~OpenAIServing.models` (``GET /v1/models``),
  :meth:`~OpenAIServing.chat` (``POST /v1/chat/completions``) and
  :meth:`~OpenAIServing.completions` (``POST /v1/completions``).
* Responses and SSE chunks follow OpenAI's format (``stream: true`` answers
  ``text/event-stream``; a final usage chunk with ``choices: []`` when
  ``stream_options.include_usage``). The response ``id`` is the request id
  (also ``X-Request-Id``); the served version is ``X-Model-Version`` and the
  response's ``model`` (as OpenAI answers an alias with the snapshot that
  served it).
* The ``model`` field is resolved by the router (``user``, else the API key,
  keeps a canary split sticky); prompts are rendered and length-checked by
  the engine; refusals are raised as :class:`tuneloop.server.errors.APIError`.
* The request context (:class:`tuneloop.server.request_context.RequestContext`)
  collects what the request log needs; the generation itself, its
  disconnect handling and its one log record are
  :class:`tuneloop.server.generation.GenerationJob`'s. For ``n`` > 1 (or
  several prompts) the logged ``response`` is choice 0's text; token counts
  cover all.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.response import Stream

from tuneloop.server.engine import Delta, Engine, GenParams, TokenLogprob
from tuneloop.server.errors import APIError
from tuneloop.server.generation import Accumulator, GenerationJob
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
    ModelCard,
    ModelList,
    TextPart,
    TopLogprob,
)
from tuneloop.server.request_context import RequestContext
from tuneloop.server.routing import ModelRouter

_enc = msgspec.json.Encoder()
_CHAT_PARAMS = (
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
)
_COMPLETION_PARAMS = (
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
)


class OpenAIServing:
    """Serves the OpenAI-compatible API over one engine and its model router; see module docstring."""

    def __init__(self, engine: Engine, router: ModelRouter):
        self.engine = engine
        self.router = router

    def models(self) -> ModelList:
        """The names a client may send as ``model`` right now."""
        created = int(self.engine.started_at or time.time())
        base = self.engine.served_name
        return ModelList(
            data=[
                ModelCard(id=n, created=created, owned_by="tuneloop", parent=None if n == base else base)
                for n in self.router.model_names()
            ]
        )

    async def chat(self, request: Request, data: ChatCompletionRequest) -> Response[Any]:
        """A chat completion, whole or streamed."""
        ctx = RequestContext.require(request)
        ctx.model, ctx.user, ctx.stream = data.model, data.user, data.stream
        messages = [{"role": m.role, "content": _text(m.content)} for m in data.messages]
        ctx.prompt = messages
        ctx.params = _params(data, _CHAT_PARAMS)
        if data.top_logprobs is not None and not data.logprobs:
            raise APIError(400, "top_logprobs requires logprobs: true", "invalid_parameter", "top_logprobs")
        engine = self.engine
        route = await self.router.resolve(data.model, data.user or ctx.key_id)
        ctx.version, ctx.arm = route.version, route.arm
        prompt_ids = engine.render_chat(messages)
        param = "max_completion_tokens" if data.max_completion_tokens is not None else "max_tokens"
        max_tokens = engine.check_length(len(prompt_ids), data.max_completion_tokens or data.max_tokens, param)
        gp = _gen_params(data, max_tokens, (data.top_logprobs or 0) if data.logprobs else None)
        sp = engine.sampling_params(gp, max_tokens, stream=data.stream)
        job = GenerationJob(request, ctx, engine, [prompt_ids], sp, route.adapter, data.n)
        served = ctx.version or ""
        if data.stream:
            include_usage = bool(data.stream_options and data.stream_options.include_usage)
            want_lp = gp.logprobs is not None

            def chunk(idx: int, d: Delta) -> ChatCompletionChunk:
                lp = _chat_logprobs(d.logprobs or []) if want_lp else None
                choice = ChatChunkChoice(idx, ChatDelta(content=d.text), lp, d.finish_reason)
                return ChatCompletionChunk(ctx.id, job.created, served, [choice], usage=None)

            def usage_chunk(acc: Accumulator) -> ChatCompletionChunk:
                return ChatCompletionChunk(ctx.id, job.created, served, [], usage=job.usage(acc))

            first = [
                ChatCompletionChunk(
                    ctx.id,
                    job.created,
                    served,
                    [ChatChunkChoice(i, ChatDelta(role="assistant", content=""), None, None)],
                )
                for i in range(data.n)
            ]
            return _stream(ctx, job.sse(first, chunk, usage_chunk if include_usage else None))
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
        body = ChatCompletion(ctx.id, job.created, served, choices, job.usage(acc))
        return Response(_enc.encode(body), media_type="application/json", headers=ctx.headers())

    async def completions(self, request: Request, data: CompletionRequest) -> Response[Any]:
        """A legacy text completion of one or more prompts, whole or streamed."""
        ctx = RequestContext.require(request)
        ctx.model, ctx.user, ctx.stream = data.model, data.user, data.stream
        prompts = [data.prompt] if isinstance(data.prompt, str) else list(data.prompt)
        ctx.prompt = data.prompt
        ctx.params = _params(data, _COMPLETION_PARAMS)
        engine = self.engine
        route = await self.router.resolve(data.model, data.user or ctx.key_id)
        ctx.version, ctx.arm = route.version, route.arm
        ids = [engine.encode(p) for p in prompts]
        if any(len(i) == 0 for i in ids):
            raise APIError(400, "prompt must not be empty", "invalid_prompt", "prompt")
        max_tokens = min(engine.check_length(len(i), data.max_tokens, prompt_param="prompt") for i in ids)
        gp = _gen_params(data, max_tokens, data.logprobs)
        sp = engine.sampling_params(gp, max_tokens, stream=data.stream)
        job = GenerationJob(request, ctx, engine, ids, sp, route.adapter, data.n)
        served = ctx.version or ""
        if data.stream:
            include_usage = bool(data.stream_options and data.stream_options.include_usage)
            want_lp = gp.logprobs is not None
            offsets: dict[int, int] = {}

            def chunk(idx: int, d: Delta) -> Completion:
                lp = _cmpl_logprobs(d.logprobs or [], offsets.get(idx, 0)) if want_lp else None
                offsets[idx] = offsets.get(idx, 0) + len(d.text)
                return Completion(
                    ctx.id, job.created, served, [CompletionChoice(idx, d.text, lp, d.finish_reason)], None
                )

            def usage_chunk(acc: Accumulator) -> Completion:
                return Completion(ctx.id, job.created, served, [], job.usage(acc))

            return _stream(ctx, job.sse([], chunk, usage_chunk if include_usage else None))
        acc = await job.collect()
        choices = [
            CompletionChoice(
                i, acc.text(i), _cmpl_logprobs(acc.logprobs[i]) if data.logprobs is not None else None, acc.finish[i]
            )
            for i in range(len(acc.texts))
        ]
        body = Completion(ctx.id, job.created, served, choices, job.usage(acc))
        return Response(_enc.encode(body), media_type="application/json", headers=ctx.headers())


def _stream(ctx: RequestContext, body: Any) -> Stream:
    return Stream(body, media_type="text/event-stream", headers={**ctx.headers(), "Cache-Control": "no-cache"})


def _text(content: str | list[TextPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.text for p in content)


def _params(data: ChatCompletionRequest | CompletionRequest, names: tuple[str, ...]) -> dict[str, Any]:
    """The sampling parameters a request set (logged with it)."""
    out = {}
    for k in names:
        v = getattr(data, k)
        if v is not None and v is not False:
            out[k] = v
    return out


def _gen_params(data: ChatCompletionRequest | CompletionRequest, max_tokens: int, logprobs: int | None) -> GenParams:
    """The sampling parameters both endpoints share, from a validated request."""
    return GenParams(
        max_tokens=max_tokens,
        temperature=data.temperature,
        top_p=data.top_p,
        n=data.n,
        stop=_stops(data.stop),
        seed=data.seed,
        presence_penalty=data.presence_penalty,
        frequency_penalty=data.frequency_penalty,
        logprobs=logprobs,
    )


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _utf8(s: str) -> list[int]:
    return list(s.encode("utf-8", "replace"))


def _chat_logprobs(items: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(t.token, t.logprob, _utf8(t.token), [TopLogprob(tok, lp, _utf8(tok)) for tok, lp in t.top])
            for t in items
        ]
    )


def _cmpl_logprobs(items: list[TokenLogprob], offset0: int = 0) -> CompletionLogprobs:
    tokens, lps, tops, offs = [], [], [], []
    off = offset0
    for t in items:
        tokens.append(t.token)
        lps.append(t.logprob)
        tops.append(dict(t.top))
        offs.append(off)
        off += len(t.token)
    return CompletionLogprobs(tokens, lps, tops, offs)
