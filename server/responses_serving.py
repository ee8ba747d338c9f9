"""The work behind ``POST /v1/responses``: :class:`ResponsesServing` turns a Responses API request into a response.

Contract
--------
* :class:`ResponsesServing` holds the :class:`tuneloop.server.engine.Engine`
  and the :class:`tuneloop.server.routing.ModelRouter` (the same ones
  :class:`tuneloop.server.serving.OpenAIServing` serves chat with).
  :meth:`ResponsesServing.create` takes a request parsed into
  :class:`tuneloop.server.responses_protocol.ResponsesRequest` and returns
  OpenAI's ``response`` object, or with ``stream: true`` its event stream
  (``text/event-stream``, each event an ``event: <type>`` line and a
  ``data:`` line, no ``[DONE]``): ``response.created``,
  ``response.in_progress``, ``response.output_item.added``,
  ``response.content_part.added``, ``response.output_text.delta`` (one per
  engine delta), ``response.output_text.done``, ``response.content_part.done``,
  ``response.output_item.done``, then ``response.completed`` (or
  ``response.incomplete`` when cut by ``max_output_tokens`` or the context),
  numbered by ``sequence_number`` from 0. An engine error mid-stream is one
  ``error`` event.
* The prompt is a chat: ``instructions`` becomes a leading system message and
  ``input`` the following messages (a string is one user message; content
  parts are joined), rendered by the engine's chat template exactly as
  ``/v1/chat/completions`` renders ``messages``. The logged ``prompt`` is
  that messages list, so a logged responses request reads like a chat one
  (drift, feedback sampling). ``max_output_tokens`` is the completion budget
  (default: the rest of the context); ``truncation: "auto"`` drops the oldest
  non-system turns (never the last) until the prompt leaves room for it.
  ``text.format`` ``json_object`` / ``json_schema`` constrain the output
  through vLLM's structured outputs, as ``response_format`` does on chat.
* The response ``id`` is the request id (``resp_<uuid7>``, also
  ``X-Request-Id``, the key of the request-log row and of
  ``POST /v1/feedback``); the output message's id is ``msg_<same uuid>``. The
  response's ``model`` and ``X-Model-Version`` name the served version.
  ``status`` is ``incomplete`` with ``incomplete_details.reason =
  "max_output_tokens"`` when generation stopped on length.
* Refused with a 400 naming the parameter: ``previous_response_id`` (no
  responses are stored to chain), non-empty ``tools``, a ``tool_choice``
  other than ``auto`` / ``none``, non-empty ``include``, ``background: true``. Generation, disconnects,
  aborts and the one request-log record are
  :class:`tuneloop.server.generation.GenerationJob`'s.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.response import Stream

from tuneloop.server.engine import Delta, Engine, EngineInputError, GenParams
from tuneloop.server.errors import APIError
from tuneloop.server.generation import Accumulator, GenerationJob
from tuneloop.server.request_context import RequestContext
from tuneloop.server.responses_protocol import (
    ContentPartEvent,
    ErrorEvent,
    FormatText,
    IncompleteDetails,
    InputMessage,
    InputTokensDetails,
    ItemStatus,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    OutputTokensDetails,
    ResponseLifecycleEvent,
    ResponseObject,
    ResponsesRequest,
    ResponseStatus,
    ResponseUsage,
    TextConfigOut,
    TextDeltaEvent,
    TextDoneEvent,
)
from tuneloop.server.routing import ModelRouter

_enc = msgspec.json.Encoder()
_ID_PREFIX = "resp_"


class ResponsesServing:
    """Serves OpenAI's Responses API (text) over one engine and its model router; see module docstring."""

    def __init__(self, engine: Engine, router: ModelRouter):
        self.engine = engine
        self.router = router

    async def create(self, request: Request, data: ResponsesRequest) -> Response[Any]:
        """One response, whole or streamed as Responses API events."""
        ctx = RequestContext.require(request)
        ctx.model, ctx.user, ctx.stream = data.model, data.user, data.stream
        messages = input_messages(data)
        ctx.prompt = messages
        ctx.params = {
            k: v for k in ("max_output_tokens", "temperature", "top_p") if (v := getattr(data, k)) is not None
        }
        if data.text is not None and data.text.format is not None and data.text.format.type != "text":
            ctx.params["text"] = msgspec.to_builtins(data.text)
        refuse_unsupported(data)
        engine = self.engine
        route = await self.router.resolve(data.model, data.user or ctx.key_id)
        ctx.version, ctx.arm = route.version, route.arm
        messages, prompt_ids = self._render(messages, data)
        ctx.prompt = messages
        max_tokens = engine.check_length(
            len(prompt_ids), data.max_output_tokens, param="max_output_tokens", prompt_param="input"
        )
        gp = GenParams(
            max_tokens=max_tokens, temperature=data.temperature, top_p=data.top_p, structured=structured_output(data)
        )
        sp = engine.sampling_params(gp, max_tokens, stream=data.stream)
        job = GenerationJob(request, ctx, engine, [prompt_ids], sp, route.adapter, 1)
        shape = _Shape(ctx.id, job.created, ctx.version or "", data, sp)
        if data.stream:
            return Stream(
                _Events(shape).sse(job),
                media_type="text/event-stream",
                headers={**ctx.headers(), "Cache-Control": "no-cache"},
            )
        acc = await job.collect()
        body_obj = shape.final(acc.text(0), acc.finish[0], usage(job, acc))
        return Response(_enc.encode(body_obj), media_type="application/json", headers=ctx.headers())

    def _render(self, messages: list[dict[str, str]], data: ResponsesRequest) -> tuple[list[dict[str, str]], list[int]]:
        """The messages sent (fewer with ``truncation: "auto"``) and their prompt token ids."""
        while True:
            try:
                ids = self.engine.render_chat(messages)
            except EngineInputError as e:  # the chat template's complaints are about `input`
                raise APIError(400, str(e), e.code, "input" if e.param in (None, "messages") else e.param) from None
            if data.truncation != "auto" or self.engine.max_model_len - len(ids) >= (data.max_output_tokens or 1):
                return messages, ids
            droppable = [i for i, m in enumerate(messages[:-1]) if m["role"] not in ("system", "developer")]
            if not droppable:
                return messages, ids  # check_length refuses it, naming the budget
            messages = messages[: droppable[0]] + messages[droppable[0] + 1 :]


def input_messages(data: ResponsesRequest) -> list[dict[str, str]]:
    """``instructions`` + ``input`` as chat messages ``{"role", "content"}`` (content parts joined)."""
    out: list[dict[str, str]] = []
    if data.instructions is not None:
        out.append({"role": "system", "content": data.instructions})
    if isinstance(data.input, str):
        out.append({"role": "user", "content": data.input})
    else:
        out.extend({"role": m.role, "content": _text(m)} for m in data.input)
    return out


def _text(m: InputMessage) -> str:
    return m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)


def refuse_unsupported(data: ResponsesRequest) -> None:
    """400 naming the first parameter this server declares but does not serve (see module docstring)."""

    def bad(param: str, message: str, code: str = "unsupported_parameter") -> APIError:
        return APIError(400, message, code, param)

    if data.previous_response_id is not None:
        raise bad(
            "previous_response_id",
            "this server does not store responses, so previous_response_id cannot chain to one; "
            "send the whole conversation as `input` (earlier turns as user/assistant messages)",
        )
    if data.tools:
        raise bad("tools", "tools are not supported on /v1/responses by this server; send no tools")
    tc = data.tool_choice
    if tc is not None and tc not in ("auto", "none"):
        raise bad("tool_choice", f'tool_choice must be "auto" or "none" (there are no tools), got {tc!r}')
    if data.include:
        raise bad("include", f"include is not supported (no extra output fields to include), got {data.include!r}")
    if data.background:
        raise bad("background", "background responses are not supported; send background: false")


def structured_output(data: ResponsesRequest) -> dict[str, Any] | None:
    """vLLM structured-output arguments for ``text.format`` (``json_object`` / ``json_schema``), else None."""
    fmt = data.text.format if data.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"json_object": True}
    if fmt.schema is None or fmt.name is None:
        raise APIError(400, "text.format json_schema needs name and schema", "invalid_parameter", "text.format")
    return {"json": fmt.schema}


def usage(job: GenerationJob, acc: Accumulator) -> ResponseUsage:
    u = job.usage(acc)
    return ResponseUsage(
        input_tokens=u.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=0),
        output_tokens=u.completion_tokens,
        output_tokens_details=OutputTokensDetails(reasoning_tokens=0),
        total_tokens=u.total_tokens,
    )


class _Shape:
    """Builds the response object and its output message for one request."""

    def __init__(self, rid: str, created: int, served: str, data: ResponsesRequest, sp: Any):
        self.id, self.created, self.served, self.data = rid, created, served, data
        self.msg_id = "msg_" + rid.removeprefix(_ID_PREFIX)
        self.temperature = getattr(sp, "temperature", data.temperature)  # the values sampling used
        self.top_p = getattr(sp, "top_p", data.top_p)
        fmt = data.text.format if data.text is not None else None
        self.format = (
            FormatText(fmt.type, fmt.name, fmt.schema, fmt.description, fmt.strict)
            if fmt is not None
            else FormatText("text")
        )

    def message(self, text: str | None, status: ItemStatus) -> OutputMessage:
        content = [] if text is None else [OutputText(text=text)]
        return OutputMessage(id=self.msg_id, status=status, content=content)

    def response(
        self,
        status: ResponseStatus,
        output: list[OutputMessage],
        usage: ResponseUsage | None = None,
        incomplete: IncompleteDetails | None = None,
    ) -> ResponseObject:
        d = self.data
        return ResponseObject(
            id=self.id,
            created_at=self.created,
            status=status,
            completed_at=int(time.time()) if status in ("completed", "incomplete") else None,
            incomplete_details=incomplete,
            instructions=d.instructions,
            max_output_tokens=d.max_output_tokens,
            model=self.served,
            output=output,
            parallel_tool_calls=d.parallel_tool_calls if d.parallel_tool_calls is not None else True,
            temperature=self.temperature,
            tool_choice=d.tool_choice if isinstance(d.tool_choice, str) else "auto",
            top_p=self.top_p,
            truncation=d.truncation or "disabled",
            usage=usage,
            user=d.user,
            metadata=dict(d.metadata or {}),
            text=TextConfigOut(format=self.format),
        )

    def final(self, text: str, finish_reason: str | None, usage: ResponseUsage) -> ResponseObject:
        """The finished response: ``incomplete`` (max_output_tokens) when generation stopped on length."""
        cut = finish_reason == "length"
        status: ItemStatus = "incomplete" if cut else "completed"
        return self.response(
            status,
            [self.message(text, status)],
            usage,
            IncompleteDetails("max_output_tokens") if cut else None,
        )


class _Events:
    """The Responses API's streaming events of one request, numbered in the order they are sent."""

    def __init__(self, shape: _Shape):
        self.shape = shape
        self.seq = 0

    def _next(self) -> int:
        n = self.seq
        self.seq += 1
        return n

    def first(self) -> list[Any]:
        s = self.shape
        pending = s.response("in_progress", [])
        return [
            ResponseLifecycleEvent(type="response.created", sequence_number=self._next(), response=pending),
            ResponseLifecycleEvent(type="response.in_progress", sequence_number=self._next(), response=pending),
            OutputItemEvent(
                type="response.output_item.added",
                sequence_number=self._next(),
                output_index=0,
                item=s.message(None, "in_progress"),
            ),
            ContentPartEvent(
                type="response.content_part.added",
                sequence_number=self._next(),
                item_id=s.msg_id,
                output_index=0,
                content_index=0,
                part=OutputText(text=""),
            ),
        ]

    def sse(self, job: GenerationJob) -> AsyncIterator[bytes]:
        """The whole event stream of ``job``: the opening events, a delta per engine output, the closing events."""
        return job.sse(
            self.first(),
            self.delta,
            None,
            last_chunks=lambda acc: self.last(acc, job),
            error_chunk=self.error,
            named_events=True,
        )

    def delta(self, _idx: int, d: Delta) -> TextDeltaEvent | None:
        if not d.text:
            return None
        return TextDeltaEvent(
            sequence_number=self._next(), item_id=self.shape.msg_id, output_index=0, content_index=0, delta=d.text
        )

    def last(self, acc: Accumulator, job: GenerationJob) -> list[Any]:
        s = self.shape
        text = acc.text(0)
        final = s.final(text, acc.finish[0], usage(job, acc))
        item = final.output[0]
        return [
            TextDoneEvent(sequence_number=self._next(), item_id=s.msg_id, output_index=0, content_index=0, text=text),
            ContentPartEvent(
                type="response.content_part.done",
                sequence_number=self._next(),
                item_id=s.msg_id,
                output_index=0,
                content_index=0,
                part=item.content[0],
            ),
            OutputItemEvent(type="response.output_item.done", sequence_number=self._next(), output_index=0, item=item),
            ResponseLifecycleEvent(
                type="response.incomplete" if final.status == "incomplete" else "response.completed",
                sequence_number=self._next(),
                response=final,
            ),
        ]

    def error(self, err: APIError) -> ErrorEvent:
        return ErrorEvent(sequence_number=self._next(), code=err.code, message=err.message, param=err.param)
