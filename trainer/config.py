"""Typed training configuration (``tuneloop train``'s keys).

Contract
--------
* :class:`TrainConfig` is a dataclass whose fields carry their help text in
  ``metadata["help"]`` (the TRL ``SFTConfig`` habit); ``tuneloop train`` builds
  it from an optional YAML file plus ``key=value`` overrides through
  :func:`tuneloop.config.build`, so an unknown key is a ``ConfigError`` that
  lists the valid keys, and a wrongly typed value names the key.
* :func:`kto_weights` sets KTO's desirable/undesirable loss weights from the
  label counts (0 = automatic), correcting label imbalance as TRL recommends.
* :meth:`TrainConfig.validate` rejects combinations that cannot work (no
  dataset, nothing to train, a replay fraction without a replay dataset, a
  non-positive batch size or learning rate ...) with a :class:`~tuneloop.errors.UserError`, before any model
  is loaded.
* Defaults are the fast path measured on CPU (docs/bench-train.md):
  ``padding_free=True`` without packing, float32 on CPU / bfloat16 on GPU,
  no gradient checkpointing, cosine schedule.
* ``report_to`` names experiment trackers transformers reports to besides the
  ``runs`` table (:data:`TRACKERS`); :meth:`TrainConfig.validate` refuses an
  unknown name (listing the valid ones) and a tracker whose package is not
  installed (naming the package to ``pip install``), before any model is loaded.
* Importing this module is cheap (no torch): the CLI uses it for ``--help``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal

from tuneloop.errors import UserError

ADAPTER_METHODS = ("lora", "qlora", "prompt_tuning", "dpo", "kto")
SFT_METHODS = ("lora", "qlora", "full", "prompt_tuning")
PEFT_METHODS = ("prefix_tuning", "ia3", "loha", "lokr", "oft", "adalora", "dora")
"""PEFT methods beyond LoRA (:mod:`tuneloop.trainer.peft_methods` builds their configs and says how each is served)."""
CLASSIFICATION_METHODS = ("feature_extraction", "lora", "full")
"""Methods of ``task=classification`` (a sequence-classification head on the base)."""
TASKS = ("chat", "classification")
KTO_RATIO = (1.0, 4 / 3)
"""TRL's recommended range of desirable_weight * n_desirable / (undesirable_weight * n_undesirable) (KTO paper, eq. 8)."""
TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "trackio": "trackio", "wandb": "wandb"}
"""``report_to`` values -> the module transformers needs to report there."""
TRACKER_PACKAGES = {"mlflow": "mlflow-skinny"}
"""The distribution to ``pip install`` where it is not the module's name (the small MLflow client is pinned)."""


@dataclass
class LoraConfig:
    r: int = field(
        default=8, metadata={"help": "LoRA rank (the server's engine.max_lora_rank must be >= this to serve it)."}
    )
    alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "Module names that get LoRA matrices, e.g. [q_proj,v_proj] or all-linear."},
    )


@dataclass
class TrainConfig:
    base: str = field(
        default="smollm2-135m-instruct",
        metadata={
            "help": "Base model: a known name (smollm2-135m-instruct), an HF folder, or a registered model version (merged versions give their weights, adapters their base)."
        },
    )
    dataset: str = field(
        default="",
        metadata={
            "help": "Training dataset: registered id (name@hash), name (newest) or dataset folder (this or datasets is required)."
        },
    )
    datasets: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Multi-task mix instead of one dataset: weighted datasets of the same kind, e.g. "
            "datasets=support:0.7,billing:0.3 (weights are shares of the training rows; the data card records the mix)."
        },
    )
    name: str = field(
        default="", metadata={"help": "Name of the model version to register; empty = <dataset>-<method>-<UTC time>."}
    )
    task: Literal["chat", "classification"] = field(
        default="chat",
        metadata={
            "help": "chat (a generative model, SFT/DPO/KTO) | classification (a sequence-classification head "
            "trained on {text, label} rows; methods feature_extraction, lora, full)."
        },
    )
    method: Literal[
        "lora",
        "qlora",
        "full",
        "prompt_tuning",
        "dpo",
        "kto",
        "prefix_tuning",
        "ia3",
        "loha",
        "lokr",
        "oft",
        "adalora",
        "dora",
        "feature_extraction",
    ] = field(
        default="lora",
        metadata={
            "help": "lora | qlora (4-bit nf4 base) | full | prompt_tuning | dpo (preference pairs, with a LoRA adapter) "
            "| kto (thumbs-up/down rows, prompt/completion/label, with a LoRA adapter) | prefix_tuning | ia3 | loha "
            "| lokr | oft | adalora | dora (PEFT methods; see docs/training.md for how each is served) "
            "| feature_extraction (task=classification: body frozen, only the head trains)."
        },
    )
    output_dir: str = field(
        default="", metadata={"help": "Run folder (checkpoints, model/, loss history); empty = <home>/runs/<name>."}
    )
    resume: bool = field(
        default=True, metadata={"help": "Resume from the last checkpoint in output_dir when there is one."}
    )
    parent: str = field(
        default="", metadata={"help": "Model version this one continues from (lineage: parent_version); empty = none."}
    )
    init_adapter: str = field(
        default="",
        metadata={
            "help": "Start from this LoRA adapter (a registered adapter version or an adapter folder on the same base) "
            "instead of a fresh one: continued training keeps what it learned, and its own LoRA shape is used "
            "(lora.* is ignored). lora/qlora/dpo/kto only; empty = a fresh adapter."
        },
    )
    learning_rate: float = field(
        default=2e-4,
        metadata={
            "help": "Peak learning rate (2e-4 suits LoRA; use ~2e-5 for full, ~3e-2 for prompt_tuning, ~5e-5 for dpo and kto)."
        },
    )
    lr_scheduler_type: str = field(
        default="cosine",
        metadata={
            "help": "Learning-rate schedule (transformers names: cosine, linear, constant, constant_with_warmup ...)."
        },
    )
    warmup_ratio: float = field(
        default=0.0, metadata={"help": "Share of the steps spent warming up the learning rate (0..1)."}
    )
    num_train_epochs: float = field(
        default=1.0, metadata={"help": "Passes over the training split (ignored when max_steps > 0)."}
    )
    max_steps: int = field(
        default=-1, metadata={"help": "Stop after this many optimizer steps; -1 = run num_train_epochs."}
    )
    batch_size: int = field(
        default=4, metadata={"help": "Examples per device per forward pass (kto: >= 2, its KL estimate needs a batch)."}
    )
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "Forward passes per optimizer step (effective batch = batch_size x this x processes)."},
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    optim: str = field(
        default="adamw_torch",
        metadata={"help": "Optimizer (transformers names: adamw_torch, adafactor, sgd, paged_adamw_8bit on GPU ...)."},
    )
    max_seq_length: int = field(
        default=1024,
        metadata={
            "help": "Longest training sequence in tokens (prompt + completion); longer examples lose their oldest prompt tokens."
        },
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack several examples into max_seq_length blocks (best-fit decreasing). Slower than padding_free on CPU."
        },
    )
    padding_free: bool = field(
        default=True,
        metadata={
            "help": "Concatenate each batch into one sequence with no padding (1.5x tokens/s on CPU vs padded batches)."
        },
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass: less memory, ~30% slower."}
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(
        default="auto",
        metadata={"help": "auto = fp32 on CPU (bf16 is ~20x slower without bf16 instructions), bf16 on GPU."},
    )
    seed: int = field(default=42, metadata={"help": "Random seed (data order, adapter initialisation)."})
    replay_dataset: str = field(
        default="",
        metadata={"help": "A dataset mixed into training against forgetting (e.g. the previous version's dataset)."},
    )
    replay_fraction: float = field(
        default=0.0, metadata={"help": "Share of the training rows drawn from replay_dataset (0..0.9)."}
    )
    logging_steps: int = field(default=1, metadata={"help": "Record the loss every this many steps."})
    save_steps: int = field(
        default=50, metadata={"help": "Write a resumable checkpoint every this many steps (0 = never)."}
    )
    save_total_limit: int = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    eval_steps: int = field(
        default=0, metadata={"help": "Validation loss every this many steps (0 = only at the end)."}
    )
    dpo_beta: float = field(
        default=0.1, metadata={"help": "dpo: strength of the KL penalty towards the reference model."}
    )
    kto_beta: float = field(
        default=0.1, metadata={"help": "kto: strength of the KL penalty towards the reference model."}
    )
    kto_desirable_weight: float = field(
        default=0.0,
        metadata={
            "help": "kto: weight of the desirable (label true) losses; 0 = automatic, so that desirable_weight x "
            "n_desirable / (undesirable_weight x n_undesirable) lies in [1, 4/3] (TRL's recommendation): the "
            "minority label is weighted up."
        },
    )
    kto_undesirable_weight: float = field(
        default=0.0,
        metadata={
            "help": "kto: weight of the undesirable (label false) losses; 0 = automatic (see kto_desirable_weight)."
        },
    )
    report_to: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Experiment trackers to report the run to, besides the runs table: tensorboard (event files in "
            "<output_dir>/tensorboard), mlflow (MLFLOW_TRACKING_URI, default sqlite:///<home>/mlflow.db; experiment "
            "tuneloop, run name = run id), trackio, wandb (project tuneloop); e.g. report_to=tensorboard,mlflow. Each "
            "needs its package installed. Empty (default) = none."
        },
    )
    num_virtual_tokens: int = field(
        default=16, metadata={"help": "prompt_tuning, prefix_tuning: number of virtual tokens."}
    )
    class_balance: Literal["none", "weights", "sampling"] = field(
        default="none",
        metadata={
            "help": "task=classification, imbalanced labels: weights (loss weighted by inverse label frequency) "
            "| sampling (balanced batches) | none."
        },
    )
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA adapter (lora, qlora, dpo, kto)."})

    def validate(self) -> TrainConfig:
        if not self.dataset and not self.datasets:
            raise UserError("no dataset given: pass dataset=<id|name|folder> (see `tuneloop data list`)")
        if self.dataset and self.datasets:
            raise UserError("pass dataset= or datasets= (a weighted mix), not both")
        if self.task == "classification" and self.method not in CLASSIFICATION_METHODS:
            raise UserError(
                f"task=classification trains with method={' | '.join(CLASSIFICATION_METHODS)}, got method={self.method}"
            )
        if self.class_balance != "none" and self.task != "classification":
            raise UserError(f"class_balance={self.class_balance} balances class labels: it needs task=classification")
        if self.method == "feature_extraction" and self.task != "classification":
            raise UserError("method=feature_extraction trains a classification head: set task=classification")
        if not self.base:
            raise UserError("no base model given: pass base=<name|folder|version>")
        if self.max_steps == 0 or (self.max_steps < 0 and self.num_train_epochs <= 0):
            raise UserError("nothing to train: set max_steps > 0 or num_train_epochs > 0")
        for key in (
            "batch_size",
            "gradient_accumulation_steps",
            "max_seq_length",
            "logging_steps",
            "num_virtual_tokens",
        ):
            if getattr(self, key) < 1:
                raise UserError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("save_steps", "eval_steps", "save_total_limit"):
            if getattr(self, key) < 0:
                raise UserError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.lora.r < 1:
            raise UserError(f"lora.r must be >= 1, got {self.lora.r}")
        if self.learning_rate <= 0:
            raise UserError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise UserError(f"warmup_ratio must be within [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.replay_fraction <= 0.9:
            raise UserError(f"replay_fraction must be within 0..0.9, got {self.replay_fraction}")
        if self.replay_fraction > 0 and not self.replay_dataset:
            raise UserError("replay_fraction > 0 needs replay_dataset=<id|name|folder>")
        if self.method == "kto" and self.batch_size < 2:
            raise UserError(
                f"method=kto needs batch_size >= 2 (its KL term is estimated within a batch), got {self.batch_size}"
            )
        for key in ("kto_desirable_weight", "kto_undesirable_weight"):
            if getattr(self, key) < 0:
                raise UserError(f"{key} must be >= 0 (0 = automatic), got {getattr(self, key)}")
        for key in ("dpo_beta", "kto_beta"):
            if getattr(self, key) <= 0:
                raise UserError(f"{key} must be > 0, got {getattr(self, key)}")
        self.report_to = check_trackers(self.report_to)
        return self


def check_trackers(names: list[str]) -> list[str]:
    """``names`` without duplicates (``none`` = no tracker), or a UserError naming an unknown tracker (and the
    valid ones) or the package to install for a tracker whose package is missing."""
    wanted: list[str] = []
    for name in names:
        n = str(name).strip().lower()
        if n in ("", "none") or n in wanted:
            continue
        if n not in TRACKERS:
            raise UserError(f"report_to: unknown tracker {name!r}; valid: {', '.join(TRACKERS)} (or none)")
        wanted.append(n)
    for n in wanted:
        if importlib.util.find_spec(TRACKERS[n]) is None:
            raise UserError(
                f"report_to={n} needs the {TRACKERS[n]} package, which is not installed: "
                f"pip install {TRACKER_PACKAGES.get(n, TRACKERS[n])}"
            )
    return wanted


def kto_weights(
    n_desirable: int, n_undesirable: int, desirable: float = 0.0, undesirable: float = 0.0
) -> tuple[float, float]:
    """``(desirable_weight, undesirable_weight)`` for KTO on this many rows of each label.

    A weight > 0 is used as given; a weight of 0 is automatic. Automatic weights make the
    ratio ``desirable_weight * n_desirable / (undesirable_weight * n_undesirable)`` land in
    :data:`KTO_RATIO` ([1, 4/3], TRL's recommendation from the KTO paper): they stay 1 when
    the ratio already does, else the weight of the minority label is raised (or, when only
    one weight is automatic, that one is set) so the ratio is the middle of the range, 7/6.
    Both counts must be >= 1.
    """
    if n_desirable < 1 or n_undesirable < 1:
        raise UserError(
            f"KTO needs desirable and undesirable rows, got {n_desirable} desirable and {n_undesirable} undesirable"
        )
    lo, hi = KTO_RATIO
    mid = (lo + hi) / 2
    d = desirable if desirable > 0 else 1.0
    u = undesirable if undesirable > 0 else 1.0
    ratio = d * n_desirable / (u * n_undesirable)
    if (desirable > 0 and undesirable > 0) or lo <= ratio <= hi:
        return d, u
    if desirable > 0:  # only the undesirable weight is free
        return d, round(ratio / mid, 6)
    if undesirable > 0 or ratio < lo:  # the desirable weight is free (and, when both are, desirable is the minority)
        return round(d * mid / ratio, 6), u
    return d, round(ratio / mid, 6)  # both free, undesirable is the minority
