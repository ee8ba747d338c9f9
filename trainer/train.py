"""Fine-tune a model with TRL + PEFT and register the result as a model version.

Contract
--------
``train(cfg, db, settings, progress=True) -> TrainResult(run_id, version, output_path, metrics)``

* Methods (``cfg.method``): ``lora`` (PEFT LoRA), ``qlora`` (base loaded 4-bit
  nf4 with bitsandbytes + LoRA), ``full`` (all weights), ``prompt_tuning``
  (PEFT prompt tuning), all through TRL's ``SFTTrainer``; ``dpo`` (TRL
  ``DPOTrainer`` with a LoRA adapter) on a preference dataset; ``kto`` (TRL
  ``KTOTrainer`` with a LoRA adapter) on a kto dataset (prompt / completion /
  label rows, :mod:`tuneloop.dataset_store`). KTO's ``desirable_weight`` and
  ``undesirable_weight`` come from :func:`~tuneloop.trainer.config.kto_weights`
  on the label counts of the final train split (replay included), unless set;
  both, and the counts, are recorded in the metrics and in the run config's
  ``kto_effective``. A kto run
  may replay an SFT dataset (``replay_dataset``): its rows join as desirable.
  KTO's KL estimate pairs each row with its batch neighbours in data order,
  so the train split is shuffled (seeded) first.
* SFT rows are tokenized with :func:`tuneloop.chat.training_example`: the
  server's prompt rendering (the row's ``tools`` included) + the answer + EOS,
  loss on the answer only (train/serve parity). Default batches are
  padding-free (no packing). DPO/KTO rows hand their ``tools`` column (JSON
  text) to TRL, which renders it with the chat template.
* Precision by device: fp32 on CPU, bf16 on GPU (``precision=auto``).
* The run lives in ``output_dir`` (default ``<home>/runs/<name>``): ``run.json``
  (run id, name), checkpoints, ``model/`` (the adapter or the full model +
  tokenizer), ``loss.json`` (+ ``loss.png`` when matplotlib is installed).
  A checkpoint in ``output_dir`` resumes the same run (same run id) unless
  ``resume=false``. SIGTERM / Ctrl-C stop after the current step with a
  checkpoint (run recorded ``failed``, KeyboardInterrupt raised: CLI exit 130).
* ``cfg.report_to`` also reports the run to experiment trackers (transformers'
  integrations): TensorBoard event files in ``<output_dir>/tensorboard``;
  MLflow to ``MLFLOW_TRACKING_URI`` (default a file store ``<home>/mlruns``),
  experiment ``tuneloop`` (``MLFLOW_EXPERIMENT_NAME`` wins), run name = the run
  id; W&B project ``tuneloop`` (``WANDB_PROJECT`` wins) and Trackio project
  ``tuneloop``, run name = the run id. Where is recorded in ``runs.tracking``
  (JSON, e.g. ``{"tensorboard": "<abs dir>"}``) when the run starts.
* Every run is a ``runs`` row (``failed`` with the error when it fails or is
  interrupted) and every success registers a :class:`ModelVersion` (kind
  ``adapter`` for lora/qlora/prompt_tuning/dpo/kto, ``merged`` for full) with
  parent, dataset id, run id and content hash. Bad input raises
  :class:`~tuneloop.errors.UserError` before anything is written. Both are
  written through :mod:`tuneloop.registry` (portable SQL: a DuckDB file or a
  shared PostgreSQL); their metrics are stored as strict JSON (a NaN or
  infinite value, e.g. a diverged loss, as null), which PostgreSQL requires;
  ``TrainResult.metrics`` keeps the values as computed.

This module is the run itself (trainer set-up, signals, checkpoints, metrics,
registration); what the run reads (base model, dataset, replay, tokenization)
is :mod:`tuneloop.trainer.inputs`, and the loss files and table it leaves are
:mod:`tuneloop.trainer.history`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from tuneloop.chat import Tokenizer
from tuneloop.config import to_dict
from tuneloop.errors import UserError
from tuneloop.trainer.config import ADAPTER_METHODS, TrainConfig, kto_weights
from tuneloop.trainer.history import loss_table, write_loss_history
from tuneloop.trainer.inputs import load_dataset_ref, mix_replay, resolve_base_model, tokenize_sft

if TYPE_CHECKING:
    from contextlib import AbstractContextManager
    from types import FrameType

    from datasets import Dataset, DatasetDict
    from peft import PeftConfig
    from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_utils import TrainOutput

    from tuneloop.db import Database
    from tuneloop.registry import ModelVersion
    from tuneloop.settings import Settings

TRACKING_PROJECT = "tuneloop"
"""MLflow experiment, W&B and Trackio project of every tracked run."""


@dataclass
class TrainResult:
    run_id: str
    version: ModelVersion
    output_path: str
    metrics: dict[str, Any] = field(default_factory=dict)


def result_text(res: TrainResult, as_json: bool = False) -> str:
    """What ``tuneloop train`` prints for a finished run: a summary line and the model folder, or JSON."""
    if as_json:
        return json.dumps(
            {
                "run_id": res.run_id,
                "version": res.version.name,
                "kind": res.version.kind,
                "path": res.output_path,
                "metrics": res.metrics,
            },
            indent=2,
            default=str,
        )
    m = res.metrics
    tps = f", {m['tokens_per_s']:.1f} tokens/s" if m.get("tokens_per_s") else ""
    fl = f"{m['final_loss']:.4f}" if m.get("final_loss") is not None else "n/a"
    return (
        f"registered {res.version.name} ({res.version.kind}) from run {res.run_id}: {m.get('steps')} steps, "
        f"final loss {fl}{tps}\n  {res.output_path}"
    )


class GracefulStop:
    """Trainer callback: on SIGTERM/SIGINT finish the current step, save a checkpoint and stop.

    A pre-empted or Ctrl-C'd run therefore always leaves a resumable checkpoint;
    a second signal interrupts immediately.
    """

    requested: bool = False

    def __new__(cls) -> GracefulStop:
        from transformers import TrainerCallback

        # subclass TrainerCallback lazily (transformers is heavy to import for the CLI's --help)
        sub = type("GracefulStopCallback", (cls, TrainerCallback), {"__new__": object.__new__})
        obj: GracefulStop = object.__new__(sub)
        obj.requested = False
        return obj

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> TrainerControl:
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
        return control

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        import sys

        print(
            "\nstopping after this step (saving a checkpoint); signal again to abort now", file=sys.stderr, flush=True
        )

    def signals(self) -> AbstractContextManager[None]:
        import contextlib
        import signal
        import threading

        @contextlib.contextmanager
        def cm() -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

        return cm()


# ---- the run ------------------------------------------------------------------------------------


def default_name(cfg: TrainConfig) -> str:
    """``<dataset stem>-<method>-<UTC timestamp>``: the version name when ``name=`` is not given."""
    stem = Path(cfg.dataset).name.split("@")[0] or "model"
    return f"{stem}-{cfg.method}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


def _precision(cfg: TrainConfig) -> str:
    from tuneloop.runtime import has_cuda

    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if has_cuda() else "fp32"


def last_checkpoint(out: Path) -> str | None:
    """The newest ``checkpoint-*`` folder in the run folder ``out``, or None (also when ``out`` does not exist)."""
    if not out.is_dir():
        return None
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(out))


def train(
    cfg: TrainConfig,
    db: Database,
    settings: Settings,
    progress: bool = True,
    record: bool = True,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Train, save, record the run and register the version (see module doc).

    ``record=False`` (a distributed rank > 0): ``db`` is only read (base, dataset and adapter look-ups);
    no run row, no ``run.json`` and no version are written, and the returned version is not registered.
    ``callbacks``: extra transformers ``TrainerCallback`` objects for this run's trainer (``tuneloop tune``
    reports evaluations to Optuna and stops pruned trials with one)."""
    from tuneloop.registry import RegistryError, finish_run, get_version, start_run

    cfg.validate()
    cfg.name = cfg.name or default_name(cfg)
    try:
        get_version(db, cfg.name)
        raise UserError(f"model version {cfg.name!r} already exists; pick another name=")
    except RegistryError:
        pass
    out = Path(cfg.output_dir) if cfg.output_dir else settings.paths.home_path / "runs" / cfg.name
    resume_from = last_checkpoint(out) if cfg.resume else None
    run_file = out / "run.json"
    run_id = _resumed_run_id(db, run_file, cfg) if resume_from and record else None
    if record and cfg.report_to:  # trackers name the run after its id: pick it now
        from tuneloop.ids import new_id

        run_id = run_id or new_id()
    base = resolve_base_model(db, settings, cfg.base)
    init = _init_adapter(db, cfg, base)
    dd, ds_id, kind = _load_dataset(db, cfg.dataset)
    if cfg.method == "dpo" and kind != "preference":
        raise UserError(f"method=dpo needs a preference dataset (prompt/chosen/rejected); {cfg.dataset!r} is {kind}")
    if cfg.method == "kto" and kind != "kto":
        raise UserError(
            f"method=kto needs a kto dataset (prompt/completion/label, e.g. the '<name>-kto' set `tuneloop feedback "
            f"sample` writes from thumbs-up/down); {cfg.dataset!r} is {kind}"
        )
    if cfg.method not in ("dpo", "kto") and kind != "sft":
        raise UserError(
            f"method={cfg.method} needs an SFT dataset (messages); {cfg.dataset!r} is {kind} "
            f"(use method={'dpo' if kind == 'preference' else 'kto'})"
        )
    if len(dd["train"]) == 0:
        raise UserError(f"dataset {cfg.dataset!r} has an empty train split")
    train_ds, replayed = dd["train"], 0
    if cfg.replay_fraction > 0:
        rdd, _, rkind = _load_dataset(db, cfg.replay_dataset)
        replay_ds = rdd["train"]
        if kind == "kto" and rkind == "sft":
            replay_ds = _sft_as_desirable(replay_ds)
        elif rkind != kind:
            raise UserError(f"replay dataset {cfg.replay_dataset!r} is {rkind}, the training dataset is {kind}")
        train_ds, replayed = mix_replay(train_ds, replay_ds, cfg.replay_fraction, cfg.seed)
    kto: dict[str, Any] = {}
    if cfg.method == "kto":
        n_des = sum(bool(x) for x in train_ds["label"])
        dw, uw = kto_weights(n_des, len(train_ds) - n_des, cfg.kto_desirable_weight, cfg.kto_undesirable_weight)
        kto = {
            "kto_desirable_rows": n_des,
            "kto_undesirable_rows": len(train_ds) - n_des,
            "kto_desirable_weight": dw,
            "kto_undesirable_weight": uw,
        }

    try:  # model, adapter and trainer set-up problems (e.g. lora.targets not in the model) are the user's to fix
        trainer, tokenizer = _build_trainer(
            cfg, base, train_ds, dd.get("validation"), kind, out, progress, kto, init, run_name=run_id
        )
    except ValueError as e:
        raise UserError(f"cannot set up {cfg.method} training on {base}: {e}") from None
    for cb in callbacks:
        trainer.add_callback(cb)
    tracking, tracking_env = _tracking(cfg, trainer, out, settings, run_id)
    out.mkdir(parents=True, exist_ok=True)
    config = {**to_dict(cfg), "base_path": str(base), "replayed_rows": replayed}
    if kto:  # the weights used (cfg's kto_*_weight keep what was asked: 0 = automatic)
        config["kto_effective"] = kto
    run = start_run(db, cfg.method, str(base), ds_id, config, run_id=run_id, tracking=tracking) if record else None
    if run is not None:
        run_file.write_text(json.dumps({"run_id": run.id, "name": cfg.name}, indent=2))
    if resume_from and run is not None:
        print(f"resuming run {run.id} from {resume_from}", flush=True)
    t0 = time.monotonic()
    stop = GracefulStop()
    try:
        trainer.add_callback(cast("TrainerCallback", stop))  # a TrainerCallback subclass at run time (see __new__)
        with stop.signals(), _environ(tracking_env):
            res = trainer.train(resume_from_checkpoint=resume_from)
        if stop.requested:
            step = trainer.state.global_step
            raise KeyboardInterrupt(
                f"stopped at step {step} with a checkpoint in {out}; resume with the same "
                f"{'output_dir=' + str(out) if cfg.output_dir else 'name=' + cfg.name}"
            )
        model_dir = out / "model"
        trainer.save_model(str(model_dir))
        tokenizer.save_pretrained(str(model_dir))
        metrics = {**_metrics(trainer, res, time.monotonic() - t0, replayed, len(train_ds)), **kto}
        if dd.get("validation") is not None and len(dd["validation"]) > 0 and cfg.method not in ("dpo", "kto"):
            metrics["eval_loss"] = float(trainer.evaluate()["eval_loss"])
        history = [dict(e.items()) for e in trainer.state.log_history if "loss" in e]
        write_loss_history(out, history)
        if progress:
            print(loss_table(history), flush=True)
    except BaseException as e:
        if run is not None:
            finish_run(db, run, "failed", error=f"{type(e).__name__}: {e}"[:2000])
        if isinstance(e, KeyboardInterrupt) and str(e):
            import sys

            print(f"training interrupted: {e}", file=sys.stderr, flush=True)
        raise
    from tuneloop.ids import hash_path
    from tuneloop.registry import ModelVersion, register_version

    digest = hash_path(model_dir)
    stored = metrics  # stored as strict JSON (tuneloop.db.dumps: a diverged run's NaN loss as null)
    v = ModelVersion(
        name=cfg.name,
        kind="adapter" if cfg.method in ADAPTER_METHODS else "merged",
        base_model=str(base),
        path=str(model_dir),
        content_hash=digest,
        parent_version=cfg.parent or None,
        dataset_id=ds_id,
        run_id=run.id if run is not None else None,
        config={**config, "method": cfg.method},
        metrics=stored,
    )
    if run is not None:
        finish_run(db, run, "succeeded", stored, str(model_dir), digest)
        v = register_version(db, v)
    del trainer
    return TrainResult(run.id if run is not None else "", v, str(model_dir), metrics)


def _tracking(
    cfg: TrainConfig, trainer: Trainer, out: Path, settings: Settings, run_id: str | None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Where ``trainer`` reports besides the runs table (``runs.tracking``), and the environment its tracker
    callbacks read when training starts (only variables the user has not set). Points the TensorBoard
    callback at ``<out>/tensorboard`` unless ``TENSORBOARD_LOGGING_DIR`` is set."""
    tracking: dict[str, Any] = {}
    env: dict[str, str] = {}
    if "tensorboard" in cfg.report_to:
        from transformers.integrations import TensorBoardCallback

        tb_dir = str(Path(os.environ.get("TENSORBOARD_LOGGING_DIR") or out / "tensorboard").expanduser().resolve())
        for cb in trainer.callback_handler.callbacks:
            if isinstance(cb, TensorBoardCallback):
                cb.logging_dir = tb_dir
        tracking["tensorboard"] = tb_dir
    if "mlflow" in cfg.report_to:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (settings.paths.home_path / "mlruns").resolve().as_uri()
        env["MLFLOW_TRACKING_URI"] = uri
        env["MLFLOW_EXPERIMENT_NAME"] = os.environ.get("MLFLOW_EXPERIMENT_NAME") or TRACKING_PROJECT
        tracking["mlflow"] = {"tracking_uri": uri, "experiment": env["MLFLOW_EXPERIMENT_NAME"], "run_name": run_id}
    if "wandb" in cfg.report_to:
        env["WANDB_PROJECT"] = os.environ.get("WANDB_PROJECT") or TRACKING_PROJECT
        tracking["wandb"] = {"project": env["WANDB_PROJECT"], "run_name": run_id}
    if "trackio" in cfg.report_to:
        tracking["trackio"] = {"project": TRACKING_PROJECT, "run_name": run_id}
    return tracking, {k: v for k, v in env.items() if k not in os.environ}


def _environ(env: dict[str, str]) -> AbstractContextManager[None]:
    """Set ``env`` for the duration of the block, then remove those variables again."""
    import contextlib

    @contextlib.contextmanager
    def cm() -> Iterator[None]:
        os.environ.update(env)
        try:
            yield
        finally:
            for k in env:
                os.environ.pop(k, None)

    return cm()


def _resumed_run_id(db: Database, run_file: Path, cfg: TrainConfig) -> str | None:
    """The run id a resumed run continues (from ``run.json`` next to the checkpoints), or None for a new run."""
    from tuneloop.registry import RegistryError, get_run

    if not run_file.is_file():
        return None
    fix = (
        f"fix or delete it to resume under a new run record, or start over with --fresh (resume=false) or another "
        f"{'output_dir=' if cfg.output_dir else 'name='}"
    )
    try:
        doc = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"cannot resume: {run_file} is corrupt ({e}); {fix}") from None
    run_id = doc.get("run_id") if isinstance(doc, dict) else None
    if not isinstance(run_id, str) or not run_id:
        raise UserError(f'cannot resume: {run_file} has no "run_id" string; {fix}')
    try:
        if get_run(db, run_id).status == "succeeded":
            return None  # continuing a finished run's checkpoints is a new run
    except RegistryError:
        return None
    return run_id


def _metrics(trainer: Trainer, res: TrainOutput, wall_s: float, replayed: int, rows: int) -> dict[str, Any]:
    logs = trainer.state.log_history
    losses = [e["loss"] for e in logs if "loss" in e]
    toks = [e["num_tokens"] for e in logs if "num_tokens" in e]
    runtime = float(res.metrics.get("train_runtime", wall_s))
    m: dict[str, Any] = {
        "train_loss": float(res.training_loss)
        if res.training_loss is not None and math.isfinite(res.training_loss)
        else None,
        "final_loss": float(losses[-1]) if losses else None,
        "steps": int(trainer.state.global_step),
        "train_rows": rows,
        "replayed_rows": replayed,
        "train_runtime_s": runtime,
        "duration_s": wall_s,
    }
    if toks:
        m["num_tokens"] = int(toks[-1])
        m["tokens_per_s"] = float(toks[-1]) / runtime if runtime > 0 else None
    return m


def _load_dataset(db: Database, ref: str) -> tuple[DatasetDict, str | None, str]:
    """:func:`~tuneloop.trainer.inputs.load_dataset_ref`, plus kto datasets (which it does not know yet)."""
    try:
        return load_dataset_ref(db, ref)
    except UserError:
        from tuneloop.dataset_store import kind_of_columns, load_card, load_splits

        try:
            dd = load_splits(db, ref)
        except (OSError, ValueError, UserError):  # not loadable at all: load_dataset_ref's error says why
            dd = None
        if dd is None or "train" not in dd or kind_of_columns(dd["train"].column_names) != "kto":
            raise
        ds_id = load_card(db, ref).get("id")
        return dd, ds_id, "kto"


def _sft_as_desirable(ds: Dataset) -> Dataset:
    """SFT rows as desirable kto rows: prompt = the messages before the answer, completion = the answer, label true."""
    return ds.map(
        lambda r: {"prompt": r["messages"][:-1], "completion": r["messages"][-1:], "label": True},
        remove_columns=["messages"],
        desc="replay rows as desirable",
    )


def _build_trainer(
    cfg: TrainConfig,
    base: Path,
    train_ds: Dataset,
    val_ds: Dataset | None,
    kind: str,
    out: Path,
    progress: bool,
    kto: dict[str, Any] | None = None,
    init: Path | None = None,
    run_name: str | None = None,
) -> tuple[Trainer, Tokenizer]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not progress:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    prec = _precision(cfg)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    load_kw: dict[str, Any] = {"dtype": dtype}
    if cfg.method == "qlora":
        from transformers import BitsAndBytesConfig

        load_kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True
        )
    model: Any = AutoModelForCausalLM.from_pretrained(str(base), **load_kw)
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    peft_config = _peft_config(cfg)
    if init is not None:  # continue training an existing adapter: its weights and its LoRA shape
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(init), is_trainable=True)
        peft_config = None
    has_val = val_ds is not None and len(val_ds) > 0
    common: dict[str, Any] = dict(
        output_dir=str(out),
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        weight_decay=cfg.weight_decay,
        optim=cfg.optim,
        gradient_checkpointing=cfg.gradient_checkpointing,
        seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit,
        report_to=list(cfg.report_to),
        run_name=run_name,
        project=TRACKING_PROJECT,
        disable_tqdm=not progress,
        bf16=prec == "bf16",
        fp16=prec == "fp16",
        use_cpu=not torch.cuda.is_available(),
        eval_strategy="steps" if (cfg.eval_steps > 0 and has_val) else "no",
        eval_steps=cfg.eval_steps or None,
        dataloader_num_workers=0,
    )
    if cfg.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        keep = ["prompt", "chosen", "rejected"]
        dpo_val = _trl_rows(val_ds, keep) if val_ds is not None and has_val else None
        dpo = DPOTrainer(
            model=model,
            args=DPOConfig(**common, beta=cfg.dpo_beta, max_length=cfg.max_seq_length),
            train_dataset=_trl_rows(train_ds, keep),
            eval_dataset=dpo_val,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        return _quiet(dpo, progress), tokenizer
    if cfg.method == "kto":
        from trl import KTOConfig, KTOTrainer

        keep = ["prompt", "completion", "label"]
        kto_val = _trl_rows(val_ds, keep) if val_ds is not None and has_val else None
        weights = kto or {}
        kto_trainer = KTOTrainer(
            model=model,
            args=KTOConfig(
                **common,
                beta=cfg.kto_beta,
                desirable_weight=weights.get("kto_desirable_weight", 1.0),
                undesirable_weight=weights.get("kto_undesirable_weight", 1.0),
                max_length=cfg.max_seq_length,
            ),
            # KTO reads batches in data order (its KL term pairs neighbours): shuffle once, seeded
            train_dataset=_trl_rows(train_ds, keep).shuffle(seed=cfg.seed),
            eval_dataset=kto_val,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        return _quiet(kto_trainer, progress), tokenizer
    from trl import SFTConfig, SFTTrainer

    padding_free = cfg.padding_free and not cfg.packing and cfg.method != "prompt_tuning"
    sft_args = SFTConfig(
        **common,
        packing=cfg.packing,
        padding_free=padding_free,
        # rows are pre-tokenized and truncated by tuneloop.chat; TRL must not cut them again when padding-free
        max_length=None if padding_free else cfg.max_seq_length,
        completion_only_loss=True,
        dataset_num_proc=None,
    )
    sft = SFTTrainer(
        model=model,
        args=sft_args,
        train_dataset=tokenize_sft(train_ds, tokenizer, cfg.max_seq_length),
        eval_dataset=tokenize_sft(val_ds, tokenizer, cfg.max_seq_length) if val_ds is not None and has_val else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    return _quiet(sft, progress), tokenizer


def _trl_rows(ds: Dataset, keep: list[str]) -> Dataset:
    """The columns of ``ds`` TRL's DPO/KTO trainers read: ``keep``, plus ``tools`` when rows carry tool
    definitions (JSON text, which TRL hands to the chat template). A null content (an assistant turn that
    only called tools) becomes ``""``, as :func:`tuneloop.chat.template_messages` hands it to the template."""
    cols = keep + (["tools"] if "tools" in ds.column_names else [])
    ds = ds.select_columns(cols)
    msg_cols = [c for c in cols if "tool_calls" in (getattr(ds.features[c], "feature", None) or {})]
    if not msg_cols:
        return ds
    return ds.map(
        lambda r: {c: [dict(m, content=m["content"] or "") for m in r[c]] for c in msg_cols},
        desc="tool-call turns for the chat template",
    )


def _init_adapter(db: Database, cfg: TrainConfig, base: Path) -> Path | None:
    """The LoRA adapter folder ``cfg.init_adapter`` names (a version or a folder), checked against the base."""
    if not cfg.init_adapter:
        return None
    from tuneloop.registry import RegistryError, get_version

    if cfg.method not in ("lora", "qlora", "dpo", "kto"):
        raise UserError(f"init_adapter continues a LoRA adapter; method={cfg.method} cannot start from one")
    try:
        v = get_version(db, cfg.init_adapter)
        path, trained_on = Path(v.path), v.base_model
        if v.kind != "adapter":
            raise UserError(f"init_adapter={cfg.init_adapter}: version {v.name} is {v.kind}, not a LoRA adapter")
    except RegistryError:
        path, trained_on = Path(cfg.init_adapter).expanduser(), ""
    f = path / "adapter_config.json"
    conf = json.loads(f.read_text()) if f.is_file() else {}
    if conf.get("peft_type") != "LORA":
        raise UserError(f"init_adapter={cfg.init_adapter}: {path} is not a LoRA adapter folder (adapter_config.json)")
    trained_on = trained_on or str(conf.get("base_model_name_or_path") or "")
    if trained_on and Path(trained_on).expanduser().resolve() != base.resolve():
        raise UserError(f"init_adapter={cfg.init_adapter} was trained on {trained_on}, not on the base {base}")
    return path


def _quiet(trainer: Trainer, progress: bool) -> Trainer:
    """Without progress output, drop the callback that prints every log dict to stdout."""
    if not progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


def _peft_config(cfg: TrainConfig) -> PeftConfig | None:
    if cfg.method == "full":
        return None
    if cfg.method == "prompt_tuning":
        from peft import PromptTuningConfig, PromptTuningInit, TaskType

        return PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=cfg.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.RANDOM,
        )
    from peft import LoraConfig

    targets: Any = cfg.lora.targets
    if targets == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        bias="none",
    )
