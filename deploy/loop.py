"""The continuous-training loop: sample -> train -> gate -> canary -> decide.

Contract
--------
* :func:`run_cycle` runs one cycle, identified by a cycle id (new, or given to
  resume). Each step writes a ``loop_runs`` row (``running`` when it starts,
  ``done``/``skipped``/``failed`` when it ends) whose ``details`` hold what the
  next steps need (dataset id, version name, gate verdict, canary id). A rerun
  with the same cycle id skips every ``done`` step and reuses its details, so an
  interrupted cycle resumes where it stopped; the inputs of a step are fixed
  when it first starts (the sampling window, the version name), so a retried
  step produces the same thing.
* Steps: ``sample`` (feedback.sample over the window, replaying the production
  version's data), ``train`` (trainer.train.train on the production version's
  base model, continuing the production LoRA adapter when there is one and
  ``deploy.loop_continue_training`` is on; the objective is sft, dpo or kto, see
  :func:`_do_train`), ``gate``
  (deploy.gate.run_gate), ``canary`` (monitoring.canary start, then the decision:
  a live server's own judge may decide it, else this process judges until it
  decides; with no production version yet, or ``canary=False``, the gated
  candidate is promoted directly), ``decide`` (records the outcome).
* :class:`LoopOptions` holds everything a caller can choose (window, strategies,
  dataset and version names, train overrides, gate limits, canary share and
  deadlines); :func:`run_cycle` also takes hooks: ``on_canary_start`` (called once
  the canary runs, e.g. to send it traffic), ``step_context`` (a context
  manager around every step that runs, e.g. for progress and timings) and
  ``generator`` (an evaluation engine already running, which the gate then uses
  instead of starting its own). ``tuneloop
  loop`` and ``tuneloop demo`` both run their cycles through it.
* Outcomes: ``promoted``, ``rolled_back``, ``gate_failed``, ``nothing_to_do``
  (no new data to sample).
* ``LoopOptions.task="classification"`` runs the same steps for the production
  *classifier* (stages are per task): the sample is a classification set
  (``feedback sample --task classification``: label corrections and confirmed
  predictions), the train step trains the next classifier from the production
  one (:func:`_do_train_classifier`), the gate is macro-F1 with the paired
  bootstrap (:mod:`tuneloop.deploy.gate_classify`), and the canary runs on a
  classifier server (which serves the candidate by an extra engine,
  :mod:`tuneloop.server.engine_pool`), judged on label corrections and latency.

The ``loop_runs`` rows, canaries and stages are read and written through the
storage layer (:mod:`tuneloop.store_deploy`, :mod:`tuneloop.registry`), whose
transitions are atomic on the DuckDB file and on a shared PostgreSQL alike: a
canary decided by a server replica's judge while this process also judges it is
decided once, and the cycle reports the recorded decision and who made it.
Continuous mode (run a cycle whenever a trigger fires) is :mod:`tuneloop.deploy.watch`.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from tuneloop.db import Database, utcnow
from tuneloop.errors import UserError
from tuneloop.ids import new_id
from tuneloop.store_deploy import begin_step, cycle_exists, end_step, last_sample_until, record_decide, steps_of

if TYPE_CHECKING:
    from tuneloop.monitoring.canary import Canary, Decision
    from tuneloop.settings import Settings
    from tuneloop.trainer.config import TrainConfig
    from tuneloop.trainer.evaluate import Generator

# a context manager around each step that runs: (step name, its inputs) -> context
StepContext = Callable[[str, dict[str, Any]], AbstractContextManager[object]]

STEPS = ("sample", "train", "gate", "canary", "decide")


class LoopError(UserError, RuntimeError):
    """A loop problem a user can fix (unknown cycle, bad options)."""


@dataclass
class LoopOptions:
    task: str = field(
        default="chat",
        metadata={
            "help": "chat: sample chat traffic, train a generative version, gate on answers; classification: "
            "sample classify traffic and label feedback, train the next classifier from the production one, gate "
            "on macro-F1, canary on label corrections and latency. Stages are per task."
        },
    )
    window: str | None = field(
        default=None,
        metadata={"help": "Sample requests from this window (e.g. 24h); default: since the last cycle's sample."},
    )
    strategies: list[str] | None = field(
        default=None, metadata={"help": "Sampling strategies NAME[=SHARE] (default feedback=0.5 stratified=0.5)."}
    )
    limit: int = field(default=1000, metadata={"help": "Most production rows sampled."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "Name of the sampled dataset (default loop-<cycle id tail>)."}
    )
    dedup_against: list[str] | None = field(
        default=None, metadata={"help": "Datasets the sample is deduplicated against (default every SFT dataset)."}
    )
    replay_fraction: float = field(
        default=0.2, metadata={"help": "Share of the train split replayed from the production version's dataset."}
    )
    synthetic_share: float = field(
        default=0.0,
        metadata={
            "help": "Share of the SFT train split that is targeted synthetic data (tuneloop data synthesize --mode "
            "targeted on the sample's window: the drifted prompts answered and new requests on their topics), "
            "0 = none. Synthetic rows join train only; the gate still measures on the sample's own test split."
        },
    )
    synthetic_endpoint: str | None = field(
        default=None,
        metadata={"help": "OpenAI-compatible generator for the synthetic share (default: this machine's server)."},
    )
    synthetic_model: str = field(default="production", metadata={"help": "Generator model at that endpoint."})
    train_overrides: list[str] = field(default_factory=list, metadata={"help": "TrainConfig key=value overrides."})
    method: str | None = field(
        default=None,
        metadata={
            "help": '"auto" | "sft" | "dpo" | "kto" (or an SFT method: lora, qlora, full, prompt_tuning): what the '
            "train step trains; a method= in train_overrides or train_config wins; None = the setting "
            'deploy.loop_train_method ("sft" unless configured). auto: dpo with >= deploy.loop_min_pairs '
            "preference pairs, else kto with both thumbs-up and thumbs-down, else sft."
        },
    )
    train_config: str | None = field(default=None, metadata={"help": "TrainConfig YAML file."})
    golden: str | None = field(
        default=None, metadata={"help": "Golden prompts for the gate (default deploy.gate_golden)."}
    )
    general: str | None = field(
        default=None,
        metadata={"help": "Retention set for the gate's forgetting check (default: the production version's dataset)."},
    )
    eval_limit: int | None = field(default=None, metadata={"help": "Most held-out examples evaluated by the gate."})
    canary: bool = field(
        default=True, metadata={"help": "Canary before promoting (needs a running server to get traffic)."}
    )
    canary_share: float | None = field(default=None, metadata={"help": "Canary share (default deploy.canary_share)."})
    canary_timeout_s: float | None = field(default=None, metadata={"help": "Longest wait for the canary decision."})
    canary_poll_s: float = field(default=5.0, metadata={"help": "Seconds between canary judgements."})
    canary_server_judge_s: float = field(
        default=0.0,
        metadata={"help": "Seconds left to a live server's own judge to decide the canary before judging here."},
    )
    canary_rollback_undecided: bool = field(
        default=False,
        metadata={"help": "Roll back a canary still undecided at the deadline (instead of failing the step)."},
    )
    version_name: str | None = field(
        default=None, metadata={"help": "Name of the new version (default: next after the production version)."}
    )
    version_prefix: str = field(
        default="", metadata={"help": "Name new versions <prefix>-v<N> (default: from the production version's name)."}
    )
    actor: str = field(default="loop", metadata={"help": "Who the deploy history records."})
    progress: bool = field(default=True, metadata={"help": "Print step progress."})


@dataclass
class CycleResult:
    cycle_id: str
    outcome: str
    steps: dict[str, dict[str, Any]]
    candidate: str | None = None
    dataset: str | None = None

    def summary(self) -> str:
        lines = [f"cycle {self.cycle_id}: {self.outcome.replace('_', ' ')}"]
        for s in STEPS:
            st = self.steps.get(s)
            if st:
                lines.append(f"  {s:<7} {st['status']:<8} {_brief(s, st.get('details') or {})}")
        return "\n".join(lines)


def _brief(step: str, d: dict[str, Any]) -> str:
    if step == "sample":
        return (
            f"dataset {d.get('dataset')}" + (f" (+ pairs {d['preference']})" if d.get("preference") else "")
            if d.get("dataset")
            else d.get("reason", "")
        )
    if step == "train":
        text = (
            f"version {d.get('version')} (run {d.get('run_id')})" if d.get("run_id") else f"version {d.get('version')}"
        )
        if d.get("objective"):
            text += f"; {d['objective']} (method={d.get('method')}): {d.get('method_reason')}"
        return text
    if step == "gate":
        return f"{'passed' if d.get('passed') else 'failed'} vs {d.get('baseline')}" if "passed" in d else ""
    if step == "canary":
        return d.get("summary") or d.get("reason", "")
    return d.get("reason", "") or d.get("outcome", "")


# ---- helpers -----------------------------------------------------------------------------------


def next_version_name(db: Database, prod_name: str | None, prefix: str = "") -> str:
    """``chat-v3`` after ``chat-v2``; ``<prefix or 'model'>-v1`` with nothing in production; never an existing name."""
    from tuneloop.registry import version_names

    names = version_names(db)
    m = re.match(r"^(.*?)-?v(\d+)$", prod_name or "")
    if prefix:
        stem, n = prefix, 1
    elif m and m.group(1):
        stem, n = m.group(1), int(m.group(2)) + 1
    elif prod_name:
        stem, n = prod_name, 2
    else:
        stem, n = "model", 1
    while f"{stem}-v{n}" in names:
        n += 1
    return f"{stem}-v{n}"


def build_train_config(opts: LoopOptions, base: str, dataset: str, name: str, parent: str | None) -> TrainConfig:
    """TrainConfig from the YAML file + overrides, with base/dataset/name set by the loop."""
    from tuneloop.config import build, load_yaml
    from tuneloop.trainer.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    forced = [f"base={base}", f"dataset={dataset}", f"name={name}"]
    if parent and "parent" in fields:
        forced.append(f"parent={parent}")
    return build(TrainConfig, load_yaml(opts.train_config), list(opts.train_overrides) + forced)


# ---- one cycle ------------------------------------------------------------------------------------


def run_cycle(
    db: Database,
    settings: Settings,
    opts: LoopOptions | None = None,
    cycle_id: str | None = None,
    log: Callable[[str], None] | None = None,
    *,
    on_canary_start: Callable[[Canary], None] | None = None,
    step_context: StepContext | None = None,
    generator: Generator | None = None,
) -> CycleResult:
    """Run (or resume) one cycle; see the module docstring."""
    from tuneloop.registry import get_version, version_by_stage

    opts = opts or LoopOptions()
    if opts.task not in ("chat", "classification"):
        raise LoopError(f"unknown task {opts.task!r}: choose chat or classification")
    say: Callable[[str], None] = log or ((lambda m: print(m, flush=True)) if opts.progress else (lambda m: None))
    if cycle_id and not cycle_exists(db, cycle_id):
        raise LoopError(f"unknown cycle {cycle_id!r}; see `tuneloop loop --help` (start a new cycle without --cycle)")
    cycle_id = cycle_id or new_id()
    done = steps_of(db, cycle_id)

    def finished(step: str) -> dict[str, Any] | None:
        st = done.get(step)
        if st and st["status"] in ("done", "skipped"):
            say(f"[{cycle_id[:8]}] {step}: already {st['status']}, skipped")
            return st["details"]
        return None

    def result(outcome: str, candidate: str | None = None, dataset: str | None = None) -> CycleResult:
        return CycleResult(cycle_id, outcome, steps_of(db, cycle_id), candidate, dataset)

    def step(name: str, details: dict[str, Any], fn: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        prev = done.get(name)
        inputs = {**details, **((prev or {}).get("details") or {})} if prev else details  # fixed inputs survive a retry
        begin_step(db, cycle_id, name, inputs)
        say(f"[{cycle_id[:8]}] {name}: running")
        try:
            with step_context(name, inputs) if step_context else nullcontext():
                out = fn(inputs)
        except BaseException as e:
            end_step(db, cycle_id, name, "failed", inputs, error=f"{type(e).__name__}: {e}")
            raise
        status = out.pop("_status", "done")
        end_step(db, cycle_id, name, status, {**inputs, **out})
        say(f"[{cycle_id[:8]}] {name}: {status} {_brief(name, {**inputs, **out})}")
        return {**inputs, **out}

    prod = version_by_stage(db, "production", task=opts.task)

    # 1. sample
    s = finished("sample")
    if s is None:
        until = utcnow()
        since = None if opts.window else last_sample_until(db, cycle_id, task=opts.task)
        s = step(
            "sample",
            {
                "task": opts.task,
                "window": opts.window,
                "since": str(since) if since else None,
                "until": until.isoformat(),
                "production": prod.name if prod else None,
            },
            lambda d: _do_sample(db, settings, opts, d, cycle_id),
        )
    if s.get("outcome") == "nothing_to_do":
        record_decide(db, cycle_id, "nothing_to_do", s.get("reason", ""))
        return result("nothing_to_do")

    # 2. train
    t = finished("train")
    if t is None:
        name = opts.version_name or next_version_name(db, s.get("production"), opts.version_prefix)
        t = step(
            "train",
            {
                "version": name,
                "dataset": s["dataset"],
                "preference": s.get("preference"),
                "parent": s.get("production"),
            },
            lambda d: _do_train(db, settings, opts, d),
        )
    candidate = t["version"]

    # 3. gate
    g = finished("gate")
    if g is None:
        g = step(
            "gate",
            {"version": candidate, "dataset": s["dataset"]},
            lambda d: _do_gate(db, settings, opts, d, generator),
        )
    if not g.get("passed"):
        record_decide(db, cycle_id, "gate_failed", g.get("message", ""))
        return result("gate_failed", candidate, s["dataset"])

    # 4. canary (or direct promotion)
    c = finished("canary")
    if c is None:
        c = step("canary", {"version": candidate}, lambda d: _do_canary(db, settings, opts, d, on_canary_start))
    outcome = c.get("outcome", "promoted")
    v = get_version(db, candidate)
    record_decide(db, cycle_id, outcome, c.get("reason", "") or c.get("summary", ""), {"stage": v.stage})
    return result(outcome, candidate, s["dataset"])


def _do_sample(db: Database, settings: Settings, opts: LoopOptions, d: dict[str, Any], cycle_id: str) -> dict[str, Any]:
    from tuneloop.feedback.sample import SampleConfig
    from tuneloop.feedback.strategies import SampleError, parse_strategies
    from tuneloop.registry import get_version

    replay = None
    if d.get("production"):
        replay = get_version(db, d["production"]).dataset_id
    cfg = SampleConfig(
        name=opts.dataset_name or f"loop-{cycle_id[-12:]}",
        task=opts.task,
        strategies=parse_strategies(opts.strategies),
        limit=opts.limit,
        since=datetime.fromisoformat(d["since"]) if d.get("since") else None,
        until=datetime.fromisoformat(d["until"]),
        window=d.get("window"),
        replay_from=replay,
        replay_fraction=opts.replay_fraction if replay else 0.0,
        dedup_against=opts.dedup_against,
    )
    try:
        res = sample(db, settings.paths.home_path, cfg, progress=opts.progress)
    except SampleError as e:
        if "nothing to sample" in str(e):
            return {"_status": "skipped", "outcome": "nothing_to_do", "reason": str(e)}
        raise
    out = {
        "dataset": res.sft.id,
        "preference": res.preference.id if res.preference else None,
        "rows": {"train": res.sft.rows_train, "validation": res.sft.rows_validation, "test": res.sft.rows_test},
        "counts": res.card["counts"],
    }
    if opts.synthetic_share > 0 and opts.task == "chat":
        out.update(_add_synthetic(db, settings, opts, res.sft, cfg))
    return out


def _add_synthetic(db: Database, settings: Settings, opts: LoopOptions, sft: Any, cfg: Any) -> dict[str, Any]:
    """The sample's SFT set with a share of targeted synthetic rows added to its train split, saved as
    ``<name>-syn`` (validation and test untouched); a generation that fails leaves the sample as it is, noted."""
    import hashlib
    import math

    from tuneloop.dataset_store import load_card, load_splits, save_dataset
    from tuneloop.errors import UserError
    from tuneloop.feedback.synthesize import SynthesizeConfig, synthesize

    share = opts.synthetic_share
    if not 0 < share < 1:
        raise LoopError(f"synthetic_share must be in [0, 1), got {share}")
    count = max(1, math.ceil(sft.rows_train * share / (1 - share)))
    scfg = SynthesizeConfig(
        mode="targeted",
        name=f"{cfg.name}-synthetic",
        endpoint=opts.synthetic_endpoint or settings.server.local_api_url,
        model=opts.synthetic_model,
        window=cfg.window or "7d",
        since=cfg.since,
        until=cfg.until,
        count=count,
        seeds=max(1, min(10, count)),
        temperature=0.7,
        seed=int(hashlib.sha256(cfg.name.encode()).hexdigest()[:8], 16),  # each cycle draws its own answers
    )
    try:
        syn = synthesize(db, settings.paths.home_path, scfg, progress=opts.progress, say=lambda m: None)
    except UserError as e:  # the supplement failed (no seeds, endpoint down ...): train on the sample alone
        return {"synthetic": {"skipped": str(e)[:500]}}
    base, extra = load_splits(db, sft.id), load_splits(db, syn.record.id)
    splits = {name: [dict(r) for r in base[name]] for name in base}
    splits["train"] = splits.get("train", []) + [dict(r) for r in extra["train"]]
    card = dict(load_card(db, sft.id))
    for k in ("id", "name", "kind", "content_hash", "rows"):
        card.pop(k, None)
    card["synthetic"] = {"dataset": syn.record.id, "rows": syn.record.rows_train, "share_asked": share}
    mixed = save_dataset(
        db,
        settings.paths.home_path,
        f"{cfg.name}-syn",
        splits,
        "sft",
        card,
        {"kind": "loop-sample+synthetic", "sample": sft.id, "synthetic": syn.record.id},
        parent_ids=[sft.id, syn.record.id],
    )
    return {
        "dataset": mixed.id,
        "sampled_dataset": sft.id,
        "synthetic": {"dataset": syn.record.id, "rows": syn.record.rows_train, "steps": syn.counts},
        "rows": {"train": mixed.rows_train, "validation": mixed.rows_validation, "test": mixed.rows_test},
    }


def sample(*a: Any, **kw: Any) -> Any:  # indirection so the step is easy to follow in a traceback
    from tuneloop.feedback.sample import sample as _sample

    return _sample(*a, **kw)


def _requested_method(opts: LoopOptions, settings: Settings) -> tuple[str, str]:
    """(method asked for, where): a ``method=`` train override, the train config file, ``opts.method``, the setting
    ``deploy.loop_train_method``, first to last."""
    from tuneloop.config import load_yaml, parse_overrides

    asked: list[tuple[Any, str]] = [
        (parse_overrides(opts.train_overrides).get("method"), "--train method="),
        (load_yaml(opts.train_config).get("method"), f"method in {opts.train_config}"),
        (opts.method, "the loop's method option"),
        (settings.deploy.loop_train_method, "deploy.loop_train_method"),
    ]
    return next((str(m), src) for m, src in asked if m)


def _do_train(db: Database, settings: Settings, opts: LoopOptions, d: dict[str, Any]) -> dict[str, Any]:
    """Train the step's version on the objective asked for (or, with ``auto``, the one the sample supports).

    The method comes from, first to last: a ``method=`` train override, the train config file,
    ``opts.method``, the setting ``deploy.loop_train_method``. ``sft`` is the SFT default (lora) and any
    SFT method trains on the sampled SFT set; ``dpo`` on its preference set; ``kto`` on its KTO set;
    ``auto`` picks one with :func:`tuneloop.feedback.sample.choose_objective` from the feedback counts
    in the SFT set's card. The details record the objective, the method and why.
    """
    from tuneloop.config import parse_overrides
    from tuneloop.feedback.sample import choose_objective
    from tuneloop.modelcache import DEFAULT_BASE, resolve_model
    from tuneloop.registry import RegistryError, get_dataset, get_version, trained_version_run
    from tuneloop.trainer.config import SFT_METHODS

    # a previous attempt may have registered the version before being interrupted
    existing = trained_version_run(db, d["version"])
    if existing:
        return {"run_id": existing, "reused": True}
    if opts.task == "classification":
        return _do_train_classifier(db, settings, opts, d)
    requested, source = _requested_method(opts, settings)
    card = get_dataset(db, d["dataset"]).card or {}
    fb = card.get("feedback") or {}
    pref_id = d.get("preference") or card.get("preference_dataset")
    if "preference_pairs" in fb:
        pairs = int(fb["preference_pairs"])
    else:  # a sample from before the card counted its feedback
        pairs = get_dataset(db, pref_id).rows_train if pref_id else 0
    desirable, undesirable = int(fb.get("kto_desirable", 0)), int(fb.get("kto_undesirable", 0))
    if requested == "auto":
        objective, why = choose_objective(pairs, desirable, undesirable, settings.deploy.loop_min_pairs)
        why = f"auto ({source}): {why}"
    elif requested in ("sft", *SFT_METHODS, "dpo", "kto"):
        objective = requested if requested in ("dpo", "kto") else "sft"
        why = f"{source}{requested}" if source.endswith("=") else f"{requested} from {source}"
    else:
        raise LoopError(
            f"unknown training method {requested!r} ({source}): choose auto, sft, dpo or kto "
            f"(or an SFT method: {', '.join(SFT_METHODS)})"
        )
    method = ("lora" if requested in ("sft", "auto") else requested) if objective == "sft" else objective
    dataset = d["dataset"]
    if objective == "dpo":
        if not pref_id:
            note = card.get("preference_note") or "no corrections"
            raise LoopError(
                f"method=dpo needs preference pairs (a correction that differs from the served response), "
                f"and this sample has none: {note}; use --train method=kto, method=sft or method=auto"
            )
        dataset = pref_id
    elif objective == "kto":
        kto_id = card.get("kto_dataset")
        try:
            dataset = get_dataset(db, kto_id).id if kto_id else ""
        except RegistryError:
            dataset = ""
        if not dataset:
            note = card.get("kto_note") or "the sample has no KTO set"
            raise LoopError(
                f"method=kto needs both thumbs-up (or corrected) and thumbs-down feedback in the sample: {note}; "
                "use --train method=dpo, method=sft or method=auto"
            )
    base = (
        get_version(db, d["parent"]).base_model
        if d.get("parent")
        else str(resolve_model(settings.server.model or DEFAULT_BASE, settings.paths.models_path))
    )
    from tuneloop.trainer.train import train

    overrides = [o for o in opts.train_overrides if "method" not in parse_overrides([o])] + [f"method={method}"]
    cfg = build_train_config(
        dataclasses.replace(opts, train_overrides=overrides), base, dataset, d["version"], d.get("parent")
    )
    if not cfg.init_adapter and d.get("parent") and settings.deploy.loop_continue_training:
        parent = get_version(db, d["parent"])
        if parent.kind == "adapter" and method in ("lora", "qlora", "dpo", "kto") and _is_lora(parent.path):
            cfg.init_adapter = parent.name  # continue production's adapter: keep what it learned
    res = train(cfg, db, settings, progress=opts.progress)
    return {
        "run_id": res.run_id,
        "version": res.version.name,
        "init_adapter": cfg.init_adapter or None,
        "metrics": res.metrics,
        "train_dataset": dataset,
        "objective": objective,
        "method": method,
        "method_reason": why,
    }


def _do_train_classifier(db: Database, settings: Settings, opts: LoopOptions, d: dict[str, Any]) -> dict[str, Any]:
    """Train the next classifier on the sampled classification set.

    The method comes from the same places as a chat cycle's (a ``method=`` override, the train config file,
    ``opts.method``, ``deploy.loop_train_method``): ``feature_extraction``, ``lora`` or ``full``; ``sft`` and
    ``auto`` mean ``lora`` (merged into the classifier: body and head learn); ``dpo`` and ``kto`` are refused (a
    classifier learns from labels). With a production classifier and ``deploy.loop_continue_training`` on, training
    starts from its folder, so the next version keeps what it learned (the same label order when the sample has
    the same classes, a fresh head otherwise); else from its base model (or the default base)."""
    from tuneloop.config import parse_overrides
    from tuneloop.modelcache import DEFAULT_BASE, resolve_model
    from tuneloop.registry import get_version
    from tuneloop.trainer.config import CLASSIFICATION_METHODS
    from tuneloop.trainer.train import train

    requested, source = _requested_method(opts, settings)
    if requested in ("sft", "auto"):
        method, why = "lora", f"{requested} from {source}: a LoRA merged into the classifier"
    elif requested in CLASSIFICATION_METHODS:
        method, why = requested, f"{requested} from {source}"
    else:
        raise LoopError(
            f"method {requested!r} ({source}) does not train a classifier, which learns from labels: choose "
            f"{', '.join(CLASSIFICATION_METHODS)} (sft and auto mean lora)"
        )
    parent = get_version(db, d["parent"]) if d.get("parent") else None
    if parent is not None and settings.deploy.loop_continue_training:
        base = parent.name  # the production classifier's own folder
    elif parent is not None:
        base = parent.base_model
    else:
        base = str(resolve_model(settings.server.model or DEFAULT_BASE, settings.paths.models_path))
    overrides = [o for o in opts.train_overrides if not {"method", "task"} & set(parse_overrides([o]))]
    overrides += [f"method={method}", "task=classification"]
    cfg = build_train_config(
        dataclasses.replace(opts, train_overrides=overrides), base, d["dataset"], d["version"], d.get("parent")
    )
    res = train(cfg, db, settings, progress=opts.progress)
    return {
        "run_id": res.run_id,
        "version": res.version.name,
        "base": base,
        "metrics": res.metrics,
        "train_dataset": d["dataset"],
        "objective": "classification",
        "method": method,
        "method_reason": why,
    }


def _is_lora(path: str) -> bool:
    import json
    from pathlib import Path

    f = Path(path) / "adapter_config.json"
    return f.is_file() and json.loads(f.read_text()).get("peft_type") == "LORA"


def _do_gate(
    db: Database, settings: Settings, opts: LoopOptions, d: dict[str, Any], generator: Generator | None = None
) -> dict[str, Any]:
    from tuneloop.deploy.gate import run_gate
    from tuneloop.registry import version_by_stage

    # three sets by default: the production slice (the sample's held-out requests), the retention set (the
    # production version's training data, against forgetting) and the golden prompts (option or deploy.gate_golden)
    prod = version_by_stage(db, "production", task=opts.task)
    retention = opts.general or (prod.dataset_id if prod is not None and prod.name != d["version"] else None)
    golden = opts.golden or settings.deploy.gate_golden or None
    r = run_gate(
        db,
        settings,
        d["version"],
        dataset=d["dataset"],
        golden=golden,
        general=retention,
        limit=opts.eval_limit,
        actor=opts.actor,
        generator=generator,
    )
    return {
        "sets": {"production_slice": d["dataset"], "retention": retention, "golden": golden},
        "passed": r.passed,
        "baseline": r.baseline,
        "message": r.message(),
        "report_id": r.report_id,
        "checks": [dataclasses.asdict(c) for c in r.checks],
    }


def _do_canary(
    db: Database,
    settings: Settings,
    opts: LoopOptions,
    d: dict[str, Any],
    on_start: Callable[[Canary], None] | None = None,
) -> dict[str, Any]:
    from tuneloop.monitoring import canary
    from tuneloop.registry import version_by_stage
    from tuneloop.store_deploy import last_canary_of, promote_version

    name = d["version"]
    prod = version_by_stage(db, "production", task=opts.task)
    if prod is None or not opts.canary:
        why = "first production version" if prod is None else "canary disabled"
        promote_version(db, name, actor=opts.actor, reason=f"loop: gate passed; {why}")
        return {"outcome": "promoted", "reason": f"promoted directly ({why})"}
    run = canary.running(db, task=opts.task)
    if run is not None and run.candidate != name:
        raise LoopError(f"another canary ({run.candidate}) is running: decide it before this cycle can canary {name}")
    if run is None:
        done = last_canary_of(db, name)
        if done is not None:  # decided while we were away (e.g. by `deploy canary --watch` or by hand)
            st = done.status
            return {
                "outcome": "promoted" if st == "promoted" else "rolled_back",
                "canary_id": None,
                "reason": f"canary already {st}",
            }
        run = canary.start(
            db, name, opts.canary_share or settings.deploy.canary_share, actor=opts.actor, reason="loop: gate passed"
        )
        if on_start is not None:
            on_start(run)
    if opts.canary_server_judge_s > 0:  # a live server judges running canaries by itself: give it time
        deadline = time.monotonic() + opts.canary_server_judge_s
        while time.monotonic() < deadline and canary.get(db, run.id).status == "running":
            time.sleep(min(1.0, opts.canary_poll_s))
    timeout = (
        opts.canary_timeout_s
        if opts.canary_timeout_s is not None
        else settings.deploy.canary_max_minutes * 60 + 2 * opts.canary_poll_s
    )
    dec = None
    if canary.get(db, run.id).status == "running":
        try:
            dec = canary.watch(
                db,
                run.id,
                settings.deploy,
                poll_s=opts.canary_poll_s,
                timeout_s=timeout,
                actor=opts.actor,
                on_tick=(lambda x: print(f"  canary: {x.summary()}", flush=True)) if opts.progress else None,
            )
        except canary.CanaryError:
            if canary.get(db, run.id).status == "running":  # undecided at the deadline
                if not opts.canary_rollback_undecided:
                    raise
                dec = _rollback_undecided(db, settings, opts, run.id)
            # else: decided meanwhile by someone else (a live server's judge)
    if dec is None:
        c = canary.get(db, run.id)
        info = c.decision or {}
        reasons = [str(r) for r in (info.get("reasons") or [info.get("reason", "")])]
        by = str(info.get("actor", "server"))
        return {
            "canary_id": run.id,
            "outcome": "promoted" if c.status == "promoted" else "rolled_back",
            "summary": f"canary {run.id}: {c.status} by {by}: {'; '.join(reasons)}",
            "reason": "; ".join(reasons),
            "reasons": reasons,
            "decided_by": by,
        }
    return {
        "canary_id": run.id,
        "outcome": "promoted" if dec.action == "promote" else "rolled_back",
        "summary": dec.summary(),
        "reason": "; ".join(dec.reasons),
        "reasons": dec.reasons,
        "decided_by": opts.actor,
    }


def _rollback_undecided(db: Database, settings: Settings, opts: LoopOptions, canary_id: str) -> Decision | None:
    """Judge once more and apply; a verdict of ``wait`` becomes a rollback. None when decided meanwhile elsewhere."""
    from tuneloop.monitoring import canary

    try:
        dec = canary.judge(db, canary_id, settings.deploy)
        if dec.action == "wait":
            dec.action = "rollback"
            dec.reasons = [*dec.reasons, "undecided at the deadline (not enough canary traffic): rolled back"]
        canary.apply(db, dec, actor=opts.actor)
    except canary.CanaryError:
        if canary.get(db, canary_id).status == "running":
            raise
        return None
    return dec
