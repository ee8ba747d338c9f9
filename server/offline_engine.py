"""Offline batch generation on vLLM for evaluation: the second (and last) module that imports vLLM.

Contract
--------
* :class:`OfflineGenerator` greedily generates answers for many prompts at once on
  an offline ``vllm.LLM`` built from :class:`tuneloop.settings.EngineSettings`
  (dtype via :func:`tuneloop.runtime.pick_dtype`, after
  :func:`tuneloop.runtime.configure_vllm_env`; ``tensor_parallel_size`` and
  ``gpu_memory_utilization`` as the server passes them), the same engine code the
  server uses, so the gate measures what production will serve.
* :meth:`OfflineGenerator.generate` takes a base-model folder, an optional PEFT LoRA
  adapter folder, prompts as token ids (rendered by the caller with the trainer's
  chat template) and a token budget; it returns the decoded answers, stopped at EOS,
  special tokens removed and whitespace stripped, in prompt order. An adapter goes
  in as a per-request ``LoRARequest``, so a base model and all its adapters share
  one engine; a new base folder, or an adapter of a higher rank than the engine
  was built for, replaces the engine.
* :meth:`OfflineGenerator.score` returns, per ``(token ids, mask)`` sequence, the summed negative log-likelihood
  of the tokens whose mask is 1 and their count, from vLLM's prompt logprobs (``prompt_logprobs=0``: the logprob of
  each prompt token given the ones before it) — the perplexity of reference answers as the engine computes it.
* :meth:`OfflineGenerator.supports` says whether a model can be generated here:
  a plain folder or a LoRA adapter. Other PEFT methods (prompt tuning, ...) cannot
  be served by vLLM; callers generate those another way.
* :meth:`OfflineGenerator.close` frees the engine (also on ``with`` exit).
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:  # pragma: no cover
    from vllm import LLM

    from tuneloop.settings import EngineSettings

log = logging.getLogger(__name__)
RANKS = (8, 16, 32, 64, 128, 256)
EVAL_BATCH = 128


def adapter_config(path: Path) -> dict[str, Any]:
    f = path / "adapter_config.json"
    return dict(json.loads(f.read_text())) if f.is_file() else {}


class OfflineGenerator:
    """Greedy batch generation on one offline vLLM engine at a time (see module docstring)."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self._llm: LLM | None = None
        self._base: Path | None = None
        self._rank = 0
        self._lora_ids: dict[Path, int] = {}
        self.start_s = 0.0

    def __enter__(self) -> OfflineGenerator:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @staticmethod
    def supports(adapter: Path | None) -> bool:
        if adapter is None:
            return True
        return str(adapter_config(adapter).get("peft_type", "")).upper() == "LORA"

    def _engine(self, base: Path, rank: int) -> LLM:
        base = base.resolve()
        if self._llm is not None and self._base == base and rank <= self._rank:
            return self._llm
        self.close()
        from tuneloop.runtime import configure_vllm_env, lora_supported, pick_dtype

        configure_vllm_env(self.settings)
        from vllm import LLM

        s = self.settings
        max_rank = next((r for r in RANKS if r >= max(rank, s.max_lora_rank)), max(rank, s.max_lora_rank))
        lora: dict[str, Any] = {}
        if lora_supported(base):  # not a quantized folder on CPU (tuneloop.runtime.lora_supported)
            lora = dict(
                enable_lora=True,
                max_lora_rank=max_rank,
                max_loras=s.max_loras,
                lora_target_modules=list(s.lora_target_modules) or None,  # as served (server/engine.py)
            )
        t0 = time.perf_counter()
        self._llm = LLM(
            model=str(base),
            dtype=cast(Any, pick_dtype(s.dtype, base)),  # a checked dtype name; vLLM's stub wants a Literal
            max_model_len=s.max_model_len,
            enforce_eager=s.enforce_eager,
            seed=s.seed,
            # a whole evaluation set is one batch: larger batches than serving's, measured 1.25x at 128 vs 64
            max_num_seqs=max(s.max_num_seqs, EVAL_BATCH),
            # the same placement as the online engine (server/engine.py): GPUs per replica and the share of GPU
            # memory vLLM may take (vLLM's CPU backend ignores the latter; its KV cache is VLLM_CPU_KVCACHE_SPACE)
            tensor_parallel_size=s.tensor_parallel_size,
            gpu_memory_utilization=s.gpu_memory_utilization,
            **lora,
        )
        self.start_s += time.perf_counter() - t0
        self._base, self._rank = base, max_rank
        log.info("offline engine ready in %.1f s: %s", time.perf_counter() - t0, base)
        return self._llm

    def generate(self, base: Path, adapter: Path | None, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        """Greedy answers to ``prompts`` (token ids) from ``base`` (+ LoRA ``adapter``), in order."""
        from vllm import SamplingParams, TokensPrompt
        from vllm.lora.request import LoRARequest

        if not self.supports(adapter):
            raise ValueError(f"{adapter} is not a LoRA adapter; vLLM cannot generate with it")
        from tuneloop.runtime import lora_supported

        if adapter is not None and not lora_supported(base):
            raise ValueError(f"{base} is a quantized model on CPU: vLLM applies no LoRA adapter to it")
        rank = int(adapter_config(adapter).get("r", 0)) if adapter is not None else 0
        llm = self._engine(base, rank)
        lora = None
        if adapter is not None:
            key = adapter.resolve()
            lora_id = self._lora_ids.setdefault(key, len(self._lora_ids) + 1)
            lora = LoRARequest(f"eval-{lora_id}", lora_id, str(key))
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, skip_special_tokens=True)
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, lora_request=lora, use_tqdm=False
        )
        return [o.outputs[0].text.strip() for o in outs]

    def score(self, base: Path, scored: list[tuple[list[int], list[int]]]) -> list[tuple[float, int]]:
        """(summed NLL of the masked tokens, their count) per sequence, from ``base``'s prompt logprobs."""
        from vllm import SamplingParams, TokensPrompt

        llm = self._engine(base, 0)
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids, _ in scored], params, use_tqdm=False)
        res = []
        for (ids, mask), o in zip(scored, outs):
            total, n = 0.0, 0
            for i, lp in enumerate(o.prompt_logprobs or []):
                if i == 0 or lp is None or not (i < len(mask) and mask[i]):
                    continue  # the first token has no context; unmasked tokens are the prompt
                total -= float(lp[ids[i]].logprob)
                n += 1
            res.append((total, n))
        return res

    def close(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # older/newer vLLM: dropping the object stops the engine too
                log.debug("engine core shutdown failed", exc_info=True)
            del llm
            gc.collect()
        self._base, self._rank, self._lora_ids = None, 0, {}
