"""The run machinery shared by every training task: results, signals, resuming, trackers, metrics.

Contract
--------
* :class:`TrainResult` is what a training run returns (run id, registered version, model
  folder, metrics); :func:`default_name` names a version ``<dataset>-<method>-<UTC time>``.
* :class:`GracefulStop` is a Trainer callback: on SIGTERM/SIGINT the run finishes its step,
  saves a checkpoint and stops (a second signal interrupts at once).
* :func:`last_checkpoint` and :func:`resumed_run_id` find what a rerun resumes: the newest
  checkpoint in the run folder and the run id in its ``run.json``.
* :func:`start_tracking` points transformers' tracker callbacks (TensorBoard, MLflow, W&B,
  Trackio; ``cfg.report_to``) at their destinations and returns ``runs.tracking`` and the
  environment they read; :func:`environ_set` sets that environment for a block;
  :func:`end_tracking` ends the MLflow run; :func:`mlflow_run` creates it.
* :func:`train_stoppably` runs ``trainer.train`` with a :class:`GracefulStop` and the
  trackers' environment, and turns a requested stop into a ``KeyboardInterrupt`` that says
  how to resume; :func:`failure_recorded` wraps everything after the run row is written:
  any failure (Ctrl-C included) ends the trackers' run (KILLED or FAILED), records the run
  ``failed`` with the error, prints why an interrupted run stopped, and re-raises.
* :func:`trainer_args` gives the ``TrainingArguments`` keys every run derives from its config.
* :func:`run_metrics` summarises a finished ``Trainer`` run (losses, steps, rows, runtime,
  tokens); :func:`train_precision` picks fp32 on CPU / bf16 on GPU for ``precision=auto``;
  :func:`quiet` drops the callback that prints every log dict.

The chat run (:mod:`tuneloop.trainer.train`) and the classification run
(:mod:`tuneloop.trainer.classify`) both use these, so neither imports the other's module
(``train`` dispatches to ``classify``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.errors import UserError
from tuneloop.trainer.config import TrainConfig

if TYPE_CHECKING:
    from contextlib import AbstractContextManager
    from types import FrameType

    from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_utils import TrainOutput

    from tuneloop.db import Database
    from tuneloop.registry import ModelVersion, RunRecord
    from tuneloop.settings import Settings

TRACKING_PROJECT = "tuneloop"
"""MLflow experiment, W&B and Trackio project of every tracked run."""


@dataclass
class TrainResult:
    run_id: str
    version: ModelVersion
    output_path: str
    metrics: dict[str, Any] = field(default_factory=dict)


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


def default_name(cfg: TrainConfig) -> str:
    """``<dataset stem>-<method>-<UTC timestamp>``: the version name when ``name=`` is not given."""
    stem = Path(cfg.dataset).name.split("@")[0] or ("mix" if cfg.datasets else "model")
    return f"{stem}-{cfg.method}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


def train_precision(cfg: TrainConfig) -> str:
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


def start_tracking(
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
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or TRACKING_PROJECT
        home = settings.paths.home_path.expanduser().resolve()
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}"
        ml_run = os.environ.get("MLFLOW_RUN_ID") or mlflow_run(
            uri, experiment, run_id, None if "MLFLOW_TRACKING_URI" in os.environ else home / "mlruns"
        )
        env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_NAME=experiment, MLFLOW_RUN_ID=ml_run)
        tracking["mlflow"] = {"tracking_uri": uri, "experiment": experiment, "run_name": run_id, "run_id": ml_run}
    if "wandb" in cfg.report_to:
        env["WANDB_PROJECT"] = os.environ.get("WANDB_PROJECT") or TRACKING_PROJECT
        tracking["wandb"] = {"project": env["WANDB_PROJECT"], "run_name": run_id}
    if "trackio" in cfg.report_to:
        tracking["trackio"] = {"project": TRACKING_PROJECT, "run_name": run_id}
    return tracking, {k: v for k, v in env.items() if k not in os.environ}


def mlflow_run(uri: str, experiment: str, name: str | None, artifacts: Path | None) -> str:
    """Create the MLflow run (named ``name``) the training reports to, in ``experiment`` (created when new, its
    artifacts in ``artifacts`` when given: the default store keeps them in the home, not in ``./mlruns`` of
    wherever training runs); returns its id, which transformers' callback resumes (``MLFLOW_RUN_ID``)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        client = MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            exp_id = found.experiment_id
        else:
            try:
                exp_id = client.create_experiment(
                    experiment, artifact_location=artifacts.as_uri() if artifacts else None
                )
            except MlflowException:  # a concurrent run created it first
                again = client.get_experiment_by_name(experiment)
                if again is None:
                    raise
                exp_id = again.experiment_id
        return str(client.create_run(exp_id, run_name=name).info.run_id)
    except MlflowException as e:
        raise UserError(f"report_to=mlflow: cannot create a run in the MLflow store {uri}: {e}") from None


def end_tracking(tracking: dict[str, Any], env: dict[str, str], status: str) -> None:
    """End the MLflow run the training reported to, as ``status`` (FINISHED, FAILED or KILLED). Its callback ends
    it when training ends, but evaluate() afterwards resumes it, and a failed run would stay active (the next
    training in this process would log into it). ``env``: the tracking environment (where the run is)."""
    if "mlflow" not in tracking:
        return
    import mlflow

    info = tracking["mlflow"]
    with environ_set(env):
        active = mlflow.active_run()
        if active is not None and active.info.run_id == info["run_id"]:
            mlflow.end_run(status)
        elif status != "FINISHED":
            mlflow.MlflowClient(info["tracking_uri"]).set_terminated(info["run_id"], status)


def trainer_args(cfg: TrainConfig, out: Path, run_name: str | None, progress: bool, has_val: bool) -> dict[str, Any]:
    """The ``TrainingArguments`` keys every training run sets from its :class:`TrainConfig` (schedule, batches,
    checkpoints, trackers, precision, evaluation); each trainer adds its own (TRL configs, classification)."""
    import torch

    prec = train_precision(cfg)
    return dict(
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


def train_stoppably(
    trainer: Trainer, cfg: TrainConfig, out: Path, resume_from: str | None, tracking_env: dict[str, str]
) -> TrainOutput:
    """``trainer.train`` (resumed from ``resume_from``) that SIGTERM / Ctrl-C stop after the current step with a
    checkpoint, raising ``KeyboardInterrupt`` with the way to resume (see module doc)."""
    from typing import cast

    stop = GracefulStop()
    trainer.add_callback(cast("TrainerCallback", stop))  # a TrainerCallback subclass at run time (see __new__)
    with stop.signals(), environ_set(tracking_env):
        res = trainer.train(resume_from_checkpoint=resume_from)
    if stop.requested:
        step = trainer.state.global_step
        raise KeyboardInterrupt(
            f"stopped at step {step} with a checkpoint in {out}; resume with the same "
            f"{'output_dir=' + str(out) if cfg.output_dir else 'name=' + cfg.name}"
        )
    return res


def failure_recorded(
    db: Database, run: RunRecord | None, tracking: dict[str, Any], tracking_env: dict[str, str]
) -> AbstractContextManager[None]:
    """A block whose failure is recorded (see module doc); ``run`` None (not recorded): only the trackers end."""
    import contextlib

    @contextlib.contextmanager
    def cm() -> Iterator[None]:
        try:
            yield
        except BaseException as e:
            try:  # best effort: the error below is what the user needs
                end_tracking(tracking, tracking_env, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            except Exception:
                pass
            if run is not None:
                from tuneloop.registry import finish_run

                finish_run(db, run, "failed", error=f"{type(e).__name__}: {e}"[:2000])
            if isinstance(e, KeyboardInterrupt) and str(e):
                import sys

                print(f"training interrupted: {e}", file=sys.stderr, flush=True)
            raise

    return cm()


def environ_set(env: dict[str, str]) -> AbstractContextManager[None]:
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


def resumed_run_id(db: Database, run_file: Path, cfg: TrainConfig) -> str | None:
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


def run_metrics(trainer: Trainer, res: TrainOutput, wall_s: float, replayed: int, rows: int) -> dict[str, Any]:
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


def quiet(trainer: Trainer, progress: bool) -> Trainer:
    """Without progress output, drop the callback that prints every log dict to stdout."""
    if not progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer
