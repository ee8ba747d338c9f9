"""The one wrapper around vLLM's in-process ``AsyncLLM``: every vLLM call of the server lives here.

Contract
--------
* :meth:`Engine.start` builds ``AsyncLLM.from_engine_args(AsyncEngineArgs(...))``
  over one base-model folder from :class:`tuneloop.settings.EngineSettings`
  (LoRA enabled, dtype via :func:`tuneloop.runtime.pick_dtype`) after
  :func:`tuneloop.runtime.configure_vllm_env`. vLLM is imported only here, and
  only inside methods, so a vLLM upgrade touches this file alone.
* Prompts go in as token ids: :meth:`render_chat` (the trainer's template path,
  :func:`tuneloop.chat.render_prompt`, so serving sees exactly the prompt
  training saw) and :meth:`encode`.
* :meth:`generate` is an async iterator of :class:`Delta` (one per engine
  output step and choice: new text, new token count, finish reason, optional
  logprobs). It uses vLLM's DELTA output kind, so no per-token Python work is
  done unless logprobs were asked for. Cancelling the iteration (client gone)
  aborts the engine request.
* :class:`GenParams` holds the OpenAI sampling parameters; :meth:`sampling_params`
  validates them through vLLM and raises :class:`EngineInputError` (a 400) on
  values vLLM refuses.
* Adapters are named: :meth:`add_adapter` validates ``adapter_config.json``
  (PEFT LoRA, rank <= ``max_lora_rank``, trained on this base when it says so),
  then test-loads it into the engine (a broken file fails here, not on the
  first request) and raises :class:`AdapterError` otherwise. :meth:`remove_adapter`
  stops new requests from using the name at once, waits until requests already
  using it finish, then evicts it — so loading and unloading never fail a
  request in flight. :meth:`adapters` lists what the engine holds.
* Classifiers: when the model folder's ``config.json`` ``architectures[0]`` ends in
  ``ForSequenceClassification`` the engine is a *pooling* engine (``runner="pooling"``,
  no LoRA): :attr:`is_classifier` is true, :attr:`labels` lists ``config.id2label`` in
  id order, and :meth:`classify` scores texts or token-id lists through
  ``AsyncLLM.encode`` with ``PoolingParams(task="classify")`` — exactly what vLLM's own
  ``/classify`` serving does — returning one :class:`ClassResult` (label, softmax
  probabilities, prompt tokens) per input. The chat-only methods (:meth:`render_chat`,
  :meth:`sampling_params`, :meth:`generate`, adapters) raise :class:`EngineInputError`
  ``model_is_classifier`` (a 400) on a classifier, and :meth:`classify` raises
  ``model_not_classifier`` on a generative model.
* A quantized folder on CPU starts with LoRA off (:func:`tuneloop.runtime.lora_supported`: vLLM's CPU int8
  kernel drops the weight tensor its LoRA layers need); loading an adapter on it is an :class:`AdapterError`
  that says why.
* :meth:`check_health` raises if the engine core died; :meth:`shutdown` stops it.
* vLLM's online engine (``AsyncLLM``) always runs its engine core in a child
  process (``engine.multiprocessing`` only applies to the offline engine of eval
  and the gate). :meth:`start` therefore also starts a small guard process that holds the
  read end of a pipe from this one: when this process exits in any way
  (SIGKILL included) the guard sees end-of-file and stops the engine processes
  still alive (SIGTERM, SIGKILL after 5 s), so none is left orphaned holding
  memory and cores. vLLM's engine core does not watch its parent.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from tuneloop.chat import render_prompt
from tuneloop.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import subprocess

    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.outputs import CompletionOutput
    from vllm.v1.engine.async_llm import AsyncLLM

    from tuneloop.settings import EngineSettings

log = logging.getLogger(__name__)

# The guard of the engine's child processes (see module doc): argv = the pids to stop when stdin closes.
_GUARD = """
import signal, sys
import psutil
signal.signal(signal.SIGINT, signal.SIG_IGN)
procs = []
for pid in sys.argv[1:]:
    try:
        procs.append(psutil.Process(int(pid)))
    except psutil.Error:
        pass
sys.stdin.buffer.read()  # end-of-file: the server exited, however it died
alive = [p for p in procs if p.is_running()]
for p in alive:
    try:
        p.terminate()
    except psutil.Error:
        pass
_, alive = psutil.wait_procs(alive, timeout=5)
for p in alive:
    try:
        p.kill()
    except psutil.Error:
        pass
"""


def _child_pids() -> set[int]:
    """Pids of this process's descendants (the engine core and its workers once vLLM started them)."""
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


class EngineInputError(UserError, ValueError):
    """A request the engine refuses (bad sampling values, prompt too long): HTTP 400."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param


class AdapterError(UserError, ValueError):
    """An adapter that cannot be served by this engine (missing, malformed, wrong base, rank too high)."""


class EngineUnavailable(RuntimeError):
    """The engine is not started, shutting down or dead: HTTP 503."""


@dataclass
class GenParams:
    """OpenAI sampling parameters (and the vLLM extras the API accepts), already type-checked by the API layer."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: int | None = None  # number of top alternatives per token (0 = only the sampled token)
    prompt_logprobs: int | None = None  # logprobs of the prompt tokens (completions' echo)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    #: structured outputs: one of json (a schema), json_object, regex, choice, grammar -> vLLM StructuredOutputsParams
    structured: dict[str, Any] | None = None


@dataclass
class TokenLogprob:
    """One token's logprob; ``top`` lists the alternatives vLLM returned, in its order (the sampled token first)."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Delta:
    """New output of one choice since the previous delta (``prompt_logprobs`` only on a choice's first delta)."""

    index: int
    text: str
    num_tokens: int
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class ClassResult:
    """One classified input: the predicted label (``id2label`` of the argmax), the probabilities in label-id
    order and the input's token count."""

    label: str | None
    probs: list[float]
    prompt_tokens: int


def classifier_labels(model_path: str | os.PathLike) -> list[str] | None:
    """The labels (``id2label`` in id order) of a ``*ForSequenceClassification`` folder, None for any other
    model (a generative one, or a folder without a readable ``config.json``)."""
    try:
        cfg = json.loads((Path(model_path).expanduser() / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    archs = cfg.get("architectures") or []
    if not archs or not str(archs[0]).endswith("ForSequenceClassification"):
        return None
    id2label = cfg.get("id2label") or {}
    n = len(id2label) or int(cfg.get("num_labels") or 2)
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)]


_CLASSIFIER_HINT = (
    "this server serves a classifier ({name}): use POST /v1/classify; chat, completions, responses and adapters "
    "need a server on a generative model (tuneloop serve --model <chat model or version>)"
)


@dataclass
class AdapterInfo:
    name: str
    path: str
    rank: int
    lora_id: int
    loaded_at: float
    in_flight: int = 0


class Engine:
    """One in-process vLLM engine over one base model; see module docstring."""

    def __init__(self, model_path: str | os.PathLike, settings: EngineSettings, served_name: str | None = None):
        self.model_path = Path(model_path).expanduser().resolve()
        self.settings = settings
        self.served_name = served_name or self.model_path.name
        self._llm: AsyncLLM | None = None
        self._tokenizer: Any = None
        self._defaults: dict[str, Any] = {}
        self._adapters: dict[str, AdapterInfo] = {}
        self._lora_requests: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._adapter_lock = asyncio.Lock()
        self._drained: dict[str, asyncio.Event] = {}
        self.max_model_len = settings.max_model_len
        self.started_at: float | None = None
        self.closing = False
        self._guard: subprocess.Popen[bytes] | None = None
        #: ``id2label`` in id order when the folder is a ``*ForSequenceClassification`` (a pooling engine)
        self.labels: list[str] | None = classifier_labels(self.model_path)

    @property
    def lora_enabled(self) -> bool:
        """Whether this engine serves LoRA adapters: ``engine.enable_lora``, a generative model, and a folder vLLM
        can put LoRA layers over here (:func:`tuneloop.runtime.lora_supported`)."""
        from tuneloop.runtime import lora_supported

        return self.settings.enable_lora and not self.is_classifier and lora_supported(self.model_path)

    @property
    def is_classifier(self) -> bool:
        """Whether this engine serves a sequence classifier (vLLM's pooling runner) rather than a generative model."""
        return self.labels is not None

    def _not_classifier(self) -> None:
        """Refuse a chat-only call on a classifier engine (400 ``model_is_classifier``)."""
        if self.is_classifier:
            raise EngineInputError(_CLASSIFIER_HINT.format(name=self.served_name), "model_is_classifier", None)

    # -- life cycle -------------------------------------------------------------
    def engine_args(self) -> AsyncEngineArgs:
        from vllm import AsyncEngineArgs
        from vllm.config import StructuredOutputsConfig

        from tuneloop.runtime import pick_dtype

        s = self.settings
        kw: dict[str, Any] = dict(
            model=str(self.model_path),
            served_model_name=self.served_name,
            dtype=pick_dtype(s.dtype, self.model_path),
            max_model_len=s.max_model_len,
            enforce_eager=s.enforce_eager,
            seed=s.seed,
            max_num_seqs=s.max_num_seqs,
            tensor_parallel_size=s.tensor_parallel_size,
            disable_log_stats=True,
            max_logprobs=20,
            structured_outputs_config=StructuredOutputsConfig(
                backend=cast(Any, s.structured_outputs_backend),  # vLLM validates the name
                disable_any_whitespace=s.compact_json and s.structured_outputs_backend in ("xgrammar", "guidance"),
            ),
        )
        from tuneloop.runtime import has_cuda

        if has_cuda():
            kw["gpu_memory_utilization"] = s.gpu_memory_utilization
        if self.is_classifier:  # vLLM's pooling runner: no sampling, no LoRA (adapters are merged into the folder)
            kw["runner"] = "pooling"
            kw.pop("max_logprobs")
            kw.pop("structured_outputs_config")
        elif self.lora_enabled:
            kw.update(
                enable_lora=True,
                max_lora_rank=s.max_lora_rank,
                max_loras=s.max_loras,
                max_cpu_loras=max(s.max_loras, 4 * s.max_loras),
                lora_target_modules=list(s.lora_target_modules) or None,
            )
        return AsyncEngineArgs(**kw)

    async def start(self) -> Engine:
        """Create the AsyncLLM (tens of seconds on CPU) in a worker thread, so a server that starts an extra
        engine (the classifier pool) keeps answering meanwhile."""
        from tuneloop.runtime import configure_vllm_env

        configure_vllm_env(self.settings)
        from vllm.v1.engine.async_llm import AsyncLLM

        args = self.engine_args()
        t0 = time.perf_counter()
        before = _child_pids()
        # vLLM's constructor blocks until the engine core has loaded the model. Built off the event loop, the
        # AsyncLLM starts its output handler lazily; start it here, on the loop, as a constructor on the loop
        # does, so an engine core that dies before the first request is still noticed.
        llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        if hasattr(llm, "_run_output_handler"):
            llm._run_output_handler()
        self._llm = llm
        self._tokenizer = llm.get_tokenizer()
        self.max_model_len = int(llm.model_config.max_model_len)
        try:
            self._defaults = dict(llm.model_config.get_diff_sampling_param() or {})
        except Exception:
            self._defaults = {}
        self.started_at = time.time()
        self._guard_children(_child_pids() - before)
        log.info(
            "engine ready in %.1f s: %s (served as %r)", time.perf_counter() - t0, self.model_path, self.served_name
        )
        return self

    @property
    def ready(self) -> bool:
        return self._llm is not None and not self.closing and not self._llm.errored

    async def check_health(self) -> None:
        if self._llm is None or self.closing:
            raise EngineUnavailable("engine is not running")
        await self._llm.check_health()

    def shutdown(self) -> None:
        self.closing = True
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
        if self._guard is not None and self._guard.stdin is not None:
            self._guard.stdin.close()  # the guard stops whatever engine process the shutdown left behind

    def _guard_children(self, pids: set[int]) -> None:
        """Start the guard that stops the engine's child ``pids`` when this process dies (see module doc)."""
        import subprocess
        import sys

        if not pids:  # engine core in this process
            return
        self._guard = subprocess.Popen(
            [sys.executable, "-c", _GUARD, *map(str, sorted(pids))], stdin=subprocess.PIPE, start_new_session=True
        )

    # -- prompts ------------------------------------------------------------------
    def _running(self) -> AsyncLLM:
        """The engine, or :class:`EngineUnavailable` when it is not running."""
        if self._llm is None or not self.ready:
            raise EngineUnavailable("engine is not running")
        return self._llm

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise EngineUnavailable("engine is not running")
        return self._tokenizer

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """Token ids of a chat prompt, rendered exactly as the trainer renders it (generation prompt added unless
        ``add_generation_prompt`` is false)."""
        self._not_classifier()
        try:
            ids = render_prompt(self.tokenizer, messages, tools, add_generation_prompt)
        except EngineInputError:
            raise
        except UserError as e:
            raise EngineInputError(str(e), "invalid_messages", "messages") from None
        except Exception as e:  # template errors (e.g. role order a template forbids)
            raise EngineInputError(
                f"could not render the messages with the model's chat template: {e}", "invalid_messages", "messages"
            ) from None
        if hasattr(ids, "get") and not isinstance(ids, list):  # BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def check_length(
        self, prompt_len: int, max_tokens: int | None, param: str = "max_tokens", prompt_param: str = "messages"
    ) -> int:
        """The completion budget for a prompt of ``prompt_len`` tokens; 400 if it does not fit the context."""
        room = self.max_model_len - prompt_len
        if room <= 0:
            raise EngineInputError(
                f"the prompt is {prompt_len} tokens; this model's context is {self.max_model_len} tokens "
                f"(prompt + completion). Shorten the prompt.",
                "context_length_exceeded",
                prompt_param,
            )
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise EngineInputError(
                f"{param}={max_tokens} plus the prompt's {prompt_len} tokens exceeds this model's context of "
                f"{self.max_model_len} tokens; ask for at most {room}.",
                "context_length_exceeded",
                param,
            )
        return max_tokens

    def sampling_params(self, p: GenParams, max_tokens: int, stream: bool = True) -> SamplingParams:
        """vLLM SamplingParams for ``p`` (model generation defaults for unset values); 400 on invalid values.

        ``stream=False`` (a client that wants the whole answer at once): the engine hands over the
        first token (so time to first token is still measured) and then only the rest at the end,
        instead of one output per token, which would cost this process CPU per token for nothing."""
        self._not_classifier()
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        kw: dict[str, Any] = {
            k: v
            for k, v in self._defaults.items()
            if k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
        }
        for k in (
            "temperature",
            "top_p",
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "logprobs",
            "prompt_logprobs",
            "top_k",
            "min_p",
            "repetition_penalty",
            "stop_token_ids",
            "logit_bias",
        ):
            v = getattr(p, k)
            if v is not None:
                kw[k] = v
        try:
            if p.structured:
                so = dict(p.structured)
                if isinstance(so.get("json"), dict | list):
                    # as JSON text: the engine core gets the request by msgpack, which cannot carry an integer
                    # outside 64 bits (a schema's "maximum": 1e30 written as an int would fail the request with a 500)
                    so["json"] = json.dumps(so["json"])
                kw["structured_outputs"] = StructuredOutputsParams(**so)
            sp = SamplingParams(
                n=p.n,
                max_tokens=max_tokens,
                stop=list(p.stop) or None,
                ignore_eos=p.ignore_eos,
                min_tokens=p.min_tokens,
                include_stop_str_in_output=p.include_stop_str_in_output,
                skip_special_tokens=p.skip_special_tokens,
                output_kind=RequestOutputKind.DELTA,
                stream_interval=None if stream else max_tokens + 1,
                **kw,
            )
            if p.structured or p.logit_bias or p.stop_token_ids:
                self._verify(sp)
            return sp
        except _client_errors() as e:
            raise EngineInputError(str(e).split("\n")[0], "invalid_parameter", getattr(e, "parameter", None)) from None

    def _verify(self, sp: SamplingParams) -> None:
        """vLLM's own request checks (structured-output schema and grammar, token ids) before the response
        starts, so a streamed request is refused with a 400 too, not with an error event after a 200."""
        llm = self._running()
        cfg = llm.vllm_config
        copy.deepcopy(sp).verify(
            llm.model_config, cfg.speculative_config, cfg.structured_outputs_config, self.tokenizer
        )

    # -- generation -------------------------------------------------------------------
    async def generate(
        self, prompt_ids: list[int], sampling_params: SamplingParams, request_id: str, adapter: str | None = None
    ) -> AsyncGenerator[Delta, None]:
        """Stream :class:`Delta` s of ``request_id``; closing/cancelling the iterator aborts it in the engine."""
        self._not_classifier()
        llm = self._running()
        from vllm.inputs import TokensPrompt

        lora = None
        info: AdapterInfo | None = None
        if adapter is not None:
            info = self._adapters.get(adapter)
            if info is None:
                raise AdapterError(f"adapter {adapter!r} is not loaded")
            lora = self._lora_requests[adapter]
            info.in_flight += 1
        k = sampling_params.logprobs  # None: no logprobs asked for
        want_prompt_lp = sampling_params.prompt_logprobs is not None
        prompt_lp_sent: set[int] = set()
        try:
            gen = llm.generate(
                TokensPrompt(prompt_token_ids=prompt_ids), sampling_params, request_id, lora_request=lora
            )
            try:
                async for out in gen:
                    for o in out.outputs:
                        plp = None
                        if want_prompt_lp and o.index not in prompt_lp_sent and out.prompt_logprobs is not None:
                            prompt_lp_sent.add(o.index)
                            plp = self._prompt_logprobs(prompt_ids, out.prompt_logprobs)
                        yield Delta(
                            o.index,
                            o.text,
                            len(o.token_ids),
                            o.finish_reason,
                            self._logprobs(o, k) if k is not None else None,
                            list(o.token_ids),
                            plp,
                        )
            except _client_errors() as e:  # validation inside vLLM (VLLMValidationError ...)
                raise EngineInputError(
                    str(e).split("\n")[0], "invalid_parameter", getattr(e, "parameter", None)
                ) from None
            finally:
                await gen.aclose()
        finally:
            if adapter is not None and info is not None:
                info.in_flight -= 1
                ev = self._drained.get(adapter)
                if info.in_flight == 0 and ev is not None:
                    ev.set()

    # -- classification ------------------------------------------------------------------
    def classify_ids(
        self,
        inputs: list[str] | list[list[int]],
        truncate_prompt_tokens: int | None = None,
        truncation_side: str | None = None,
        add_special_tokens: bool = True,
        param: str = "input",
    ) -> list[list[int]]:
        """Token ids of the inputs of a classify request (texts tokenized as vLLM's pooling serving does;
        token-id lists checked against the vocabulary), truncated to ``truncate_prompt_tokens`` (-1: the
        context; ``truncation_side`` ``left`` keeps the last tokens, ``right`` the first, default the
        tokenizer's); 400 for an empty input or one longer than the context."""
        if not self.is_classifier:
            raise EngineInputError(
                f"the served model {self.served_name!r} is not a classifier: /v1/classify needs a server on a "
                "*ForSequenceClassification folder or version (tuneloop serve --model <classifier>)",
                "model_not_classifier",
                "model",
            )
        limit = self.max_model_len
        if truncate_prompt_tokens is not None and truncate_prompt_tokens > limit:
            raise EngineInputError(
                f"truncate_prompt_tokens={truncate_prompt_tokens} is greater than this model's context of {limit} "
                "tokens",
                "invalid_parameter",
                "truncate_prompt_tokens",
            )
        keep = limit if truncate_prompt_tokens == -1 else truncate_prompt_tokens
        tok = self.tokenizer
        side = truncation_side or getattr(tok, "truncation_side", "right")
        size = 0
        out: list[list[int]] = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                ids = list(tok.encode(item, add_special_tokens=add_special_tokens))
            else:
                ids = list(item)
                size = size or len(tok)
                bad = [t for t in ids if t >= size]
                if bad:
                    raise EngineInputError(
                        f"{param}[{i}]: token id {bad[0]} is outside this model's vocabulary of {size}",
                        "invalid_tokens",
                        param,
                    )
            if keep is not None and len(ids) > keep:
                ids = ids[-keep:] if side == "left" else ids[:keep]
            if not ids:
                raise EngineInputError(f"{param}[{i}] is empty (no tokens)", "invalid_input", param)
            if len(ids) > limit:
                raise EngineInputError(
                    f"{param}[{i}] is {len(ids)} tokens; this model's context is {limit} tokens. Shorten it or "
                    "set truncate_prompt_tokens.",
                    "context_length_exceeded",
                    param,
                )
            out.append(ids)
        return out

    async def classify(
        self, prompts: list[list[int]], request_id: str, use_activation: bool | None = None
    ) -> list[ClassResult]:
        """Classify token-id prompts (see :meth:`classify_ids`) concurrently in the engine, one engine request
        ``<request_id>-<i>`` each, with vLLM's classify pooling params; cancelling aborts them."""
        from vllm import PoolingParams
        from vllm.inputs import tokens_input

        llm = self._running()
        labels = self.labels or []
        params = PoolingParams(task="classify", use_activation=use_activation)
        try:
            params.verify(llm.model_config)
        except _client_errors() as e:
            raise EngineInputError(str(e).split("\n")[0], "invalid_parameter", None) from None

        async def one(i: int, ids: list[int]) -> ClassResult:
            final = None
            # a rendered engine input, as vLLM's pooling serving passes: no second pass through the renderer
            async for out in llm.encode(tokens_input(ids), params, f"{request_id}-{i}"):
                final = out
            if final is None:  # pragma: no cover - the engine always finishes a pooling request with an output
                raise RuntimeError(f"no classification output for {request_id}-{i}")
            probs: list[float] = final.outputs.data.tolist()
            top = max(range(len(probs)), key=probs.__getitem__) if probs else -1
            return ClassResult(labels[top] if 0 <= top < len(labels) else None, probs, len(ids))

        if len(prompts) == 1:
            return [await one(0, prompts[0])]
        async with asyncio.TaskGroup() as tg:  # one failure cancels (aborts) the others
            tasks = [tg.create_task(one(i, p)) for i, p in enumerate(prompts)]
        return [t.result() for t in tasks]

    def _token_logprob(self, tid: int, step: dict[int, Any]) -> TokenLogprob:
        """The logprob of token ``tid`` and vLLM's alternatives at that step, decoded as vLLM's server does."""
        chosen = step.get(tid)

        def decoded(t: int, v: Any) -> str:
            return str(v.decoded_token) if v.decoded_token is not None else str(self.tokenizer.decode([t]))

        return TokenLogprob(
            token=decoded(tid, chosen) if chosen is not None else str(self.tokenizer.decode([tid])),
            logprob=_finite(chosen.logprob) if chosen is not None else -9999.0,
            top=[(decoded(t, v), _finite(v.logprob)) for t, v in step.items()],
        )

    def _logprobs(self, o: CompletionOutput, k: int) -> list[TokenLogprob]:
        return [self._token_logprob(tid, step or {}) for tid, step in zip(o.token_ids, o.logprobs or [])]

    def _prompt_logprobs(self, prompt_ids: list[int], steps: Any) -> list[TokenLogprob | None]:
        """Per prompt token: its logprob given the tokens before it (None for the first, as vLLM answers)."""
        return [None if step is None else self._token_logprob(tid, step) for tid, step in zip(prompt_ids, steps)]

    def detokenize(self, ids: list[int]) -> str:
        """Text of token ids; 400 for an id outside the vocabulary."""
        size = len(self.tokenizer)
        bad = [t for t in ids if t >= size]
        if bad:
            raise EngineInputError(
                f"token id {bad[0]} is outside this model's vocabulary of {size}", "invalid_tokens", "tokens"
            )
        return self.decode(ids)

    def decode(self, ids: list[int]) -> str:
        """Text of token ids (special tokens kept), as vLLM's server echoes a token prompt."""
        return str(self.tokenizer.decode(ids))

    # -- adapters -------------------------------------------------------------------
    def has_adapter(self, name: str) -> bool:
        return name in self._adapters

    def adapters(self) -> list[AdapterInfo]:
        return sorted(self._adapters.values(), key=lambda a: a.loaded_at)

    def validate_adapter(self, path: str | os.PathLike) -> dict[str, Any]:
        """Check ``adapter_config.json`` of ``path`` against this engine; return the config or raise :class:`AdapterError`."""
        p = Path(path).expanduser()
        if not p.is_dir():
            raise AdapterError(f"adapter folder {str(p)!r} does not exist")
        cfg_file = p / "adapter_config.json"
        if not cfg_file.is_file():
            raise AdapterError(f"{p} has no adapter_config.json: not a PEFT adapter folder")
        try:
            cfg = json.loads(cfg_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise AdapterError(f"{cfg_file}: unreadable adapter config: {e}") from None
        if not isinstance(cfg, dict):
            raise AdapterError(f"{cfg_file}: adapter config is not a JSON object")
        from tuneloop.registry import unservable_reason

        why = unservable_reason("adapter", str(p))  # one judge of what vLLM serves: not LoRA, or DoRA
        if why:
            raise AdapterError(f"{p} cannot be served: {why}")
        if self.is_classifier:
            raise AdapterError(_CLASSIFIER_HINT.format(name=self.served_name))
        if not self.settings.enable_lora:
            raise AdapterError("this server runs with engine.enable_lora=false")
        if not self.lora_enabled:
            raise AdapterError(
                f"{self.served_name} is a quantized model on CPU: vLLM's CPU int8/int4 kernels drop the weight "
                "tensors its LoRA layers need, so it serves no adapters; serve the unquantized base for adapters"
            )
        rank = cfg.get("r")
        if not isinstance(rank, int) or rank < 1:
            raise AdapterError(f"{cfg_file}: LoRA rank r={rank!r} is not a positive integer")
        if rank > self.settings.max_lora_rank:
            raise AdapterError(
                f"{p}: LoRA rank {rank} is above this server's engine.max_lora_rank={self.settings.max_lora_rank}; "
                f"restart with --set engine.max_lora_rank={_next_rank(rank)} to serve it"
            )
        base = cfg.get("base_model_name_or_path")
        if base and Path(base).expanduser().is_dir() and Path(base).expanduser().resolve() != self.model_path:  # noqa: SIM102
            if not _same_model(Path(base).expanduser().resolve(), self.model_path):
                raise AdapterError(f"{p} was trained on base model {base}, but this server serves {self.model_path}")
        outside = untargeted_modules(cfg, self.settings.lora_target_modules)
        if outside:
            raise AdapterError(
                f"{p}: this adapter trains {', '.join(outside)}, which this engine does not apply LoRA to "
                f"(engine.lora_target_modules); retrain without them (PEFT target_modules='all-linear' leaves "
                "lm_head out)"
            )
        if not any((p / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
            raise AdapterError(f"{p} has no adapter_model.safetensors / adapter_model.bin")
        return cfg

    async def add_adapter(self, name: str, path: str | os.PathLike) -> AdapterInfo:
        """Validate and load ``path`` under ``name`` (idempotent for the same path); raise :class:`AdapterError`."""
        from vllm.lora.request import LoRARequest

        llm = self._running()
        if self.is_classifier:
            raise AdapterError(_CLASSIFIER_HINT.format(name=self.served_name))
        if not name or name == self.served_name:
            raise AdapterError(f"adapter name {name!r} is empty or the base model's own name")
        async with self._adapter_lock:
            resolved = str(Path(path).expanduser().resolve())
            cur = self._adapters.get(name)
            if cur is not None:
                if cur.path == resolved:
                    return cur
                raise AdapterError(f"an adapter named {name!r} is already loaded from {cur.path}; unload it first")
            cfg = await asyncio.to_thread(self.validate_adapter, resolved)
            lora_id = next(self._ids)
            req = LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=resolved)
            try:
                ok = await llm.add_lora(req)
            except Exception as e:
                msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                raise AdapterError(f"adapter {resolved} does not load into this engine: {msg[:400]}") from None
            if ok is False:
                raise AdapterError(f"adapter {resolved} was refused by the engine")
            info = AdapterInfo(name=name, path=resolved, rank=int(cfg["r"]), lora_id=lora_id, loaded_at=time.time())
            self._lora_requests[name] = req
            self._adapters[name] = info
            return info

    async def remove_adapter(self, name: str, drain_timeout_s: float = 300.0) -> AdapterInfo:
        """Stop routing to ``name``, wait for its requests to finish, evict it from the engine."""
        async with self._adapter_lock:
            info = self._adapters.pop(name, None)
            if info is None:
                raise AdapterError(f"adapter {name!r} is not loaded")
            req = self._lora_requests.pop(name)
            if info.in_flight:
                ev = self._drained[name] = asyncio.Event()
                try:
                    await asyncio.wait_for(ev.wait(), drain_timeout_s)
                except TimeoutError:
                    log.warning(
                        "adapter %s: %d requests still running after %.0f s; evicting anyway",
                        name,
                        info.in_flight,
                        drain_timeout_s,
                    )
                finally:
                    self._drained.pop(name, None)
            if self._llm is not None:
                await self._llm.remove_lora(req.lora_int_id)
            return info


def _client_errors() -> tuple[type[BaseException], ...]:
    """Exceptions by which vLLM refuses a request's input (a 400, not a server error)."""
    from vllm.exceptions import VLLMClientError

    return (ValueError, TypeError, VLLMClientError)


def untargeted_modules(adapter_cfg: dict[str, Any], targets: list[str] | tuple[str, ...]) -> list[str]:
    """Modules an adapter trains (``target_modules``, ``modules_to_save``) that the engine's LoRA targets
    (``engine.lora_target_modules`` suffixes; empty = all) do not cover."""
    if not targets:
        return []
    mods = adapter_cfg.get("target_modules") or []
    if isinstance(mods, str):  # a regex or 'all-linear': PEFT resolved it to linear layers at training time
        mods = []
    mods = list(mods) + list(adapter_cfg.get("modules_to_save") or [])
    return sorted({m for m in mods if isinstance(m, str) and m.rsplit(".", 1)[-1] not in targets})


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


def supported_architectures() -> set[str]:
    """The model architectures (config.json ``architectures``) the installed vLLM's model registry serves."""
    from vllm.model_executor.models.registry import ModelRegistry

    return set(ModelRegistry.get_supported_archs())


def _next_rank(r: int) -> int:
    for c in (8, 16, 32, 64, 128, 256, 320, 512):
        if c >= r:
            return c
    return r


def _same_model(a: Path, b: Path) -> bool:
    """Two folders hold the same model when their config.json agree and their weight files have the same bytes (a
    copy or a moved cache). Sizes alone are not enough: every fine-tune of a base (a merged LoRA, a full fine-tune,
    another classifier head) has its config and its weight sizes, and serving one for the other is silently wrong."""
    try:
        if json.loads((a / "config.json").read_text()) != json.loads((b / "config.json").read_text()):
            return False
        fa, fb = _weight_files(a), _weight_files(b)
        if [(n, size) for n, size, _ in fa] != [(n, size) for n, size, _ in fb] or not fa:
            return False
        return _weights_digest(str(a), fa) == _weights_digest(str(b), fb)
    except (OSError, json.JSONDecodeError):
        return False


def _weight_files(d: Path) -> tuple[tuple[str, int, int], ...]:
    """(name, size, mtime_ns) of a folder's safetensors files, sorted: the key of a cached digest."""
    return tuple(sorted((f.name, (st := f.stat()).st_size, st.st_mtime_ns) for f in d.glob("*.safetensors")))


@functools.lru_cache(maxsize=64)
def _weights_digest(folder: str, files: tuple[tuple[str, int, int], ...]) -> str:
    """sha256 of a folder's weight files (a memo keyed by their names, sizes and mtimes: rewritten files re-hash)."""
    h = hashlib.sha256()
    for name, _, _ in files:
        with open(Path(folder) / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()
