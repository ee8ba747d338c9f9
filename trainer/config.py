"""Typed training configuration (``tuneloop train``'s keys).

Contract
--------
* :class:`TrainConfig` is a dataclass whose fields carry their help text in
  ``metadata["help"]`` (the TRL ``SFTConfig`` habit); :func:`load_train_config`
  builds it from an optional YAML file plus ``key=value`` overrides through
  :func:`tuneloop.config.build`, so an unknown key is a ``ConfigError`` that
  lists the valid keys, and a wrongly typed value names the key.
* :meth:`TrainConfig.validate` rejects combinations that cannot work (no
  dataset, a replay fraction without a replay dataset, packing together with
  padding-free ...) with a :class:`~tuneloop.errors.UserError`, before any model
  is loaded.
* Defaults are the fast path measured on CPU (docs/bench-train.md):
  ``padding_free=True`` without packing, float32 on CPU / bfloat16 on GPU,
  no gradient checkpointing, cosine schedule.
* Importing this module is cheap (no torch): the CLI uses it for ``--help``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tuneloop.config import build, load_yaml
from tuneloop.errors import UserError

METHODS = ("lora", "qlora", "full", "prompt_tuning", "dpo")
ADAPTER_METHODS = ("lora", "qlora", "prompt_tuning", "dpo")

# learning rates that work for each method when the user sets none
DEFAULT_LR = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5, "prompt_tuning": 3e-2, "dpo": 5e-5}


@dataclass
class LoraConfig:
    r: int = field(default=8, metadata={"help": "LoRA rank (the server's engine.max_lora_rank must be >= this to serve it)."})
    alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                               metadata={"help": "Module names that get LoRA matrices, e.g. [q_proj,v_proj] or all-linear."})


@dataclass
class TrainConfig:
    base: str = field(default="smollm2-135m-instruct", metadata={"help": "Base model: a known name (smollm2-135m-instruct), an HF folder, or a registered model version (its base and, for merged versions, its weights)."})
    dataset: str = field(default="", metadata={"help": "Training dataset: registered id (name@hash), name (newest) or dataset folder (required)."})
    name: str = field(default="", metadata={"help": "Name of the model version to register; empty = <dataset name>-<method>-<run id prefix>."})
    method: Literal["lora", "qlora", "full", "prompt_tuning", "dpo"] = field(default="lora", metadata={"help": "lora | qlora (4-bit nf4 base) | full | prompt_tuning | dpo (preference pairs, with a LoRA adapter)."})
    output_dir: str = field(default="", metadata={"help": "Run folder (checkpoints, adapter, loss history); empty = <home>/runs/<run id>. If it holds a checkpoint, training resumes from it."})
    parent_version: str = field(default="", metadata={"help": "Version this one continues from (lineage only); empty = none."})
    learning_rate: float | None = field(default=None, metadata={"help": "Peak learning rate; empty = method default (lora/qlora 2e-4, full 2e-5, prompt_tuning 3e-2, dpo 5e-5)."})
    lr_scheduler: str = field(default="cosine", metadata={"help": "Learning-rate schedule (transformers names: cosine, linear, constant, constant_with_warmup ...)."})
    warmup: float = field(default=0.0, metadata={"help": "Warm-up: a fraction of the steps if < 1, else a step count."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the training split (ignored when max_steps > 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps; -1 = run `epochs`."})
    batch_size: int = field(default=4, metadata={"help": "Examples per device per forward pass."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Forward passes per optimizer step (effective batch = batch_size x this x processes)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    optimizer: str = field(default="adamw_torch", metadata={"help": "Optimizer (transformers names: adamw_torch, adafactor, sgd, paged_adamw_8bit on GPU ...)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    max_seq_length: int = field(default=1024, metadata={"help": "Longest training sequence in tokens (prompt + completion); longer examples are truncated from the end."})
    packing: bool = field(default=False, metadata={"help": "Pack several examples into max_seq_length blocks (best-fit decreasing). Slower than padding_free on CPU."})
    padding_free: bool = field(default=True, metadata={"help": "Concatenate the batch into one sequence with no padding (1.5x tokens/s on CPU vs padded batches)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in the backward pass: less memory, ~30% slower."})
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(default="auto", metadata={"help": "auto = fp32 on CPU (bf16 is ~20x slower without bf16 instructions), bf16 on GPU."})
    seed: int = field(default=42, metadata={"help": "Random seed (data order, initialisation of adapters)."})
    replay_dataset: str = field(default="", metadata={"help": "A dataset mixed into training against forgetting (e.g. the previous version's dataset)."})
    replay_fraction: float = field(default=0.0, metadata={"help": "Share of the training rows drawn from replay_dataset (0..0.9); rows are marked origin=replay."})
    logging_steps: int = field(default=1, metadata={"help": "Record the loss every this many steps."})
    save_steps: int = field(default=50, metadata={"help": "Write a resumable checkpoint every this many steps."})
    save_total_limit: int = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    eval_at_end: bool = field(default=True, metadata={"help": "Compute the validation loss at the end (when the dataset has a validation split)."})
    dpo_beta: float = field(default=0.1, metadata={"help": "DPO: strength of the KL penalty towards the reference model."})
    prompt_tokens: int = field(default=16, metadata={"help": "prompt_tuning: number of virtual tokens."})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA adapter (lora, qlora, dpo)."})

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR[self.method]

    def validate(self) -> "TrainConfig":
        if not self.dataset:
            raise UserError("no dataset given: pass dataset=<id|name|folder> (see `tuneloop data list`)")
        if not self.base:
            raise UserError("no base model given: pass base=<name|folder|version>")
        if self.max_steps == 0 or (self.max_steps < 0 and self.epochs <= 0):
            raise UserError("nothing to train: set max_steps > 0 or epochs > 0")
        for key in ("batch_size", "gradient_accumulation_steps", "max_seq_length", "logging_steps", "save_steps", "prompt_tokens"):
            if getattr(self, key) < 1:
                raise UserError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.lora.r < 1:
            raise UserError(f"lora.r must be >= 1, got {self.lora.r}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise UserError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.replay_fraction <= 0.9:
            raise UserError(f"replay_fraction must be within 0..0.9, got {self.replay_fraction}")
        if self.replay_fraction > 0 and not self.replay_dataset:
            raise UserError("replay_fraction > 0 needs replay_dataset=<id|name|folder>")
        if self.packing and self.padding_free:
            # TRL's bfd packing is padding-free by construction; make the choice explicit
            self.padding_free = False
        if self.method == "prompt_tuning" and self.padding_free:
            # virtual tokens are prepended per example: a flattened batch would share one prefix
            self.padding_free = False
        return self


TOP_KEYS = tuple(f for f in TrainConfig.__dataclass_fields__)


def load_train_config(path: str | None, overrides: list[str] | None) -> TrainConfig:
    """``TrainConfig`` from an optional YAML file and ``key=value`` overrides (validated)."""
    return build(TrainConfig, load_yaml(path) if path else {}, overrides).validate()
