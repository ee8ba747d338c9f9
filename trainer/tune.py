"""Hyperparameter search over ``tuneloop train`` runs with Optuna (``tuneloop tune``).

Contract
--------
``tune(base, space, db, settings, opts) -> TuneResult``

* **Search space** (:func:`load_space`): a YAML mapping of TrainConfig keys as ``tuneloop train`` takes them
  (dotted ``lora.r`` or nested ``lora: {r: ...}``) to a list (categorical) or ``{low, high[, log, step]}``
  (an int range for an int key, else a float range). An unknown key, a key tune sets itself (``name``,
  ``output_dir``, ``resume``) or a value that does not fit the key is a :class:`~tuneloop.errors.UserError`
  naming the valid keys (CLI: ``error: ...``, exit 2), raised before anything runs.
* **Objective: the validation loss** (``eval_loss`` of the final model on the dataset's ``validation``
  split, lower is better). The gate's default metric (``deploy.gate_metric``: token_f1 / rouge_l /
  exact_match) needs generated answers, which the trainer layer does not produce (evaluation generates
  on vLLM, :mod:`tuneloop.trainer.evaluate`); its ``neg_loss`` metric is this same per-example answer
  NLL. So only SFT methods (lora, qlora, full, prompt_tuning) can be tuned, on a dataset with a
  non-empty validation split.
* **Trials**: each is a real :func:`tuneloop.trainer.train.train` run (``record=False``: no version is
  registered) in ``<home>/tune/<study>/trial-<n>``, recorded here as a ``runs`` row (``succeeded``,
  ``pruned`` or ``failed``; config carries ``tune: {study, trial, params}``). A trainer callback calls
  ``trial.report(eval_loss, step)`` on every evaluation (``eval_steps`` > 0 gives intermediate ones) and
  stops training when ``trial.should_prune()`` (Optuna ``MedianPruner``); the objective then raises
  ``optuna.TrialPruned``. Sampler: TPE, seeded (``seed`` + the number of trials already in the study, so a
  resumed study does not replay its first samples).
* **Study**: Optuna RDB storage, sqlite ``<home>/tune/<study>.db``. Running the same study again resumes
  it: every finished trial (complete, pruned or failed) counts toward ``trials``; enqueued (waiting)
  trials run first; trials left running by a killed process are marked failed.
* **Budget / parallelism**: at most ``trials`` trials in all, no new trial after ``timeout_s``;
  ``jobs`` worker threads each run trials one after the other (torch releases the GIL in its kernels; on
  CPU the intra-op threads are split between the jobs). The main thread only waits: Ctrl-C (or SIGTERM)
  stops after the running trial(s) with the study saved; a second one aborts them (marked failed).
* **Output**: :class:`TuneResult` (trials, best), plots ``optimization_history.html`` and
  ``param_importances.html`` (>= 2 completed trials, else a note) in ``<home>/tune/<study>/``, and the best
  trial's model registered as a version (default ``<study>-best``; when that name holds another trial's
  model, ``<study>-best-t<N>``) whose config has ``tune: {study, storage, trial, value, objective, params,
  trial_runs: [{trial, state, value, run_id}]}`` (its lineage to every trial run).

The trial's callback (report each evaluation to Optuna, stop a pruned trial) goes to ``train(callbacks=...)``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import signal
import sys
import threading
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from tuneloop.config import ConfigError, deep_merge, field_help, from_dict, load_yaml, to_dict
from tuneloop.errors import UserError
from tuneloop.trainer.config import ADAPTER_METHODS, SFT_METHODS, TrainConfig

if TYPE_CHECKING:
    import optuna

    from tuneloop.db import Database
    from tuneloop.registry import ModelVersion
    from tuneloop.settings import Settings

OBJECTIVE = "eval_loss"
TUNE_SETS = ("name", "output_dir", "resume")
"""Keys tune sets per trial; a space or base config may not set them."""
STUDY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ---- search space -------------------------------------------------------------------------------


@dataclass
class Param:
    key: str
    kind: str  # categorical | int | float
    choices: list[Any] = field(default_factory=list)
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)


def _key_type(key: str) -> Any:
    cls: Any = TrainConfig
    *parents, leaf = key.split(".")
    for p in parents:
        cls = typing.get_type_hints(cls)[p]
    return typing.get_type_hints(cls)[leaf]


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not ({"low", "high"} & set(v)):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _number(v: Any, what: str) -> float:
    if isinstance(v, bool):
        raise UserError(f"{what}: expected a number, got {v!r}")
    try:
        return float(v)  # YAML reads 1e-5 (no dot) as text
    except (TypeError, ValueError):
        raise UserError(f"{what}: expected a number, got {v!r}") from None


def load_space(path: str | os.PathLike[str]) -> list[Param]:
    """The search space in ``path`` (see module doc); every value is checked against TrainConfig."""
    data = _flatten(load_yaml(path))
    if not data:
        raise UserError(f"{path}: the search space is empty (map TrainConfig keys to a list or {{low, high}})")
    valid = sorted(field_help(TrainConfig))
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise UserError(f"{path}: unknown search-space key(s): {', '.join(unknown)}. Valid keys: {', '.join(valid)}")
    fixed = sorted(set(data) & set(TUNE_SETS))
    if fixed:
        raise UserError(f"{path}: tune sets {', '.join(fixed)} per trial; remove it from the search space")
    params = []
    for key, spec in data.items():
        tp = _key_type(key)
        where = f"{path}: {key}"
        if isinstance(spec, list):
            if not spec:
                raise UserError(f"{where}: an empty list of choices")
            bad = [c for c in spec if c is not None and not isinstance(c, (bool, int, float, str))]
            if bad:
                raise UserError(f"{where}: choices must be scalars (numbers, text, true/false), got {bad[0]!r}")
            params.append(Param(key, "categorical", choices=list(spec)))
        elif isinstance(spec, dict):
            extra = sorted(set(spec) - {"low", "high", "log", "step"})
            if extra or "low" not in spec or "high" not in spec:
                raise UserError(f"{where}: a range is {{low, high[, log, step]}}, got {spec}")
            if tp not in (int, float):
                raise UserError(f"{where}: a range needs a numeric key, {key} is {getattr(tp, '__name__', tp)}")
            low, high = _number(spec["low"], f"{where}.low"), _number(spec["high"], f"{where}.high")
            step = None if spec.get("step") is None else _number(spec["step"], f"{where}.step")
            log = bool(spec.get("log", False))
            if low > high:
                raise UserError(f"{where}: low ({low}) is above high ({high})")
            if log and (low <= 0 or step is not None):
                raise UserError(f"{where}: a log range needs low > 0 and no step")
            if tp is int and not (low.is_integer() and high.is_integer() and (step is None or step.is_integer())):
                raise UserError(f"{where}: {key} is an integer key; low, high and step must be integers")
            params.append(Param(key, "int" if tp is int else "float", low=low, high=high, log=log, step=step))
        else:
            raise UserError(f"{where}: expected a list of choices or {{low, high[, log, step]}}, got {spec!r}")
    return params


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in flat.items():
        d = out
        *parents, leaf = k.split(".")
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = v
    return out


def apply_params(base: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    """``base`` with the sampled ``params`` (dotted keys) set, type-checked like key=value overrides."""
    return from_dict(TrainConfig, deep_merge(to_dict(base), _nested(params)))


def check_space(base: TrainConfig, space: list[Param]) -> None:
    """Every choice and range end must make a valid config with ``base`` (UserError naming the key if not)."""
    for p in space:
        values = p.choices if p.kind == "categorical" else [p.low, p.high]
        for v in values:
            val = int(v) if p.kind == "int" else v
            try:
                apply_params(base, {p.key: val}).validate()
            except ConfigError as e:
                raise UserError(f"search space {p.key}={val!r}: {e}") from None
            except UserError as e:
                raise UserError(f"search space {p.key}={val!r}: {e}") from None
            if p.key == "method" and val not in SFT_METHODS:
                raise UserError(
                    f"search space method={val!r}: tune minimises the validation loss, which SFT methods "
                    f"({', '.join(SFT_METHODS)}) report"
                )


# ---- the study ----------------------------------------------------------------------------------


@dataclass
class TuneOptions:
    study: str
    trials: int = 10
    timeout_s: float | None = None
    jobs: int = 1
    seed: int = 42
    name: str = ""
    prune: bool = True
    prune_startup: int = 3
    prune_warmup: int = 0


@dataclass
class TrialRow:
    number: int
    state: str
    value: float | None
    params: dict[str, Any]
    run_id: str | None
    step: int | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TuneResult:
    study: str
    storage: str
    trials: list[TrialRow]
    ran: int
    best: TrialRow | None = None
    version: str | None = None
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "storage": self.storage,
            "objective": OBJECTIVE,
            "direction": "minimize",
            "ran": self.ran,
            "trials": [t.to_dict() for t in self.trials],
            "best": self.best.to_dict() if self.best else None,
            "version": self.version,
            "plots": self.plots,
            "notes": self.notes,
            "interrupted": self.interrupted,
        }


def study_dir(settings: Settings, study: str) -> Path:
    return settings.paths.home_path / "tune" / study


def storage_path(settings: Settings, study: str) -> Path:
    return settings.paths.home_path / "tune" / f"{study}.db"


def open_study(path: Path, name: str, seed: int, opts: TuneOptions) -> optuna.Study:
    """Create or load study ``name`` in the sqlite file ``path`` (TPE seeded, MedianPruner)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
    pruner: optuna.pruners.BasePruner = (
        optuna.pruners.MedianPruner(n_startup_trials=opts.prune_startup, n_warmup_steps=opts.prune_warmup)
        if opts.prune
        else optuna.pruners.NopPruner()
    )
    kw: dict[str, Any] = dict(study_name=name, storage=storage, pruner=pruner)
    try:
        study = optuna.load_study(**kw, sampler=optuna.samplers.TPESampler(seed=seed))
    except KeyError:  # no such study yet
        return optuna.create_study(**kw, sampler=optuna.samplers.TPESampler(seed=seed), direction="minimize")
    if study.direction != optuna.study.StudyDirection.MINIMIZE:
        raise UserError(f"study {name!r} in {path} is not a minimisation study; use another --study")
    n = len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(seed=seed + n)  # a resumed study samples anew
    return study


def _report_callback(trial: optuna.Trial, prune: bool) -> Any:
    """A TrainerCallback: ``trial.report(eval_loss, step)`` per evaluation; stop training when pruned."""
    from transformers import TrainerCallback

    class ReportToOptuna(TrainerCallback):
        def __init__(self) -> None:
            self.pruned_at: int | None = None
            self.training = True
            self.reported: set[int] = set()

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.training = False

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kw: Any) -> Any:
            loss = (metrics or {}).get(OBJECTIVE)
            step = int(state.global_step)
            if loss is None or step in self.reported:
                return control
            self.reported.add(step)
            trial.report(float(loss), step)
            # only a run still training is pruned (the final evaluation of a finished run is reported)
            if prune and self.training and self.pruned_at is None and trial.should_prune():
                self.pruned_at = step
                control.should_training_stop = True
            return control

    return ReportToOptuna()


def _fmt_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


class _Runner:
    def __init__(
        self,
        study: optuna.Study,
        base: TrainConfig,
        space: list[Param],
        db: Database,
        settings: Settings,
        opts: TuneOptions,
        dataset_id: str | None,
        log: TextIO,
    ):
        self.study, self.base, self.space, self.db, self.settings = study, base, space, db, settings
        self.opts, self.dataset_id, self.log = opts, dataset_id, log
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.inflight: dict[int, Any] = {}  # trial number -> run record
        self.ran = 0

    def say(self, line: str) -> None:
        with self.lock:
            print(line, file=self.log, flush=True)

    def objective(self, trial: optuna.Trial, box: dict[str, Any]) -> float:
        import optuna

        from tuneloop.registry import finish_run, start_run
        from tuneloop.trainer.inputs import resolve_base_model
        from tuneloop.trainer.train import train

        params = {p.key: p.suggest(trial) for p in self.space}
        params = {**trial.params, **params}  # an enqueued trial may fix more keys
        box["params"] = params
        cfg = apply_params(self.base, params)
        cfg.name = f"{self.study.study_name}-trial-{trial.number}"
        cfg.output_dir = str(study_dir(self.settings, self.study.study_name) / f"trial-{trial.number}")
        cfg.resume = False
        cfg.save_steps = 0  # a trial is not resumed: no checkpoints
        cfg.validate()
        base_path = resolve_base_model(self.db, self.settings, cfg.base)
        tune_meta = {"study": self.study.study_name, "trial": trial.number, "params": params}
        config = {**to_dict(cfg), "base_path": str(base_path), "tune": tune_meta}
        run = start_run(self.db, cfg.method, str(base_path), self.dataset_id, config)
        box["run"] = run
        trial.set_user_attr("run_id", run.id)
        with self.lock:
            self.inflight[trial.number] = run
        cb = _report_callback(trial, self.opts.prune)
        try:
            res = train(cfg, self.db, self.settings, progress=False, record=False, callbacks=[cb])
        except BaseException as e:
            finish_run(self.db, run, "failed", error=f"{type(e).__name__}: {e}"[:2000])
            raise
        value = res.metrics.get(OBJECTIVE)
        if cb.pruned_at is not None:
            box["step"] = cb.pruned_at
            finish_run(
                self.db,
                run,
                "pruned",
                res.metrics,
                res.output_path,
                res.version.content_hash,
                error=f"pruned by MedianPruner at step {cb.pruned_at}",
            )
            raise optuna.TrialPruned(f"pruned at step {cb.pruned_at}")
        if value is None or not math.isfinite(value):
            finish_run(
                self.db, run, "failed", res.metrics, res.output_path, res.version.content_hash, "no finite eval_loss"
            )
            raise RuntimeError(f"the run gave no finite {OBJECTIVE} ({value})")
        finish_run(self.db, run, "succeeded", res.metrics, res.output_path, res.version.content_hash)
        box["step"] = res.metrics.get("steps")
        return float(value)

    def run_one(self) -> None:
        import optuna
        from optuna.trial import TrialState

        trial = self.study.ask()
        t0 = time.monotonic()
        box: dict[str, Any] = {}
        try:
            value = self.objective(trial, box)
        except optuna.TrialPruned:
            self.study.tell(trial, state=TrialState.PRUNED)
            last = trial.storage.get_trial(trial._trial_id).last_step
            line = f"pruned at step {box.get('step', last)}"
        except KeyboardInterrupt:
            raise
        except Exception as e:
            self.study.tell(trial, state=TrialState.FAIL)
            line = f"failed: {e}" if isinstance(e, UserError) else f"failed: {type(e).__name__}: {e}"
        else:
            self.study.tell(trial, value)
            line = f"{OBJECTIVE} {value:.4f}"
        finally:
            with self.lock:
                self.inflight.pop(trial.number, None)
                self.ran += 1
        self.say(
            f"trial {trial.number}: {_fmt_params(box.get('params', {}))} -> {line} ({time.monotonic() - t0:.1f} s)"
        )

    def abort_inflight(self) -> None:
        from optuna.trial import TrialState

        from tuneloop.registry import finish_run

        with self.lock:
            items = list(self.inflight.items())
            self.inflight.clear()
        for number, run in items:
            finish_run(self.db, run, "failed", error="KeyboardInterrupt: tune aborted")
            self.study.tell(number, state=TrialState.FAIL)


def _finished(study: optuna.Study) -> int:
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return len(study.get_trials(deepcopy=False, states=done))


def _rows(study: optuna.Study) -> list[TrialRow]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            TrialRow(
                number=t.number,
                state=t.state.name.lower(),
                value=t.value if t.value is not None else (t.intermediate_values.get(t.last_step or -1)),
                params=dict(t.params),
                run_id=t.user_attrs.get("run_id"),
                step=t.last_step,
            )
        )
    return rows


def tune(
    base: TrainConfig,
    space: list[Param],
    db: Database,
    settings: Settings,
    opts: TuneOptions,
    log: TextIO | None = None,
) -> TuneResult:
    """Run the study (see module doc); returns every trial of the study, the best and what was written."""
    from optuna.trial import TrialState

    from tuneloop.registry import find_version
    from tuneloop.trainer.inputs import load_dataset_ref

    log = log or sys.stderr
    if not STUDY_RE.match(opts.study):
        raise UserError(f"--study {opts.study!r}: use letters, digits, '.', '_' and '-'")
    if opts.trials < 1 or opts.jobs < 1:
        raise UserError(f"--trials and --jobs must be >= 1, got {opts.trials} and {opts.jobs}")
    if base.name:
        raise UserError("name= is set per trial by tune; name the best version with --name")
    if base.method not in SFT_METHODS:
        raise UserError(
            f"method={base.method}: tune minimises the validation loss, which SFT methods ({', '.join(SFT_METHODS)}) report"
        )
    check_space(base, space)
    dd, ds_id, kind = load_dataset_ref(db, base.dataset)
    if kind != "sft":
        raise UserError(f"tune needs an SFT dataset (messages); {base.dataset!r} is {kind}")
    if dd.get("validation") is None or len(dd["validation"]) == 0:
        raise UserError(f"dataset {base.dataset!r} has no validation rows: tune minimises the validation loss")
    if opts.name and find_version(db, opts.name) is not None:
        raise UserError(f"model version {opts.name!r} already exists; pick another --name")

    path = storage_path(settings, opts.study)
    study = open_study(path, opts.study, opts.seed, opts)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)  # left running by a process that was killed
    remaining = max(0, opts.trials - _finished(study))
    runner = _Runner(study, base, space, db, settings, opts, ds_id, log)
    if opts.jobs > 1:
        from tuneloop.runtime import has_cuda

        if not has_cuda():
            import torch

            torch.set_num_threads(max(1, (os.cpu_count() or 1) // opts.jobs))
    interrupted = _drive(runner, remaining, opts)

    result = TuneResult(opts.study, str(path), _rows(study), runner.ran, interrupted=interrupted)
    complete = list(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if complete:
        best = study.best_trial
        result.best = next(r for r in result.trials if r.number == best.number)
        result.version = register_best(db, study, best, str(path), opts.name).name
    else:
        result.notes.append("no completed trial: no best version registered")
    result.plots, notes = write_plots(study, study_dir(settings, opts.study), len(complete))
    result.notes += notes
    return result


def _drive(runner: _Runner, remaining: int, opts: TuneOptions) -> bool:
    """Run ``remaining`` trials on ``opts.jobs`` worker threads; True when interrupted by a signal."""
    deadline = time.monotonic() + opts.timeout_s if opts.timeout_s else None
    started = 0
    count_lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        nonlocal started
        while not runner.stop.is_set():
            with count_lock:
                if started >= remaining or (deadline is not None and time.monotonic() >= deadline):
                    return
                started += 1
            try:
                runner.run_one()
            except BaseException as e:  # a storage error: stop the others too
                errors.append(e)
                runner.stop.set()
                return

    def on_signal(signum: int, frame: Any) -> None:
        if runner.stop.is_set():
            raise KeyboardInterrupt
        runner.stop.set()
        runner.say("stopping after the running trial(s), the study is saved; signal again to abort them")

    _preload()
    threads = [threading.Thread(target=worker, daemon=True, name=f"tune-{i}") for i in range(opts.jobs)]
    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=0.2)
    except KeyboardInterrupt:
        runner.abort_inflight()
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if errors:
        raise errors[0]
    return runner.stop.is_set()


def _preload() -> None:
    """Import what a trial imports, in this thread: lazy module attributes (transformers, trl) are not
    safe to resolve from several threads at once."""
    import peft
    import transformers
    import trl

    import tuneloop.trainer.train  # noqa: F401

    for mod, names in (
        (transformers, ("TrainerCallback", "AutoModelForCausalLM", "AutoTokenizer", "Trainer")),
        (trl, ("SFTConfig", "SFTTrainer")),
        (peft, ("LoraConfig", "PromptTuningConfig", "PeftModel")),
    ):
        for n in names:
            getattr(mod, n)


def register_best(
    db: Database, study: optuna.Study, best: optuna.trial.FrozenTrial, storage: str, name: str = ""
) -> ModelVersion:
    """Register the best trial's model as a version with lineage to the study's trial runs (see module doc)."""
    from tuneloop.registry import ModelVersion, find_version, get_run, register_version

    run = get_run(db, best.user_attrs["run_id"])
    if not run.output_path or not run.artifact_hash:
        raise UserError(f"the best trial's run {run.id} has no model output")
    trial_runs = [
        {"trial": t.number, "state": t.state.name.lower(), "value": t.value, "run_id": t.user_attrs.get("run_id")}
        for t in study.get_trials(deepcopy=False)
    ]
    config = {
        **run.config,
        "method": run.method,
        "tune": {
            "study": study.study_name,
            "storage": storage,
            "trial": best.number,
            "value": best.value,
            "objective": OBJECTIVE,
            "params": dict(best.params),
            "trial_runs": trial_runs,
        },
    }
    if not name:
        name = f"{study.study_name}-best"
        have = find_version(db, name)
        if have is not None and have.content_hash != run.artifact_hash:
            name = f"{name}-t{best.number}"
    v = ModelVersion(
        name=name,
        kind="adapter" if run.method in ADAPTER_METHODS else "merged",
        base_model=run.base_model,
        path=run.output_path,
        content_hash=run.artifact_hash,
        parent_version=run.config.get("parent") or None,
        dataset_id=run.dataset_id,
        run_id=run.id,
        config=config,
        metrics=run.metrics,
    )
    return register_version(db, v)


def write_plots(study: optuna.Study, out: Path, n_complete: int) -> tuple[list[str], list[str]]:
    """Optimization history and (>= 2 completed trials) parameter importances as HTML in ``out``."""
    from optuna.visualization import plot_optimization_history, plot_param_importances

    out.mkdir(parents=True, exist_ok=True)
    plots: list[str] = []
    notes: list[str] = []
    figures: list[tuple[str, Callable[[], Any]]] = [
        ("optimization_history.html", lambda: plot_optimization_history(study))
    ]
    if n_complete >= 2:
        figures.append(("param_importances.html", lambda: plot_param_importances(study)))
    else:
        notes.append(f"parameter importances need >= 2 completed trials (have {n_complete}): skipped")
    for fname, make in figures:
        try:
            make().write_html(str(out / fname), include_plotlyjs=True)
            plots.append(str(out / fname))
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            notes.append(f"{fname}: not written ({e})")
    return plots, notes


__all__ = ["Param", "TuneOptions", "TuneResult", "apply_params", "check_space", "load_space", "tune"]
