"""Fine-tune a model with TRL + PEFT and register the result as a model version.

Contract
--------
``train(cfg, db, settings, progress=True) -> TrainResult(run_id, version, output_path, metrics)``

* ``task=classification`` runs are handed to
  :func:`tuneloop.trainer.classify.train_classifier` (a sequence-classification
  head, transformers ``Trainer``); what follows is the chat task.
* Methods (``cfg.method``): ``lora`` (PEFT LoRA), ``qlora`` (base loaded 4-bit
  nf4 with bitsandbytes + LoRA), ``full`` (all weights), and the PEFT methods of
  :mod:`tuneloop.trainer.peft_methods` (``dora``, ``adalora``, ``ia3``, ``loha``,
  ``lokr``, ``oft``, ``prompt_tuning``, ``prefix_tuning``: that module builds every
  PEFT config and says how each is served), all through TRL's ``SFTTrainer``; ``dpo`` (TRL
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
* ``cfg.datasets`` (a weighted multi-task mix, instead of ``cfg.dataset``):
  the inputs (all of one kind) are mixed by
  :func:`~tuneloop.trainer.inputs.mix_datasets` (its rule: shares of the train
  rows match the weights, no row repeated; validation/test = the inputs'
  rows concatenated) and the mix is registered as its own dataset
  ``mix-<hash8>@<hash12>`` with the inputs as parents and the mix in its data
  card; the run config's ``mix`` and the version's ``dataset_id`` name it
  (:func:`_load_mix`). Replay (``replay_dataset``) mixes in on top.
* SFT rows are tokenized with :func:`tuneloop.chat.training_example`: the
  server's prompt rendering (the row's ``tools`` included) + the answer + EOS,
  loss on the answer only (train/serve parity). Default batches are
  padding-free (no packing). DPO/KTO rows hand their ``tools`` column (JSON
  text) to TRL, which renders it with the chat template.
* Precision by device: fp32 on CPU, bf16 on GPU (``precision=auto``).
* The run lives in ``output_dir`` (default ``<home>/runs/<name>``): ``run.json``
  (run id, name), checkpoints, ``model/`` (the adapter or the full model +
  tokenizer), ``merged/`` (merged methods), ``loss.json`` (+ ``loss.png`` when matplotlib is installed).
  A checkpoint in ``output_dir`` resumes the same run (same run id) unless
  ``resume=false``. SIGTERM / Ctrl-C stop after the current step with a
  checkpoint (run recorded ``failed``, KeyboardInterrupt raised: CLI exit 130).
* ``cfg.report_to`` also reports the run to experiment trackers (transformers'
  integrations): TensorBoard event files in ``<output_dir>/tensorboard``;
  MLflow to ``MLFLOW_TRACKING_URI`` (default ``sqlite:///<home>/mlflow.db``,
  artifacts in ``<home>/mlruns``: MLflow 3 refuses its file store), experiment
  ``tuneloop`` (``MLFLOW_EXPERIMENT_NAME`` wins), run name = the run id, one
  MLflow run per training (created before it, the eval loss included, ended
  FINISHED, FAILED or KILLED with it; ``MLFLOW_RUN_ID`` wins); W&B
  project ``tuneloop`` (``WANDB_PROJECT`` wins) and Trackio project
  ``tuneloop``, run name = the run id. Where is recorded in ``runs.tracking``
  (JSON, e.g. ``{"tensorboard": "<abs dir>"}``) when the run starts.
* Every run is a ``runs`` row (``failed`` with the error when it fails or is
  interrupted) and every success registers a :class:`ModelVersion` (kind
  ``adapter`` for lora/qlora/dpo/kto and the refused prompt_tuning/prefix_tuning,
  ``merged`` for full) with parent, dataset id, run id and content hash. The
  methods vLLM cannot load as an adapter (dora, adalora, ia3, loha, lokr, oft) are
  merged into full weights right after training
  (:func:`tuneloop.trainer.merge.merge_folder`, logit parity within 1e-3, else the
  run fails) into ``<output_dir>/merged``, registered kind ``merged`` (config
  ``adapter_path`` names the raw adapter, which stays in ``model/``; metrics
  ``parity_max_abs_diff``). Metrics record ``trainable_params``. Bad input raises
  :class:`~tuneloop.errors.UserError` before anything is written. Both are
  written through :mod:`tuneloop.registry` (portable SQL: a DuckDB file or a
  shared PostgreSQL); their metrics are stored as strict JSON (a NaN or
  infinite value, e.g. a diverged loss, as null), which PostgreSQL requires;
  ``TrainResult.metrics`` keeps the values as computed.

This module is the run itself (trainer set-up, checkpoints, metrics,
registration); the machinery it shares with the classification run (TrainResult,
GracefulStop, resuming, trackers, run metrics) is :mod:`tuneloop.trainer.run_support`,
which it re-exports (``from tuneloop.trainer.train import TrainResult`` keeps working);
what the run reads (base model, dataset, replay, tokenization)
is :mod:`tuneloop.trainer.inputs`, and the loss files and table it leaves are
:mod:`tuneloop.trainer.history`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.chat import Tokenizer
from tuneloop.config import to_dict
from tuneloop.errors import UserError
from tuneloop.trainer.config import TrainConfig, kto_weights
from tuneloop.trainer.history import loss_table, write_loss_history
from tuneloop.trainer.inputs import (
    MIX_RULE,
    MixEntry,
    load_dataset_ref,
    mix_datasets,
    mix_replay,
    parse_mix,
    resolve_base_model,
    tokenize_sft,
)
from tuneloop.trainer.peft_methods import is_prompt_learning, peft_config, registered_kind, serving, trainer_callbacks
from tuneloop.trainer.run_support import (
    TrainResult,
    default_name,
    failure_recorded,
    last_checkpoint,
    train_stoppably,
    trainer_args,
)
from tuneloop.trainer.run_support import end_tracking as _end_tracking
from tuneloop.trainer.run_support import environ_set as _environ
from tuneloop.trainer.run_support import quiet as _quiet
from tuneloop.trainer.run_support import resumed_run_id as _resumed_run_id
from tuneloop.trainer.run_support import run_metrics as _metrics
from tuneloop.trainer.run_support import start_tracking as _tracking
from tuneloop.trainer.run_support import train_precision as _precision

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from transformers import Trainer

    from tuneloop.db import Database
    from tuneloop.settings import Settings


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


# ---- the run ------------------------------------------------------------------------------------


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
    if cfg.task == "classification":  # a sequence-classification head: tuneloop.trainer.classify
        from tuneloop.trainer.classify import train_classifier

        return train_classifier(cfg, db, settings, progress, record, callbacks)
    from tuneloop.registry import RegistryError, finish_run, get_version, start_run

    cfg.validate()
    mix_entries = parse_mix(cfg.datasets) if cfg.datasets else []
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
    mix: dict[str, Any] = {}
    ds_id: str | None
    if mix_entries:  # datasets=: a weighted mix, registered as its own dataset (inputs.mix_datasets)
        dd, ds_id, kind, mix = _load_mix(db, settings, mix_entries, cfg.seed, record)
        what = f"the mix {ds_id!r}"
    else:
        dd, ds_id, kind = _load_dataset(db, cfg.dataset)
        what = repr(cfg.dataset)
    if cfg.method == "dpo" and kind != "preference":
        raise UserError(f"method=dpo needs a preference dataset (prompt/chosen/rejected); {what} is {kind}")
    if cfg.method == "kto" and kind != "kto":
        raise UserError(
            f"method=kto needs a kto dataset (prompt/completion/label, e.g. the '<name>-kto' set `tuneloop feedback "
            f"sample` writes from thumbs-up/down); {what} is {kind}"
        )
    if cfg.method not in ("dpo", "kto") and kind != "sft":
        raise UserError(
            f"method={cfg.method} needs an SFT dataset (messages); {what} is {kind} "
            f"(use method={'dpo' if kind == 'preference' else 'kto'})"
        )
    if len(dd["train"]) == 0:
        raise UserError(f"dataset {what} has an empty train split")
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
    if mix:  # the mixed dataset's id and what each input gave (its data card has the same)
        config["mix"] = mix
    if kto:  # the weights used (cfg's kto_*_weight keep what was asked: 0 = automatic)
        config["kto_effective"] = kto
    run = start_run(db, cfg.method, str(base), ds_id, config, run_id=run_id, tracking=tracking) if record else None
    if run is not None:
        run_file.write_text(json.dumps({"run_id": run.id, "name": cfg.name}, indent=2))
    if resume_from and run is not None:
        print(f"resuming run {run.id} from {resume_from}", flush=True)
    t0 = time.monotonic()
    with failure_recorded(db, run, tracking, tracking_env):
        res = train_stoppably(trainer, cfg, out, resume_from, tracking_env)
        model_dir = out / "model"
        trainer.save_model(str(model_dir))
        tokenizer.save_pretrained(str(model_dir))
        metrics = {**_metrics(trainer, res, time.monotonic() - t0, replayed, len(train_ds)), **kto}
        if dd.get("validation") is not None and len(dd["validation"]) > 0 and cfg.method not in ("dpo", "kto"):
            with _environ(tracking_env):  # the trackers' callbacks log it into the same run
                metrics["eval_loss"] = float(trainer.evaluate()["eval_loss"])
        _end_tracking(tracking, tracking_env, "FINISHED")
        history = [dict(e.items()) for e in trainer.state.log_history if "loss" in e]
        write_loss_history(out, history)
        trained: Any = trainer.model
        metrics["trainable_params"] = int(sum(p.numel() for p in trained.parameters() if p.requires_grad))
        served_dir = model_dir
        if record and serving(cfg.method) == "merged" and cfg.method != "full":  # vLLM cannot load the adapter
            served_dir = out / "merged"
            metrics["parity_max_abs_diff"] = _merge_trained(db, base, model_dir, served_dir, ds_id, cfg)
        if progress:
            print(loss_table(history), flush=True)
    from tuneloop.ids import hash_path
    from tuneloop.registry import ModelVersion, register_version

    digest = hash_path(served_dir)
    stored = metrics  # stored as strict JSON (tuneloop.db.dumps: a diverged run's NaN loss as null)
    v = ModelVersion(
        name=cfg.name,
        kind=registered_kind(cfg.method),
        base_model=str(base),
        path=str(served_dir),
        content_hash=digest,
        parent_version=cfg.parent or None,
        dataset_id=ds_id,
        run_id=run.id if run is not None else None,
        config={
            **config,
            "method": cfg.method,
            **({"adapter_path": str(model_dir)} if served_dir != model_dir else {}),
        },
        metrics=stored,
    )
    if run is not None:
        finish_run(db, run, "succeeded", stored, str(served_dir), digest)
        v = register_version(db, v)
    del trainer
    return TrainResult(run.id if run is not None else "", v, str(served_dir), metrics)


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


def _load_mix(
    db: Database, settings: Settings, entries: list[MixEntry], seed: int, record: bool
) -> tuple[DatasetDict, str, str, dict[str, Any]]:
    """(splits, dataset id, kind, mix record) of a ``datasets=`` mix (:func:`~tuneloop.trainer.inputs.mix_datasets`).

    The mix is registered through :func:`tuneloop.dataset_store.save_dataset` as ``mix-<hash8>`` (hash of the
    inputs' ids, shares and the seed) with the inputs as ``parent_ids`` and a data card holding ``mix`` (per
    input: dataset id, weight, share, rows available and drawn, validation and test rows), ``mix_seed`` and
    ``mix_rule``; the version trained on it records that id as its ``dataset_id``, so lineage reaches every
    input. Content-addressed, so the same mix is registered once. Not written when ``record`` is false or in a
    distributed rank > 0 (``$RANK``): those compute the same id without writing."""
    import hashlib
    from dataclasses import asdict

    from tuneloop.dataset_store import dataset_id, save_dataset

    parts, kinds = [], []
    for e in entries:
        dd, ds_id, kind = _load_dataset(db, e.ref)
        if "train" not in dd or len(dd["train"]) == 0:
            raise UserError(f"datasets= entry {e.ref!r}: the dataset has an empty train split")
        parts.append((e, ds_id or e.ref, dd))
        kinds.append(kind)
    if len(set(kinds)) > 1:
        listed = ", ".join(f"{e.ref} ({k})" for e, k in zip(entries, kinds, strict=True))
        raise UserError(f"datasets= mixes datasets of one kind, got {listed}")
    mixed, shares = mix_datasets(parts, seed)
    inputs = [asdict(s) for s in shares]
    spec = json.dumps([[s.dataset, s.share] for s in shares] + [seed], sort_keys=True)
    name = f"mix-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"
    splits = {s: mixed[s].to_list() for s in ("train", "validation", "test")}
    card = {"mix": inputs, "mix_seed": seed, "mix_rule": MIX_RULE}
    if record and os.environ.get("RANK", "0") == "0":
        source = {"kind": "mix", "datasets": [s.dataset for s in shares], "weights": [s.weight for s in shares]}
        ds_id = save_dataset(
            db, settings.paths.home_path, name, splits, kinds[0], card, source, [s.dataset for s in shares]
        ).id
    else:
        ds_id = dataset_id(name, splits, kinds[0])
    return mixed, ds_id, kinds[0], {"dataset": ds_id, "inputs": inputs, "seed": seed}


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
    steps = max_steps_of(cfg, len(train_ds))
    peft_cfg = peft_config(cfg, steps)
    if init is not None:  # continue training an existing adapter: its weights and its LoRA shape
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(init), is_trainable=True)
        peft_cfg = None
    has_val = val_ds is not None and len(val_ds) > 0
    common = trainer_args(cfg, out, run_name, progress, has_val)
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
            peft_config=peft_cfg,
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
            peft_config=peft_cfg,
        )
        return _quiet(kto_trainer, progress), tokenizer
    from trl import SFTConfig, SFTTrainer

    padding_free = cfg.padding_free and not cfg.packing and not is_prompt_learning(cfg.method)
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
        peft_config=peft_cfg,
    )
    for cb in trainer_callbacks(cfg.method):  # e.g. AdaLoRA's rank allocation after each optimizer step
        sft.add_callback(cb)
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


def max_steps_of(cfg: TrainConfig, rows: int) -> int:
    """The optimizer steps a run of ``cfg`` on ``rows`` training rows takes on one process: ``max_steps``, else
    the epochs' worth of batches (AdaLoRA schedules its rank budget over them)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = max(1, math.ceil(rows / (cfg.batch_size * cfg.gradient_accumulation_steps)))
    return max(1, math.ceil(per_epoch * cfg.num_train_epochs))


def _merge_trained(
    db: Database, base: Path, adapter_dir: Path, dest: Path, dataset_id: str | None, cfg: TrainConfig
) -> float:
    """Merge the adapter a run just saved into full weights at ``dest`` (the methods vLLM cannot load as an
    adapter, :mod:`tuneloop.trainer.peft_methods`); returns the logit parity difference (MergeParityError above
    the merge's default tolerance)."""
    from tuneloop.trainer.merge import merge_folder, sample_prompts

    return merge_folder(
        base,
        adapter_dir,
        dest,
        sample_prompts(db, dataset_id),
        1e-3,
        {"merged_from": str(adapter_dir), "method": cfg.method, "base_model": str(base)},
        what=f"method={cfg.method}",
    )
