"""The PEFT methods tuneloop trains, the PEFT config each one builds, and how each is served.

Contract
--------
* :data:`METHODS` is the one table: a frozen :class:`PeftMethod` per SFT adapter
  method (``lora``, ``qlora``, ``dora``, ``adalora``, ``ia3``, ``loha``, ``lokr``,
  ``oft``, ``prompt_tuning``, ``prefix_tuning``) with its PEFT ``peft_type``, its
  config builder, the ``tuneloop train`` keys the builder reads, what trains, how
  the version is served and when to use it. docs/training.md ("Methods") renders it.
* ``serving`` is one of:

  - ``adapter``: a PEFT LoRA adapter vLLM hot-swaps per request (registered kind
    ``adapter``);
  - ``merged``: vLLM cannot load the adapter (``peft_type`` is not ``LORA``, or it is
    DoRA, which vLLM 0.32 refuses), but PEFT's ``merge_and_unload`` folds it into the
    base weights: :func:`tuneloop.trainer.train.train` merges it right after training
    with :func:`tuneloop.trainer.merge.merge_folder` (logit parity checked) and
    registers the merged folder (kind ``merged``); the raw adapter stays in the run
    folder (``model/``);
  - ``refused``: prompt learning (virtual tokens) neither loads in vLLM nor merges
    into weights; the version is registered as an ``adapter`` for offline evaluation
    (``tuneloop eval`` generates with transformers), and gate, canary and promote
    refuse it (:func:`tuneloop.registry.unservable_reason`).
* :func:`peft_config` builds the PEFT config of any training method (None for
  ``full``; DPO and KTO train a LoRA adapter). AdaLoRA needs the run's total steps:
  ``max_steps``, else the ``total_steps`` the caller computed from the epochs.
* :func:`trainer_callbacks` gives the callbacks a method needs in the training loop
  (AdaLoRA's rank allocation after each optimizer step).
* Importing this module is cheap (no torch, no peft): the CLI's help reads the table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from tuneloop.errors import UserError

if TYPE_CHECKING:
    from peft import PeftConfig

    from tuneloop.trainer.config import TrainConfig

Serving = Literal["adapter", "merged", "refused"]

LORA_KEYS = ("lora.r", "lora.alpha", "lora.dropout", "lora.targets")


@dataclass(frozen=True)
class PeftMethod:
    """One row of the methods table (see module doc)."""

    name: str
    peft_type: str
    """``peft_type`` in the adapter's ``adapter_config.json``."""
    build: Callable[[TrainConfig, int | None], PeftConfig]
    """``(cfg, total_steps) -> PeftConfig``; ``total_steps`` is the run's optimizer steps when known."""
    serving: Serving
    reason: str
    """Why it is served that way."""
    trainable: str
    """What trains (everything else stays frozen)."""
    reads: tuple[str, ...]
    """The ``tuneloop train`` keys the config builder reads."""
    when: str
    """When to pick it."""


def _targets(cfg: TrainConfig) -> Any:
    t: Any = list(cfg.lora.targets)
    return "all-linear" if t == ["all-linear"] else t


def _lora(cfg: TrainConfig, total_steps: int | None = None, dora: bool = False) -> PeftConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=_targets(cfg),
        task_type="CAUSAL_LM",
        bias="none",
        use_dora=dora,
    )


def _dora(cfg: TrainConfig, total_steps: int | None) -> PeftConfig:
    return _lora(cfg, total_steps, dora=True)


def adalora_steps(cfg: TrainConfig, total_steps: int | None) -> int:
    """AdaLoRA's ``total_step``: ``max_steps`` when set, else ``total_steps`` (UserError when neither is known)."""
    steps = cfg.max_steps if cfg.max_steps > 0 else (total_steps or 0)
    if steps < 1:
        raise UserError("method=adalora needs the number of training steps: set max_steps=")
    return steps


def _adalora(cfg: TrainConfig, total_steps: int | None) -> PeftConfig:
    from peft import AdaLoraConfig

    steps = adalora_steps(cfg, total_steps)
    return AdaLoraConfig(
        init_r=cfg.lora.r + cfg.lora.r // 2,  # start 1.5x wider, prune to lora.r (PEFT's default 12 -> 8)
        target_r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=_targets(cfg),
        total_step=steps,
        tinit=steps // 10,  # warm-up, budgeting, then a final phase at fixed ranks (PEFT's 10/70/20 example)
        tfinal=steps // 5,
        task_type="CAUSAL_LM",
    )


def _ia3(cfg: TrainConfig, total_steps: int | None) -> PeftConfig:
    from peft import IA3Config

    # target_modules=None: PEFT's per-architecture defaults (llama: k_proj, v_proj, down_proj; down_proj feed-forward)
    return IA3Config(task_type="CAUSAL_LM")


def _loha(cfg: TrainConfig, total_steps: int | None) -> PeftConfig:
    from peft import LoHaConfig

    return LoHaConfig(r=cfg.lora.r, alpha=cfg.lora.alpha, target_modules=_targets(cfg), task_type="CAUSAL_LM")


def _lokr(cfg: TrainConfig, total_steps: int | None) -> PeftConfig:
    from peft import LoKrConfig

    return LoKrConfig(r=cfg.lora.r, alpha=cfg.lora.alpha, target_modules=_targets(cfg), task_type="CAUSAL_LM")


def _oft(cfg: TrainConfig, total_steps: int | None) -> PeftConfig:
    from peft import OFTConfig

    # r blocks per layer (not a block size): each targeted layer's input width must be divisible by lora.r
    return OFTConfig(r=cfg.lora.r, oft_block_size=0, target_modules=_targets(cfg), task_type="CAUSAL_LM")


def _prompt_tuning(cfg: TrainConfig, total_steps: int | None) -> PeftConfig:
    from peft import PromptTuningConfig, PromptTuningInit, TaskType

    return PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=cfg.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.RANDOM,
    )


def _prefix_tuning(cfg: TrainConfig, total_steps: int | None) -> PeftConfig:
    from peft import PrefixTuningConfig, TaskType

    return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)


_VLLM_LORA = "vLLM loads PEFT LoRA adapters per request (LoRARequest): many versions share one engine"
_MERGE = "PEFT's merge_and_unload folds it into the base weights (parity-checked); served as a merged version"
_PROMPT_LEARNING = (
    "vLLM serves only LoRA adapters, and virtual tokens cannot be merged into weights: registered as an adapter "
    "for offline `tuneloop eval`, refused at gate, canary and promote"
)

METHODS: Mapping[str, PeftMethod] = MappingProxyType(
    {
        m.name: m
        for m in (
            PeftMethod(
                "lora", "LORA", _lora, "adapter", _VLLM_LORA,
                "LoRA A/B matrices (rank lora.r) on lora.targets",
                LORA_KEYS,
                "The default: cheap to train, hot-swapped without a restart, many versions on one engine.",
            ),
            PeftMethod(
                "qlora", "LORA", _lora, "adapter", _VLLM_LORA,
                "LoRA A/B matrices on a 4-bit (nf4) frozen base",
                LORA_KEYS,
                "The base does not fit in GPU memory in 16 bits (needs CUDA + bitsandbytes).",
            ),
            PeftMethod(
                "dora", "LORA", _dora, "merged",
                "vLLM 0.32 refuses DoRA adapters ('vLLM does not yet support DoRA'); " + _MERGE,
                "LoRA A/B matrices + one magnitude vector per target (weight-decomposed LoRA)",
                LORA_KEYS,
                "Closer to full fine-tuning than LoRA at the same rank; serving needs its own (merged) engine.",
            ),
            PeftMethod(
                "adalora", "ADALORA", _adalora, "merged",
                "vLLM serves peft_type LORA only (AdaLoRA's SVD form with per-layer ranks is not); " + _MERGE,
                "SVD-form low-rank updates (P, Lambda, Q) starting at rank 1.5 x lora.r, pruned to lora.r",
                (*LORA_KEYS, "max_steps"),
                "Unsure which layers need rank: the rank budget moves to the matrices that matter during training.",
            ),
            PeftMethod(
                "ia3", "IA3", _ia3, "merged",
                "vLLM serves LoRA adapters only; " + _MERGE,
                "One scaling vector per k_proj, v_proj and down_proj input (the fewest parameters)",
                (),
                "Very little data or a tiny budget: learned rescaling of activations, ~0.01% of the weights.",
            ),
            PeftMethod(
                "loha", "LOHA", _loha, "merged",
                "vLLM serves LoRA adapters only; " + _MERGE,
                "Hadamard product of two rank-lora.r pairs per target (LyCORIS LoHa)",
                ("lora.r", "lora.alpha", "lora.targets"),
                "More expressive than LoRA for the same parameter count (higher effective rank).",
            ),
            PeftMethod(
                "lokr", "LOKR", _lokr, "merged",
                "vLLM serves LoRA adapters only; " + _MERGE,
                "Kronecker-product factors per target (LyCORIS LoKr), low-rank at lora.r",
                ("lora.r", "lora.alpha", "lora.targets"),
                "Very few parameters for large matrices, with more structure than IA3.",
            ),
            PeftMethod(
                "oft", "OFT", _oft, "merged",
                "vLLM serves LoRA adapters only; " + _MERGE,
                "A block-diagonal orthogonal rotation (lora.r blocks) of each target's input",
                ("lora.r", "lora.targets"),
                "Keep the base model's knowledge intact (rotations preserve neuron angles): style or domain tuning.",
            ),
            PeftMethod(
                "prompt_tuning", "PROMPT_TUNING", _prompt_tuning, "refused", _PROMPT_LEARNING,
                "num_virtual_tokens soft-prompt embeddings prepended to the input",
                ("num_virtual_tokens",),
                "Cheap experiments evaluated offline; train lora (or dora) for a version to serve.",
            ),
            PeftMethod(
                "prefix_tuning", "PREFIX_TUNING", _prefix_tuning, "refused", _PROMPT_LEARNING,
                "num_virtual_tokens key/value prefixes in every attention layer",
                ("num_virtual_tokens",),
                "Research comparisons evaluated offline; train lora (or dora) for a version to serve.",
            ),
        )
    }
)  # fmt: skip
"""Every SFT adapter method, in the order the docs list them."""

MERGED_METHODS = tuple(n for n, m in METHODS.items() if m.serving == "merged")
"""Methods merged into full weights right after training (registered kind ``merged``)."""


def serving(method: str) -> Serving:
    """How a version trained with ``method`` is served (``full`` is a merged folder; dpo/kto are LoRA adapters)."""
    if method in METHODS:
        return METHODS[method].serving
    return "merged" if method == "full" else "adapter"


def registered_kind(method: str) -> str:
    """The :class:`~tuneloop.registry.ModelVersion` kind a run of ``method`` registers: ``merged`` or ``adapter``."""
    return "merged" if serving(method) == "merged" else "adapter"


def is_prompt_learning(method: str) -> bool:
    """Virtual-token methods: their inputs grow by ``num_virtual_tokens``, so batches cannot be padding-free."""
    return method in ("prompt_tuning", "prefix_tuning")


def peft_config(cfg: TrainConfig, total_steps: int | None = None) -> PeftConfig | None:
    """The PEFT config ``cfg.method`` trains with; None for ``full``. DPO and KTO train a LoRA adapter.

    ``total_steps``: the run's optimizer steps when ``max_steps`` is not set (AdaLoRA schedules its rank
    budget over them)."""
    if cfg.method == "full":
        return None
    m = METHODS.get(cfg.method, METHODS["lora"])
    return m.build(cfg, total_steps)


def trainer_callbacks(method: str) -> list[Any]:
    """Transformers ``TrainerCallback`` objects ``method`` needs in the training loop (AdaLoRA: rank allocation)."""
    if method != "adalora":
        return []
    from transformers import TrainerCallback

    class AdaLoraAllocation(TrainerCallback):
        """AdaLoRA's ``update_and_allocate`` after each optimizer step, before the gradients are zeroed
        (PEFT's training-loop contract; transformers' Trainer does not call it)."""

        def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            peft_model = getattr(model, "base_model", None)
            if peft_model is not None and hasattr(peft_model, "update_and_allocate"):
                peft_model.update_and_allocate(state.global_step)

    return [AdaLoraAllocation()]


def methods_table() -> str:
    """The methods table as Markdown (method | trainable parameters | how it is served | when to use)."""
    lines = ["| method | trainable parameters | how it is served | when to use |", "|---|---|---|---|"]
    for m in METHODS.values():
        how = {"adapter": "LoRA adapter, hot-swapped", "merged": "merged into full weights", "refused": "refused"}
        lines.append(f"| `{m.name}` | {m.trainable} | {how[m.serving]}: {m.reason} | {m.when} |")
    return "\n".join(lines)
