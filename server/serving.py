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
* Every parameter of the request structs is honoured (unknown ones were
  refused by the struct): ``response_format`` (``json_object`` /
  ``json_schema``) and the vLLM extra ``structured_outputs`` become vLLM
  structured outputs, so the text is guaranteed to parse (and validate);
  ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` go through
  :class:`tuneloop.server.engine_tools.ToolCalling` (``required`` and named
  functions are enforced by structured outputs; ``auto`` is parsed by the
  vLLM tool parser of ``server.tool_parser``), answered as ``tool_calls``
  with ``finish_reason: tool_calls`` (``stop`` for a named function, as
  OpenAI answers) and streamed as tool-call deltas. Completions take prompts
  as text, token ids or lists of either, ``echo`` (prompt text, and with
  ``logprobs`` the prompt tokens' logprobs, as vLLM's server answers) and
  refuse ``suffix``. :meth:`~OpenAIServing.tokenize` /
  :meth:`~OpenAIServing.detokenize` are vLLM's ``/tokenize`` and
  ``/detokenize``.
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
from collections.abc import Callable
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.response import Stream

from tuneloop.server.engine import Delta, Engine, GenParams, TokenLogprob
from tuneloop.server.engine_tools import ToolCalling, choose_parser, parser_names
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
    ChatMessage,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    FunctionCall,
    FunctionCallDelta,
    JSONObjectFormat,
    JSONSchemaFormat,
    ModelCard,
    ModelList,
    StructuredOutputs,
    TextFormat,
    TextPart,
    TokenizeRequest,
    TokenizeResponse,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
)
from tuneloop.server.request_context import RequestContext
from tuneloop.server.routing import ModelRouter

_enc = msgspec.json.Encoder()
#: request fields that are not logged as parameters (they are the prompt, the model, the user...)
_NOT_PARAMS = {"model", "messages", "prompt", "stream", "stream_options", "user", "metadata", "store"}
Request_ = ChatCompletionRequest | CompletionRequest


class OpenAIServing:
    """Serves the OpenAI-compatible API over one engine and its model router; see module docstring."""

    def __init__(self, engine: Engine, router: ModelRouter, tool_parser: str = "auto"):
        self.engine = engine
        self.router = router
        if tool_parser not in ("auto", "none", "") and tool_parser not in parser_names():
            from tuneloop.errors import UserError

            raise UserError(
                f"server.tool_parser={tool_parser!r} is not a vLLM tool parser; one of: auto, none, "
                + ", ".join(parser_names())
            )
        self.tool_parser_setting = tool_parser

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

    @property
    def tool_parser(self) -> str | None:
        """The vLLM tool parser for ``tool_choice: auto`` on this model (None: none fits)."""
        return choose_parser(self.tool_parser_setting, getattr(self.engine.tokenizer, "chat_template", None))

    # -- chat -------------------------------------------------------------------------
    def _tool_calling(
        self, data: ChatCompletionRequest
    ) -> tuple[list[dict[str, Any]] | None, Callable[[], ToolCalling] | None]:
        """The request's tool definitions and a factory of per-choice :class:`ToolCalling` (None: no tool calls)."""
        if not data.tools:
            if data.tool_choice is not None and data.tool_choice != "none":
                raise APIError(400, "tool_choice needs tools", "invalid_parameter", "tool_choice")
            return None, None
        tools = msgspec.to_builtins(data.tools)
        choice: Any = data.tool_choice if data.tool_choice is not None else "auto"
        if choice == "none":
            return tools, None
        if not isinstance(choice, str):
            names = {t["function"]["name"] for t in tools}
            if choice.function.name not in names:
                raise APIError(
                    400,
                    f"tool_choice names function {choice.function.name!r}, which is not in tools",
                    "invalid_parameter",
                    "tool_choice",
                )
            choice = msgspec.to_builtins(choice)
        parser = self.tool_parser
        if choice == "auto" and parser is None:
            raise APIError(
                400,
                "tool_choice 'auto' needs a tool-call parser, and none fits this model's chat template: set "
                "server.tool_parser (one of " + ", ".join(parser_names()) + "), or send tool_choice 'required' "
                "or a named function (enforced by structured outputs on any model)",
                "invalid_parameter",
                "tool_choice",
            )
        tokenizer, parallel = self.engine.tokenizer, data.parallel_tool_calls

        def make() -> ToolCalling:
            try:
                return ToolCalling(tokenizer, tools, choice, parallel, parser)
            except ValueError as e:
                raise APIError(400, f"invalid tools: {str(e).splitlines()[0]}", "invalid_parameter", "tools") from None

        make()  # refuse bad definitions before anything starts
        return tools, make

    async def chat(self, request: Request, data: ChatCompletionRequest) -> Response[Any]:
        """A chat completion, whole or streamed."""
        ctx = RequestContext.require(request)
        ctx.model, ctx.user, ctx.stream = data.model, data.user, data.stream
        messages = _messages(data.messages)
        ctx.prompt = messages
        ctx.params = _params(data)
        if data.top_logprobs is not None and not data.logprobs:
            raise APIError(400, "top_logprobs requires logprobs: true", "invalid_parameter", "top_logprobs")
        tools, make_tc = self._tool_calling(data)
        structured = _structured(data.response_format, data.structured_outputs)
        calls = [make_tc() for _ in range(data.n)] if make_tc is not None else None
        if calls and calls[0].constrains:
            if structured is not None:
                raise APIError(
                    400,
                    "response_format / structured_outputs cannot be combined with tool_choice 'required' or a named "
                    "function (the tool call's schema already constrains the output)",
                    "invalid_parameter",
                    "response_format" if data.response_format is not None else "structured_outputs",
                )
            structured = {"json": calls[0].schema()}
        engine = self.engine
        route = await self.router.resolve(data.model, data.user or ctx.key_id)
        ctx.version, ctx.arm = route.version, route.arm
        prompt_ids = engine.render_chat(messages, tools)
        param = "max_completion_tokens" if data.max_completion_tokens is not None else "max_tokens"
        max_tokens = engine.check_length(len(prompt_ids), data.max_completion_tokens or data.max_tokens, param)
        k = (data.top_logprobs or 0) if data.logprobs else None
        gp = _gen_params(data, max_tokens, k, structured)
        sp = engine.sampling_params(gp, max_tokens, stream=data.stream)
        job = GenerationJob(request, ctx, engine, [prompt_ids], sp, route.adapter, data.n)
        if calls is not None:
            job.log_extra = lambda acc: _tool_log(calls[0], acc) if calls else {}
        served = ctx.version or ""
        if data.stream:
            include_usage = bool(data.stream_options and data.stream_options.include_usage)

            def chunk(idx: int, d: Delta) -> ChatCompletionChunk | None:
                lp = _chat_logprobs(d.logprobs or [], k) if k is not None else None
                if calls is None:
                    delta = ChatDelta(content=d.text)
                    finish = d.finish_reason
                else:
                    tc = calls[idx]
                    content, deltas = tc.stream(d.text, d.token_ids, d.finish_reason is not None)
                    if not content and not deltas and d.finish_reason is None and lp is None:
                        return None
                    delta = ChatDelta(content=content or None, tool_calls=_call_deltas(deltas) or None)
                    finish = _finish(tc, d.finish_reason, tc.streamed_calls > 0)
                choice = ChatChunkChoice(idx, delta, lp, finish)
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
        choices = []
        for i in range(data.n):
            text, finish = acc.text(i), acc.finish[i]
            message = AssistantMessage("assistant", text)
            if calls is not None:
                content, tool_calls = calls[i].parse(text)
                message = AssistantMessage("assistant", content, _tool_calls(tool_calls))
                finish = _finish(calls[i], finish, bool(tool_calls))
            lp = _chat_logprobs(acc.logprobs[i], k) if k is not None else None
            choices.append(ChatChoice(i, message, lp, finish))
        body = ChatCompletion(ctx.id, job.created, served, choices, job.usage(acc))
        return Response(_enc.encode(body), media_type="application/json", headers=ctx.headers())

    # -- completions -----------------------------------------------------------------------
    async def completions(self, request: Request, data: CompletionRequest) -> Response[Any]:
        """A legacy text completion of one or more prompts (text or token ids), whole or streamed."""
        ctx = RequestContext.require(request)
        ctx.model, ctx.user, ctx.stream = data.model, data.user, data.stream
        ctx.prompt = data.prompt
        ctx.params = _params(data)
        if data.suffix is not None:
            raise APIError(
                400,
                "suffix (fill-in-the-middle) is not supported: vLLM's engine has no insertion mode; send the text "
                "before the gap as the prompt",
                "unsupported_parameter",
                "suffix",
            )
        if data.max_tokens == 0 and not data.echo:
            raise APIError(400, "max_tokens 0 is only allowed with echo: true", "invalid_parameter", "max_tokens")
        if data.prompt_logprobs is not None and data.stream:
            raise APIError(
                400, "prompt_logprobs are not available when stream is true", "invalid_parameter", "prompt_logprobs"
            )
        structured = _structured(data.response_format, data.structured_outputs)
        engine = self.engine
        prompts = _prompts(data.prompt)
        route = await self.router.resolve(data.model, data.user or ctx.key_id)
        ctx.version, ctx.arm = route.version, route.arm
        ids = [engine.encode(p) if isinstance(p, str) else p for p in prompts]
        if any(len(i) == 0 for i in ids):
            raise APIError(400, "prompt must not be empty", "invalid_prompt", "prompt")
        echo_only = data.echo and data.max_tokens == 0
        budget = 1 if echo_only else data.max_tokens
        max_tokens = min(engine.check_length(len(i), budget, prompt_param="prompt") for i in ids)
        gp = _gen_params(data, max_tokens, data.logprobs, structured)
        if data.echo and data.logprobs is not None:
            gp.prompt_logprobs = data.logprobs
        if data.prompt_logprobs is not None:
            gp.prompt_logprobs = data.prompt_logprobs
        sp = engine.sampling_params(gp, max_tokens, stream=data.stream)
        job = GenerationJob(request, ctx, engine, ids, sp, route.adapter, data.n)
        served = ctx.version or ""
        echo_text = [p if isinstance(p, str) else engine.decode(p) for p in prompts] if data.echo else None
        k = data.logprobs
        if data.stream:
            include_usage = bool(data.stream_options and data.stream_options.include_usage)
            offsets: dict[int, int] = {}
            echoed: set[int] = set()
            seen_plp: dict[int, list[TokenLogprob | None]] = {}

            def chunk(idx: int, d: Delta) -> Completion:
                text, lps = ("" if echo_only else d.text), ([] if echo_only else (d.logprobs or []))
                prefix_lp: list[TokenLogprob | None] = []
                if echo_text is not None and idx not in echoed:
                    echoed.add(idx)
                    text = echo_text[idx // data.n] + text
                    if d.prompt_logprobs is not None:
                        seen_plp[idx // data.n] = d.prompt_logprobs
                    prefix_lp = list(seen_plp.get(idx // data.n) or [None] * len(ids[idx // data.n]))
                lp = (
                    _cmpl_logprobs(
                        engine, ids[idx // data.n] if prefix_lp else [], prefix_lp, lps, k, offsets.get(idx, 0)
                    )
                    if k is not None
                    else None
                )
                offsets[idx] = offsets.get(idx, 0) + len(text)
                return Completion(ctx.id, job.created, served, [CompletionChoice(idx, text, lp, d.finish_reason)], None)

            def usage_chunk(acc: Accumulator) -> Completion:
                return Completion(ctx.id, job.created, served, [], job.usage(acc))

            return _stream(ctx, job.sse([], chunk, usage_chunk if include_usage else None))
        acc = await job.collect()
        choices = []
        for i in range(len(acc.texts)):
            p = i // data.n
            text, lps = ("" if echo_only else acc.text(i)), ([] if echo_only else acc.logprobs[i])
            prompt_lp: list[TokenLogprob | None] = []
            if echo_text is not None:
                text = echo_text[p] + text
                prompt_lp = _prompt_lp(acc, i, data.n) or [None] * len(ids[p])
            lp = (
                _cmpl_logprobs(engine, ids[p] if echo_text is not None else [], prompt_lp, lps, k)
                if k is not None
                else None
            )
            choices.append(CompletionChoice(i, text, lp, acc.finish[i]))
        body = Completion(ctx.id, job.created, served, choices, job.usage(acc))
        return Response(_enc.encode(body), media_type="application/json", headers=ctx.headers())

    # -- tokenize / detokenize -----------------------------------------------------------
    def tokenize(self, data: TokenizeRequest) -> TokenizeResponse:
        """Token ids of a prompt (text) or of a conversation rendered as the server renders it."""
        self._check_model(data.model)
        eng = self.engine
        if (data.prompt is None) == (data.messages is None):
            raise APIError(400, "send exactly one of prompt and messages", "invalid_request", "prompt")
        if data.messages is not None:
            tools = msgspec.to_builtins(data.tools) if data.tools else None
            msgs = _messages(data.messages)
            ids = eng.render_chat(msgs, tools, data.add_generation_prompt)
        else:
            ids = list(eng.tokenizer.encode(data.prompt or "", add_special_tokens=data.add_special_tokens))
        return TokenizeResponse(count=len(ids), max_model_len=eng.max_model_len, tokens=ids)

    def detokenize(self, data: DetokenizeRequest) -> DetokenizeResponse:
        """The text of token ids."""
        self._check_model(data.model)
        return DetokenizeResponse(prompt=self.engine.detokenize(data.tokens))

    def _check_model(self, model: str | None) -> None:
        if model is not None and model not in self.router.model_names():
            raise APIError(404, f"model {model!r} is not served here; see GET /v1/models", "model_not_found", "model")


def _stream(ctx: RequestContext, body: Any) -> Stream:
    return Stream(body, media_type="text/event-stream", headers={**ctx.headers(), "Cache-Control": "no-cache"})


def _text(content: str | list[TextPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.text for p in content)


def _messages(msgs: list[ChatMessage]) -> list[dict[str, Any]]:
    """The conversation as plain dicts (what the template renders and the log stores)."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(msgs):
        d: dict[str, Any] = {"role": m.role, "content": _text(m.content)}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_calls:
            if m.role != "assistant":
                raise APIError(
                    400, f"messages[{i}]: only assistant messages carry tool_calls", "invalid_messages", "messages"
                )
            d["tool_calls"] = msgspec.to_builtins(m.tool_calls)
        if m.role == "tool":
            if not m.tool_call_id:
                raise APIError(400, f"messages[{i}]: a tool message needs tool_call_id", "invalid_messages", "messages")
            d["tool_call_id"] = m.tool_call_id
        elif m.tool_call_id is not None:
            raise APIError(400, f"messages[{i}]: only tool messages carry tool_call_id", "invalid_messages", "messages")
        out.append(d)
    return out


def _prompts(prompt: str | list[Any]) -> list[str | list[int]]:
    """The prompts of a completion request: text(s) or token-id list(s), not mixed."""
    if isinstance(prompt, str):
        return [prompt]
    kinds = {type(p) for p in prompt}
    if kinds == {str}:
        if len(prompt) > 64:
            raise APIError(400, "at most 64 prompts per request", "invalid_prompt", "prompt")
        return list(prompt)
    if kinds == {int}:
        return [list(prompt)]
    if kinds == {list}:
        if len(prompt) > 64:
            raise APIError(400, "at most 64 prompts per request", "invalid_prompt", "prompt")
        return [list(p) for p in prompt]
    raise APIError(
        400,
        "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists (not mixed)",
        "invalid_prompt",
        "prompt",
    )


def _params(data: Request_) -> dict[str, Any]:
    """The parameters a request set that differ from their defaults (logged with it)."""
    out: dict[str, Any] = {}
    for f in msgspec.structs.fields(type(data)):
        if f.name in _NOT_PARAMS:
            continue
        v = getattr(data, f.name)
        default = f.default if f.default is not msgspec.NODEFAULT else None
        if v is None or v == default:
            continue
        out[f.name] = msgspec.to_builtins(v)
    return out


def _structured(rf: Any, so: StructuredOutputs | None) -> dict[str, Any] | None:
    """vLLM structured-output arguments for ``response_format`` or the ``structured_outputs`` extra."""
    out: dict[str, Any] | None = None
    if isinstance(rf, JSONObjectFormat):
        out = {"json_object": True}
    elif isinstance(rf, JSONSchemaFormat):
        if rf.json_schema.schema is None:
            raise APIError(
                400, "response_format.json_schema.schema is required", "invalid_parameter", "response_format"
            )
        out = {"json": rf.json_schema.schema}
    elif rf is not None and not isinstance(rf, TextFormat):  # pragma: no cover - the struct union is closed
        raise APIError(400, "unknown response_format type", "invalid_parameter", "response_format")
    if so is not None:
        given = {k: v for k, v in msgspec.to_builtins(so).items() if v is not None}
        if len(given) != 1:
            raise APIError(
                400,
                "structured_outputs needs exactly one of json, regex, choice, grammar, json_object",
                "invalid_parameter",
                "structured_outputs",
            )
        if out is not None:
            raise APIError(
                400, "send response_format or structured_outputs, not both", "invalid_parameter", "structured_outputs"
            )
        out = given
    return out


def _gen_params(data: Request_, max_tokens: int, logprobs: int | None, structured: dict[str, Any] | None) -> GenParams:
    """The sampling parameters both endpoints share, from a validated request."""
    if data.logit_bias and any(not t.isdigit() for t in data.logit_bias):
        raise APIError(400, "logit_bias keys must be token ids (digits)", "invalid_parameter", "logit_bias")
    bias = {int(t): b for t, b in data.logit_bias.items()} if data.logit_bias else None
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
        top_k=data.top_k,
        min_p=data.min_p,
        repetition_penalty=data.repetition_penalty,
        ignore_eos=data.ignore_eos,
        min_tokens=data.min_tokens,
        stop_token_ids=data.stop_token_ids,
        include_stop_str_in_output=data.include_stop_str_in_output,
        skip_special_tokens=data.skip_special_tokens,
        logit_bias=bias,
        structured=structured,
    )


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _utf8(s: str) -> list[int]:
    return list(s.encode("utf-8", "replace"))


def _finish(tc: ToolCalling, finish: str | None, called: bool) -> str | None:
    """OpenAI's finish reason of a tool-calling answer: ``tool_calls`` when it called tools (``stop`` for a
    named function, as OpenAI answers a forced call), else the engine's."""
    if finish is None or not called:
        return finish
    if tc.mode == "named":
        return "stop" if finish == "stop" else finish
    return "tool_calls" if finish == "stop" else finish


def _tool_calls(calls: list[dict[str, Any]]) -> list[ToolCall]:
    return [
        ToolCall(id=c["id"], function=FunctionCall(c["function"]["name"], c["function"]["arguments"])) for c in calls
    ]


def _call_deltas(deltas: list[dict[str, Any]]) -> list[ToolCallDelta]:
    out = []
    for d in deltas:
        fn = d.get("function") or {}
        out.append(
            ToolCallDelta(
                index=int(d["index"]),
                id=d.get("id"),
                type=d.get("type"),
                function=FunctionCallDelta(fn.get("name"), fn.get("arguments")) if fn else None,
            )
        )
    return out


def _tool_log(tc: ToolCalling, acc: Accumulator) -> dict[str, Any]:
    """Log fields of a tool-calling answer: the parsed calls of choice 0 and its finish reason."""
    _, calls = tc.parse(acc.text(0))
    return {"tool_calls": calls or None, "finish_reason": _finish(tc, acc.finish[0], bool(calls))}


def _chat_logprobs(items: list[TokenLogprob], k: int) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                t.token, t.logprob, _utf8(t.token), [TopLogprob(tok, lp, _utf8(tok)) for tok, lp in t.top[:k]]
            )
            for t in items
        ]
    )


def _prompt_lp(acc: Accumulator, i: int, n: int) -> list[TokenLogprob | None] | None:
    """The prompt logprobs of choice ``i`` (vLLM sends them with one choice of each prompt)."""
    if i in acc.prompt_logprobs:
        return acc.prompt_logprobs[i]
    return next((v for j, v in acc.prompt_logprobs.items() if j // n == i // n), None)


def _cmpl_logprobs(
    engine: Engine,
    prompt_ids: list[int],
    prompt_lps: list[TokenLogprob | None],
    items: list[TokenLogprob],
    k: int,
    offset0: int = 0,
) -> CompletionLogprobs:
    """OpenAI completion logprobs over the echoed prompt (``prompt_lps``, None where vLLM has none) and the
    generated tokens, with the ``k + 1`` alternatives vLLM's server returns per token."""
    tokens: list[str] = []
    lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offs: list[int] = []
    off = offset0
    steps: list[TokenLogprob | None] = list(prompt_lps) + list(items)
    for j, t in enumerate(steps):
        if t is None:
            tok = prompt_ids[j] if j < len(prompt_ids) else 0
            token = engine.decode([tok])
            tokens.append(token)
            lps.append(None)
            tops.append(None)
        else:
            token = t.token
            tokens.append(token)
            lps.append(t.logprob)
            tops.append(dict(t.top[: k + 1]))
        offs.append(off)
        off += len(token)
    return CompletionLogprobs(tokens, lps, tops, offs)
