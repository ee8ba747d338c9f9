"""Train a sequence classifier (``task=classification``) and register it as a model version.

Contract
--------
``train_classifier(cfg, db, settings, progress=True, record=True, callbacks=()) -> TrainResult``
(:func:`tuneloop.trainer.train.train` dispatches here when ``cfg.task == "classification"``).

* The dataset must be of kind ``classification`` (``text`` / ``label`` rows,
  :mod:`tuneloop.dataset_store`; loaded by
  :func:`tuneloop.trainer.classify_eval.load_classification_dataset`); any other kind, a weighted ``datasets=`` mix, a
  replay dataset or ``init_adapter`` is a :class:`~tuneloop.errors.UserError`
  raised before anything is written. The label order is the data card's
  ``label_names`` (sorted; computed from the rows when the card has none); a
  training label outside it is a UserError.
* The model is transformers' ``AutoModelForSequenceClassification`` on the resolved
  base (:func:`~tuneloop.trainer.inputs.resolve_base_model`) with ``num_labels``,
  ``id2label`` and ``label2id`` from the label order and ``pad_token_id`` set (the
  tokenizer's pad token, else EOS), trained by transformers' ``Trainer``: TRL has no
  sequence-classification trainer (its trainers are for generative models).
  Methods: ``feature_extraction`` — every weight frozen except the new head (the
  parameters the base checkpoint lacks: ``score`` on Llama-style models); ``lora`` —
  PEFT ``LoraConfig(task_type=SEQ_CLS)`` (PEFT adds the head to ``modules_to_save``,
  so it trains fully), merged into the weights (``merge_and_unload``) before saving;
  ``full`` — every weight. The head is initialised after ``set_seed(cfg.seed)``, so a
  rerun with the same seed starts from the same head (and, on CPU, ends with the same weights).
* ``class_balance``: ``weights`` — cross-entropy weighted by inverse label frequency
  in train (scikit-learn's ``compute_class_weight("balanced")``; a label absent from
  train weighs 1); ``sampling`` — batches drawn by a ``WeightedRandomSampler`` (each
  row weighted 1 / its label's count, so labels come equally often); ``none``.
* The saved ``<output_dir>/model`` is a full HF folder (``<Arch>ForSequenceClassification``
  + tokenizer; no adapter files, for every method) that vLLM's pooling runner serves;
  it is registered as kind ``merged``, task ``classification`` (stages are per task), with
  ``config["task"] == "classification"`` and
  ``config["label_names"]``. Metrics add ``eval_loss``, ``eval_accuracy`` and
  ``eval_macro_f1`` on the validation split when it has rows
  (:func:`tuneloop.trainer.classify_eval.classification_metrics`).
* Runs, resumption, signals (SIGTERM / Ctrl-C stop after the step with a checkpoint),
  experiment trackers, loss history and registration follow :mod:`tuneloop.trainer.train`,
  through the helpers both share (:mod:`tuneloop.trainer.run_support`; ``train`` dispatches
  here, so this module never imports it).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from tuneloop.config import to_dict
from tuneloop.errors import UserError
from tuneloop.trainer.config import TrainConfig
from tuneloop.trainer.history import loss_table, write_loss_history
from tuneloop.trainer.inputs import resolve_base_model

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from transformers import Trainer

    from tuneloop.chat import Tokenizer
    from tuneloop.db import Database
    from tuneloop.settings import Settings
    from tuneloop.trainer.run_support import TrainResult

HEAD_MODULES = ("score", "classifier")
"""Names of sequence-classification heads in transformers models (Llama-style: ``score``; BERT-style: ``classifier``)."""


def class_weights(labels: Sequence[int], num_labels: int) -> list[float]:
    """Inverse-frequency weights per label id (scikit-learn's "balanced": n / (k * n_label)); 1 for absent labels."""
    import numpy as np
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(np.asarray(labels))
    w = compute_class_weight("balanced", classes=present, y=np.asarray(labels))
    out = [1.0] * num_labels
    for c, x in zip(present.tolist(), w.tolist()):
        out[int(c)] = float(x)
    return out


def sample_weights(labels: Sequence[int]) -> list[float]:
    """Per-row sampling weight 1 / (its label's count): every label is drawn equally often."""
    counts = Counter(labels)
    return [1.0 / counts[y] for y in labels]


def head_parameters(model: Any, new_keys: Sequence[str]) -> list[str]:
    """Names of the head's parameters: those the base checkpoint lacked (``new_keys``) plus any under a module
    named in :data:`HEAD_MODULES` (a base that already was a classifier brings its head along)."""
    names = [n for n, _ in model.named_parameters()]
    new = set(new_keys)
    return [n for n in names if n in new or n.split(".")[0] in HEAD_MODULES]


def train_classifier(
    cfg: TrainConfig,
    db: Database,
    settings: Settings,
    progress: bool = True,
    record: bool = True,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Train, save, record the run and register the classifier (see module doc)."""
    from tuneloop.registry import ModelVersion, RegistryError, finish_run, get_version, register_version, start_run
    from tuneloop.trainer.classify_eval import load_classification_dataset
    from tuneloop.trainer.run_support import (
        TrainResult,
        default_name,
        end_tracking,
        environ_set,
        failure_recorded,
        last_checkpoint,
        resumed_run_id,
        run_metrics,
        start_tracking,
        train_stoppably,
    )

    cfg.validate()
    if cfg.datasets:
        raise UserError("task=classification trains on one dataset: pass dataset=, not a datasets= mix")
    if cfg.replay_fraction > 0 or cfg.replay_dataset:
        raise UserError("task=classification does not replay a dataset: drop replay_dataset/replay_fraction")
    if cfg.init_adapter:
        raise UserError("task=classification starts from a base model (or a classifier version), not init_adapter")
    cfg.name = cfg.name or default_name(cfg)
    try:
        get_version(db, cfg.name)
        raise UserError(f"model version {cfg.name!r} already exists; pick another name=")
    except RegistryError:
        pass
    out = Path(cfg.output_dir) if cfg.output_dir else settings.paths.home_path / "runs" / cfg.name
    resume_from = last_checkpoint(out) if cfg.resume else None
    run_file = out / "run.json"
    run_id = resumed_run_id(db, run_file, cfg) if resume_from and record else None
    if record and cfg.report_to:
        from tuneloop.ids import new_id

        run_id = run_id or new_id()
    base = resolve_base_model(db, settings, cfg.base)
    dd, ds_id, label_names = load_classification_dataset(db, cfg.dataset)
    if len(dd["train"]) == 0:
        raise UserError(f"dataset {cfg.dataset!r} has an empty train split")
    try:
        trainer, tokenizer, head = _build_trainer(cfg, base, dd, label_names, out, progress, run_id)
    except ValueError as e:
        raise UserError(f"cannot set up {cfg.method} classification training on {base}: {e}") from None
    for cb in callbacks:
        trainer.add_callback(cb)
    tracking, tracking_env = start_tracking(cfg, trainer, out, settings, run_id)
    out.mkdir(parents=True, exist_ok=True)
    train_labels = Counter(str(x) for x in dd["train"]["label"])
    config = {
        **to_dict(cfg),
        "base_path": str(base),
        "replayed_rows": 0,
        "label_names": label_names,
        "train_label_counts": {n: train_labels.get(n, 0) for n in label_names},
        "head_parameters": head,
    }
    run = start_run(db, cfg.method, str(base), ds_id, config, run_id=run_id, tracking=tracking) if record else None
    if run is not None:
        run_file.write_text(json.dumps({"run_id": run.id, "name": cfg.name}, indent=2))
    if resume_from and run is not None:
        print(f"resuming run {run.id} from {resume_from}", flush=True)
    t0 = time.monotonic()
    with failure_recorded(db, run, tracking, tracking_env):
        res = train_stoppably(trainer, cfg, out, resume_from, tracking_env)
        metrics = run_metrics(trainer, res, time.monotonic() - t0, 0, len(dd["train"]))
        trained: Any = trainer.model
        metrics["trainable_params"] = int(sum(p.numel() for p in trained.parameters() if p.requires_grad))
        val = dd.get("validation")
        if val is not None and len(val) > 0:
            with environ_set(tracking_env):  # the trackers' callbacks log it into the same run
                metrics.update(_validation_metrics(trainer, label_names))
        end_tracking(tracking, tracking_env, "FINISHED")
        model_dir = out / "model"
        _save(trainer, tokenizer, model_dir, cfg.method)
        history = [dict(e.items()) for e in trainer.state.log_history if "loss" in e]
        write_loss_history(out, history)
        if progress:
            print(loss_table(history), flush=True)
    from tuneloop.ids import hash_path

    digest = hash_path(model_dir)
    v = ModelVersion(
        name=cfg.name,
        kind="merged",
        base_model=str(base),
        path=str(model_dir),
        content_hash=digest,
        parent_version=cfg.parent or None,
        dataset_id=ds_id,
        run_id=run.id if run is not None else None,
        config={**config, "method": cfg.method, "task": "classification"},
        metrics=metrics,
        task="classification",
    )
    if run is not None:
        finish_run(db, run, "succeeded", metrics, str(model_dir), digest)
        v = register_version(db, v)
    del trainer
    return TrainResult(run.id if run is not None else "", v, str(model_dir), metrics)


def _save(trainer: Trainer, tokenizer: Tokenizer, model_dir: Path, method: str) -> None:
    """The trained classifier as a full HF folder: LoRA merged into the weights (head included), plus the tokenizer."""
    model: Any = trainer.model
    if method == "lora":
        model = model.merge_and_unload()
        model.save_pretrained(str(model_dir))
    else:
        trainer.save_model(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))


def _validation_metrics(trainer: Trainer, label_names: list[str]) -> dict[str, Any]:
    """eval_loss, eval_accuracy and eval_macro_f1 of the trained model on the validation split."""
    from tuneloop.trainer.classify_eval import classification_metrics

    pred = trainer.predict(cast("Any", trainer.eval_dataset))
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    y_pred = [label_names[int(i)] for i in logits.argmax(-1)]
    y_true = [label_names[int(i)] for i in cast("Any", pred.label_ids)]
    m = classification_metrics(y_true, y_pred, label_names)
    out = {"eval_accuracy": m["accuracy"], "eval_macro_f1": m["macro_f1"]}
    loss = (pred.metrics or {}).get("test_loss")
    if loss is not None:
        out["eval_loss"] = float(loss)
    return out


def _encode(ds: Dataset, tokenizer: Tokenizer, label2id: dict[str, int], max_length: int) -> Dataset:
    """``text``/``label`` rows -> ``input_ids``, ``attention_mask``, ``labels`` (truncated to ``max_length``)."""
    return ds.map(
        lambda b: {
            **tokenizer(b["text"], truncation=True, max_length=max_length),
            "labels": [label2id[str(x)] for x in b["label"]],
        },
        batched=True,
        remove_columns=ds.column_names,
        desc="tokenizing",
    )


def _build_trainer(
    cfg: TrainConfig,
    base: Path,
    dd: DatasetDict,
    label_names: list[str],
    out: Path,
    progress: bool,
    run_name: str | None,
) -> tuple[Trainer, Tokenizer, list[str]]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer

    from tuneloop.trainer.run_support import quiet, train_precision, trainer_args

    if not progress:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    prec = train_precision(cfg)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
    from transformers import set_seed

    set_seed(cfg.seed)  # the new head is initialised here, before the Trainer seeds: same seed, same head
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    id2label = dict(enumerate(label_names))
    label2id = {n: i for i, n in id2label.items()}
    model: Any
    model, info = AutoModelForSequenceClassification.from_pretrained(
        str(base),
        num_labels=len(label_names),
        id2label=id2label,
        label2id=label2id,
        dtype=dtype,
        ignore_mismatched_sizes=True,  # a classifier base with another label set gets a fresh head
        output_loading_info=True,
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    new_keys = [*info.get("missing_keys", ()), *(k for k, *_ in info.get("mismatched_keys", ()))]
    head = head_parameters(model, new_keys)
    if not head:
        raise ValueError("found no classification head (score/classifier) in the model")
    if cfg.method == "feature_extraction":
        for n, p in model.named_parameters():
            p.requires_grad = n in head
    elif cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        targets: Any = "all-linear" if cfg.lora.targets == ["all-linear"] else cfg.lora.targets
        model = get_peft_model(
            model,
            LoraConfig(
                task_type="SEQ_CLS",  # PEFT adds the head (score/classifier) to modules_to_save: trained fully
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=targets,
                bias="none",
            ),
        )
    train_ds = _encode(dd["train"], tokenizer, label2id, cfg.max_seq_length)
    val = dd.get("validation")
    val_ds = _encode(val, tokenizer, label2id, cfg.max_seq_length) if val is not None and len(val) > 0 else None
    from transformers import TrainingArguments

    kw = trainer_args(cfg, out, run_name, progress, val_ds is not None)
    kw["gradient_checkpointing"] = cfg.gradient_checkpointing and cfg.method != "feature_extraction"
    args = TrainingArguments(**kw, remove_unused_columns=False)
    y = [int(v) for v in train_ds["labels"]]
    trainer = _classifier_trainer_class(Trainer)(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        loss_weights=class_weights(y, len(label_names)) if cfg.class_balance == "weights" else None,
        sample_weights=sample_weights(y) if cfg.class_balance == "sampling" else None,
    )
    return quiet(trainer, progress), tokenizer, head


def _classifier_trainer_class(base: type) -> type:
    """A ``Trainer`` subclass (built lazily: transformers is heavy to import) with class balancing: a weighted
    cross-entropy (``loss_weights``) and/or a ``WeightedRandomSampler`` over the training rows (``sample_weights``)."""

    class ClassifierTrainer(base):
        def __init__(
            self, *a: Any, loss_weights: list[float] | None = None, sample_weights: list[float] | None = None, **kw: Any
        ) -> None:
            super().__init__(*a, **kw)
            self.loss_weights = loss_weights
            self.sample_weights = sample_weights
            if loss_weights is not None:
                self.loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides by the accumulation steps

        def compute_loss(
            self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            if self.loss_weights is None or "labels" not in inputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            import torch

            labels = inputs.pop("labels")
            outputs = model(**inputs)
            logits = outputs.logits.float()
            w = torch.tensor(self.loss_weights, dtype=logits.dtype, device=logits.device)
            loss = torch.nn.functional.cross_entropy(logits, labels.to(logits.device), weight=w)
            return (loss, outputs) if return_outputs else loss

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            if self.sample_weights is None:
                return super()._get_train_sampler(train_dataset)
            import torch

            gen = torch.Generator()
            gen.manual_seed(self.args.seed)
            w = self.sample_weights
            return torch.utils.data.WeightedRandomSampler(w, num_samples=len(w), replacement=True, generator=gen)

    return ClassifierTrainer
