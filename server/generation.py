"""One generation against the engine: collect it or stream it as SSE, abort it when the client leaves, log it once.

Contract
--------
* :class:`GenerationJob` runs one request's prompts (one for chat, one or
  more for legacy completions; ``n`` choices each) through
  :meth:`tuneloop.server.engine.Engine.generate` and merges the streams; the
  engine request ids are the request id (``<id>-<i>`` with several prompts).
* :meth:`GenerationJob.collect` waits for the whole answer while watching the
  connection: a client that goes away aborts the engine request and is logged
  as status 499. Engine errors become :class:`tuneloop.server.errors.APIError`
  (raised, and logged with their status).
* :meth:`GenerationJob.sse` yields OpenAI's SSE framing: ``data: {chunk}\\n\\n``
  per chunk, an optional usage chunk, then ``data: [DONE]\\n\\n``. An engine
  error mid-stream is sent as one ``data: {"error": {...}}`` event before
  ``[DONE]``; a client gone mid-stream is logged as 499. Its keyword-only
  options frame the Responses API's stream instead (closing events after the
  deltas, a typed error event, ``event:`` lines and no ``[DONE]``).
* Either way the request is submitted to the request log exactly once
  (:meth:`tuneloop.server.request_context.RequestContext.submit`) with the text
  of choice 0, the token counts of all choices, time to first token and
  latency; ``tuneloop_requests_in_flight`` counts the job while it runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from typing import Any

import msgspec
from litestar import Request

from tuneloop.server.engine import Delta, Engine, TokenLogprob
from tuneloop.server.errors import APIError, to_api_error
from tuneloop.server.protocol import Usage
from tuneloop.server.request_context import RequestContext

log = logging.getLogger(__name__)

_enc = msgspec.json.Encoder()
DONE = b"data: [DONE]\n\n"


def sse_event(payload: Any) -> bytes:
    """One SSE ``data:`` event carrying ``payload`` as JSON."""
    return b"data: " + _enc.encode(payload) + b"\n\n"


def named_sse_event(payload: Any) -> bytes:
    """One SSE event carrying ``payload`` as JSON, named (``event:`` line) by the payload's ``type``."""
    kind = payload.get("type") if isinstance(payload, dict) else getattr(payload, "type", None)
    data = sse_event(payload)
    return data if not isinstance(kind, str) else b"event: " + kind.encode() + b"\n" + data


async def wait_disconnect(request: Request) -> None:
    """Return when the client of a (fully read) request disconnects."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def merged(gens: list[AsyncGenerator[Delta, None]]) -> AsyncGenerator[tuple[int, Delta], None]:
    """Interleave several engine streams as (stream index, delta); closing it closes (aborts) them all."""
    if len(gens) == 1:
        try:
            async for d in gens[0]:
                yield 0, d
        finally:
            await gens[0].aclose()
        return
    q: asyncio.Queue[tuple[int, Delta | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, g: AsyncGenerator[Delta, None]) -> None:
        try:
            async for d in g:
                await q.put((i, d))
        except BaseException as e:
            await q.put((i, e))
            return
        finally:
            await g.aclose()
        await q.put((i, None))  # this stream is done

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    left = len(tasks)
    try:
        while left:
            i, item = await q.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Accumulator:
    """Accumulates the choices of a request (text, tokens, finish reason, logprobs)."""

    def __init__(self, n_choices: int):
        self.texts: list[list[str]] = [[] for _ in range(n_choices)]
        self.finish: list[str | None] = [None] * n_choices
        self.tokens = 0
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(n_choices)]
        self.prompt_logprobs: dict[int, list[TokenLogprob | None]] = {}  # choice index -> prompt logprobs

    def add(self, idx: int, d: Delta) -> None:
        if d.text:
            self.texts[idx].append(d.text)
        self.tokens += d.num_tokens
        if d.finish_reason:
            self.finish[idx] = d.finish_reason
        if d.logprobs:
            self.logprobs[idx].extend(d.logprobs)
        if d.prompt_logprobs is not None:
            self.prompt_logprobs[idx] = d.prompt_logprobs

    def text(self, idx: int) -> str:
        return "".join(self.texts[idx])


class GenerationJob:
    """One generation request against the engine; see module docstring."""

    def __init__(
        self,
        request: Request,
        ctx: RequestContext,
        engine: Engine,
        prompts: list[list[int]],
        sampling_params: Any,
        adapter: str | None,
        n: int,
    ):
        self.request, self.ctx, self.engine = request, ctx, engine
        self.prompts, self.sampling_params, self.adapter, self.n = prompts, sampling_params, adapter, n
        self.created = int(time.time())
        self.prompt_tokens = sum(len(p) for p in prompts)
        #: extra log fields of a successful answer (``tool_calls``, a ``finish_reason`` override), from the result
        self.log_extra: Callable[[Accumulator], dict[str, Any]] | None = None

    def usage(self, acc: Accumulator) -> Usage:
        return Usage(self.prompt_tokens, acc.tokens, self.prompt_tokens + acc.tokens)

    def _stream(self) -> AsyncGenerator[tuple[int, Delta], None]:
        ids = [self.ctx.id] if len(self.prompts) == 1 else [f"{self.ctx.id}-{i}" for i in range(len(self.prompts))]
        return merged(
            [
                self.engine.generate(p, self.sampling_params, rid, self.adapter)
                for p, rid in zip(self.prompts, ids, strict=True)
            ]
        )

    def _log(self, acc: Accumulator, status: int, error: str | None = None) -> None:
        fr = acc.finish[0] if acc.finish else None
        extra: dict[str, Any] = {}
        if status == 200 and self.log_extra is not None:
            try:
                extra = self.log_extra(acc)
            except Exception:  # the log row must still be written
                log.exception("could not derive the log fields of %s", self.ctx.id)
        self.ctx.submit(
            self.request,
            status,
            response=acc.text(0),
            finish_reason=extra.pop("finish_reason", None)
            or (fr if status == 200 else (fr or ("abort" if status == 499 else None))),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=acc.tokens,
            error=error,
            **extra,
        )

    def _first_token_seen(self) -> None:
        if self.ctx.ttft_s is None:
            self.ctx.ttft_s = time.perf_counter() - self.ctx.t0

    async def _run(self, acc: Accumulator) -> None:
        stream = self._stream()
        try:
            async for i, d in stream:
                self._first_token_seen()
                acc.add(i * self.n + d.index, d)
        finally:
            await stream.aclose()

    def _in_flight(self) -> Any:
        metrics = getattr(self.request.app.state, "metrics", None)
        return metrics.in_flight(self.ctx.route) if metrics is not None else None

    async def collect(self) -> Accumulator:
        """The whole answer (raises :class:`APIError` on engine errors and 499 when the client left)."""
        gauge = self._in_flight()
        if gauge is not None:
            gauge.inc()
        try:
            return await self._collect()
        finally:
            if gauge is not None:
                gauge.dec()

    async def _collect(self) -> Accumulator:
        acc = Accumulator(len(self.prompts) * self.n)
        work = asyncio.ensure_future(self._run(acc))
        watch = asyncio.ensure_future(wait_disconnect(self.request))
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
            if err.status_code >= 500:
                log.error("generation failed for %s", self.ctx.id, exc_info=exc)
            self._log(acc, err.status_code, f"{err.code}: {err.message}")
            raise err
        self._log(acc, 200)
        return acc

    async def sse(
        self,
        first_chunks: Iterable[Any],
        chunk_of: Callable[[int, Delta], Any],
        usage_chunk: Callable[[Accumulator], Any] | None,
        *,
        last_chunks: Callable[[Accumulator], Iterable[Any]] | None = None,
        error_chunk: Callable[[APIError], Any] | None = None,
        named_events: bool = False,
    ) -> AsyncIterator[bytes]:
        """The SSE body: ``first_chunks``, ``chunk_of(choice index, delta)`` per engine delta (nothing when it
        returns None), then ``usage_chunk(acc)`` when given, then ``[DONE]``.

        Keyword options (for the Responses API; the defaults keep the chat/completions framing):
        ``last_chunks(acc)`` are sent after the usage chunk; ``error_chunk(err)`` is the payload of an
        engine error mid-stream (default ``err.to_dict()``); ``named_events`` names each event after its
        payload's ``type`` (:func:`named_sse_event`) and sends no ``[DONE]``."""
        event = named_sse_event if named_events else sse_event
        acc = Accumulator(len(self.prompts) * self.n)
        stream = self._stream()
        status, error = 200, None
        gauge = self._in_flight()
        if gauge is not None:
            gauge.inc()
        try:
            for c in first_chunks:
                yield event(c)
            async for i, d in stream:
                self._first_token_seen()
                idx = i * self.n + d.index
                acc.add(idx, d)
                c = chunk_of(idx, d)
                if c is not None:
                    yield event(c)
            if usage_chunk is not None:
                yield event(usage_chunk(acc))
            for c in last_chunks(acc) if last_chunks is not None else ():
                yield event(c)
            if not named_events:
                yield DONE
        except (asyncio.CancelledError, GeneratorExit):
            status, error = 499, "client closed the request"
            raise
        except Exception as e:
            err = to_api_error(e)
            status, error = err.status_code, f"{err.code}: {err.message}"
            if err.status_code >= 500:
                log.error("generation failed for %s", self.ctx.id, exc_info=e)
            yield event(error_chunk(err) if error_chunk is not None else err.to_dict())
            if not named_events:
                yield DONE
        finally:
            if gauge is not None:
                gauge.dec()
            await stream.aclose()
            self._log(acc, status, error)
