"""The eval gate: nothing is deployed unless it matches or beats what is in production.

Contract
--------
* :func:`paired_bootstrap` — mean of ``candidate - baseline`` per example and
  its percentile confidence interval from ``samples`` paired resamples
  (the same example indices for both models in every resample).
* :func:`judge_report` — pure: an evaluation report (trainer.evaluate's
  contract: ``models``, ``summary[model][metric]``, ``per_example[model][metric]``,
  ``golden[model]``) + :class:`tuneloop.settings.DeploySettings` ->
  :class:`GateResult` with one :class:`Check` per criterion:

  - ``quality``: lower bound of the CI of the per-example ``gate_metric``
    difference >= ``-gate_min_delta`` (``neg_loss`` = minus per-example loss);
  - ``forgetting``: relative increase of ``general_perplexity`` <= ``gate_max_forgetting``
    (skipped when the report has no general set);
  - ``golden``: candidate pass rate >= min(``gate_min_golden_pass``, baseline's rate)
    (skipped without golden prompts; ``deploy.gate_golden`` names a file every gate uses);
  - ``shift``: mean NLL per token of production's logged answers under the candidate
    minus under production <= ``gate_max_shift`` (an estimate of how far the candidate
    moved; skipped when the baseline is a base model or nothing was logged).
* :func:`run_gate` — evaluates a candidate against the production version (or,
  with none yet, against the candidate's base model) on the candidate dataset's
  held-out split, judges, and records the verdict as a ``deploy_events`` row
  (actor ``gate``, stage unchanged; :func:`tuneloop.store_deploy.record_gate_verdict`)
  that ``deploy canary``/``promote`` check.
* A classification candidate (``task`` classification) and a classification report are
  judged by :mod:`tuneloop.deploy.gate_classify` instead (macro-F1 with the same paired
  bootstrap); :func:`run_gate` and :func:`judge_report` dispatch there. The verdict types and
  the bootstrap (:class:`GateResult`, :class:`Check`, :class:`GateError`,
  :func:`paired_bootstrap`) live in :mod:`tuneloop.deploy.gate_stats`, shared by both gates,
  and are importable from here too.
* Per-task gate (``deploy.gate_per_task`` or ``run_gate(per_task=True)``): for a
  candidate trained on a multi-task mix (its dataset's data card has ``mix``,
  :func:`mix_tasks`), :func:`run_gate` also evaluates the candidate and the
  baseline on each input dataset's test split (separate eval reports, same
  engine) and :func:`judge_tasks` adds one ``task <dataset id>`` check per task:
  the same paired bootstrap on ``gate_metric``, lower CI bound >=
  ``-gate_task_min_delta``; ``extra["tasks"]`` holds each task's numbers and
  report id. A candidate not trained on a mix gets one skipped ``tasks`` check.
* :func:`last_gate` — the latest recorded verdict for a version.
* :func:`production_answers` — production's logged answers for the ``shift`` check:
  DuckDB SQL (``json_extract`` on the logged parameters) on
  :meth:`Database.analytics`; on PostgreSQL only that version's successful chats are
  copied over (``where``). The deploy tables are read and written only through
  :mod:`tuneloop.store_deploy` and :mod:`tuneloop.registry`, on both backends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np

from tuneloop.db import Database, loads
from tuneloop.deploy.gate_stats import Bootstrap, Check, GateError, GateResult, paired_bootstrap

if TYPE_CHECKING:
    from tuneloop.settings import DeploySettings, Settings
    from tuneloop.trainer.evaluate import Generator


def _per_example(report: dict[str, Any], model: str, metric: str) -> list[float]:
    pe = report.get("per_example", {}).get(model)
    if pe is None:
        raise GateError(f"the eval report has no per-example metrics for {model!r} (models: {report.get('models')})")
    if metric == "neg_loss":
        if "loss" not in pe:
            raise GateError(f"the eval report has no per-example 'loss' for {model!r}")
        return [-float(v) for v in pe["loss"]]
    if metric not in pe:
        raise GateError(f"the eval report has no per-example {metric!r} for {model!r}; it has: {', '.join(sorted(pe))}")
    return [float(v) for v in pe[metric]]


def judge_report(
    report: dict[str, Any], candidate: str, baseline: str, deploy: DeploySettings, seed: int = 0
) -> GateResult:
    """Apply the gate criteria (module doc) to an eval report; pure, no I/O."""
    if report.get("task") == "classification":  # macro-F1 on labels: tuneloop.deploy.gate_classify
        from tuneloop.deploy.gate_classify import judge_classification

        return judge_classification(report, candidate, baseline, deploy, seed)
    metric = deploy.gate_metric
    a = _per_example(report, candidate, metric)
    b = _per_example(report, baseline, metric)
    if len(a) != len(b):
        raise GateError(
            f"{candidate} has {len(a)} per-example values but {baseline} has {len(b)}: not the same examples"
        )
    quality, bs = _delta_check("quality", a, b, metric, deploy.gate_min_delta, deploy.bootstrap_samples, seed)
    checks = [quality]

    summ = report.get("summary", {})
    pc = (summ.get(candidate) or {}).get("general_perplexity")
    pb = (summ.get(baseline) or {}).get("general_perplexity")
    if pc is None or pb is None:
        checks.append(
            Check("forgetting", True, None, deploy.gate_max_forgetting, "no general set evaluated", skipped=True)
        )
    else:
        rel = float(pc) / float(pb) - 1.0
        checks.append(
            Check(
                "forgetting",
                rel <= deploy.gate_max_forgetting,
                rel,
                deploy.gate_max_forgetting,
                f"general-set perplexity {pc:.3f} vs {pb:.3f} ({rel:+.1%}); at most {deploy.gate_max_forgetting:+.1%} allowed",
            )
        )

    gold = report.get("golden") or {}
    gc, gb = gold.get(candidate), gold.get(baseline)
    if not gc or not gc.get("total"):
        checks.append(Check("golden", True, None, deploy.gate_min_golden_pass, "no golden prompts", skipped=True))
    else:
        rc = gc["passed"] / gc["total"]
        rb = gb["passed"] / gb["total"] if gb and gb.get("total") else 1.0
        need_g = min(deploy.gate_min_golden_pass, rb)
        checks.append(
            Check(
                "golden",
                rc >= need_g - 1e-12,
                rc,
                need_g,
                f"passed {gc['passed']}/{gc['total']} golden prompts ({rc:.0%}); baseline {rb:.0%}; need >= {need_g:.0%}",
            )
        )
    checks.append(_shift_check(summ.get(candidate) or {}, summ.get(baseline) or {}, deploy))
    return GateResult(
        candidate,
        baseline,
        metric,
        all(c.passed for c in checks),
        checks,
        len(a),
        report_id=report.get("id"),
        extra={"bootstrap": asdict(bs), "summary": {m: summ.get(m) for m in (candidate, baseline)}},
    )


def _delta_check(
    name: str, a: list[float], b: list[float], metric: str, min_delta: float, samples: int, seed: int, where: str = ""
) -> tuple[Check, Bootstrap]:
    """Check that the lower bound of the paired-bootstrap 95% CI of mean(a - b) is >= ``-min_delta``."""
    bs = paired_bootstrap(a, b, samples, 0.95, seed)
    need = -min_delta
    check = Check(
        name,
        bs.ci_low >= need,
        bs.ci_low,
        need,
        f"{metric}{where} candidate {np.mean(a):.4f} vs {np.mean(b):.4f}, mean delta {bs.mean_delta:+.4f}, "
        f"95% CI [{bs.ci_low:+.4f}, {bs.ci_high:+.4f}] over {bs.samples} paired resamples; "
        f"lower bound must be >= {need:+.4f}",
    )
    return check, bs


def judge_tasks(
    reports: dict[str, dict[str, Any]], candidate: str, baseline: str, deploy: DeploySettings, seed: int = 0
) -> tuple[list[Check], list[dict[str, Any]]]:
    """Per-task checks (module doc) from one eval report per task (``{dataset id: report}``, each comparing
    ``candidate`` with ``baseline``), and each task's numbers for the gate report; pure, no I/O."""
    metric = deploy.gate_metric
    checks, tasks = [], []
    for task, rep in reports.items():
        a = _per_example(rep, candidate, metric)
        b = _per_example(rep, baseline, metric)
        if len(a) != len(b):
            raise GateError(f"task {task}: {candidate} has {len(a)} per-example values but {baseline} has {len(b)}")
        where = f" on {task}'s {rep.get('split', 'test')} split ({len(a)} examples):"
        check, bs = _delta_check(
            f"task {task}", a, b, metric, deploy.gate_task_min_delta, deploy.bootstrap_samples, seed, where
        )
        checks.append(check)
        tasks.append(
            {
                "dataset": task,
                "passed": check.passed,
                "report_id": rep.get("id"),
                "split": rep.get("split"),
                "n_examples": len(a),
                "candidate": float(np.mean(a)),
                "baseline": float(np.mean(b)),
                "bootstrap": asdict(bs),
            }
        )
    return checks, tasks


def mix_tasks(db: Database, version: str) -> list[str]:
    """The input dataset ids of the multi-task mix ``version`` was trained on (``train datasets=``: its dataset's
    data card ``mix``), in mix order; [] when it was not trained on a mix."""
    from tuneloop.registry import RegistryError, get_dataset, get_version

    ds = get_version(db, version).dataset_id
    if not ds:
        return []
    try:
        card = get_dataset(db, ds).card or {}
    except RegistryError:
        return []
    return [str(m["dataset"]) for m in card.get("mix") or [] if isinstance(m, dict) and m.get("dataset")]


def _shift_check(cand: dict[str, Any], base: dict[str, Any], deploy: DeploySettings) -> Check:
    """How far the candidate moved from production: excess NLL of production's logged answers (nats/token)."""
    nc, nb = cand.get("production_nll"), base.get("production_nll")
    limit = deploy.gate_max_shift
    if nc is None or nb is None:
        return Check("shift", True, None, limit, "no logged production answers scored", skipped=True)
    delta = float(nc) - float(nb)
    allowed = limit < 0 or delta <= limit
    bound = "no limit" if limit < 0 else f"at most {limit:.2f} allowed"
    return Check(
        "shift",
        allowed,
        delta,
        limit,
        f"production's logged answers: NLL {nc:.3f} under the candidate vs {nb:.3f} under production "
        f"({delta:+.3f} nats/token, an estimate of KL(production || candidate)); {bound}",
    )


def production_answers(db: Database, version: str, limit: int) -> list[dict[str, Any]]:
    """The latest ``limit`` successful chat answers ``version`` served (chat completions and the Responses API,
    both logged as a messages list; requests with tools are left out, as their prompt rendered the tool
    definitions too), as ``{"messages": [..., answer]}``."""
    served = (
        "model_version = ? AND status = 200 AND route IN ('chat.completions', 'responses') "
        "AND prompt IS NOT NULL AND response IS NOT NULL AND response <> ''"
    )
    with db.analytics(["requests"], where={"requests": (served, [version])}) as con:  # PostgreSQL: only these rows
        cur = con.execute(
            f"""SELECT prompt, response FROM requests WHERE {served} AND json_extract(params, '$.tools') IS NULL
                ORDER BY received_at DESC LIMIT ?""",
            [version, limit],
        )
        rows = [{"prompt": p, "response": r} for p, r in cur.fetchall()]
    out = []
    for r in rows:
        msgs = loads(r["prompt"]) if isinstance(r["prompt"], str) else r["prompt"]
        if isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "content" in m for m in msgs):
            msgs = [{"role": str(m.get("role", "user")), "content": str(m["content"])} for m in msgs]
            out.append({"messages": [*msgs, {"role": "assistant", "content": r["response"]}]})
    return out


@contextmanager
def eval_generator(settings: Settings, backend: str | None = None) -> Iterator[Generator | None]:
    """The generator evaluation runs on: vLLM's offline engine (freed on exit), or None for transformers."""
    backend = backend or settings.deploy.eval_backend
    if backend == "transformers":
        yield None
        return
    if backend != "vllm":
        raise GateError(f"deploy.eval_backend must be 'vllm' or 'transformers', got {backend!r}")
    from tuneloop.server.offline_engine import OfflineGenerator

    with OfflineGenerator(settings.engine) as g:
        yield g


def baseline_for(db: Database, candidate: str) -> tuple[str, str]:
    """(label, evaluate() reference) of what ``candidate`` must beat: the production version, else its base model."""
    from tuneloop.registry import get_version, version_by_stage

    prod = version_by_stage(db, "production")
    if prod is not None and prod.name != candidate:
        return prod.name, prod.name
    v = get_version(db, candidate)
    return "base", v.base_model


def run_gate(
    db: Database,
    settings: Settings,
    candidate: str,
    dataset: str | None = None,
    golden: str | None = None,
    general: str | None = None,
    limit: int | None = None,
    actor: str = "gate",
    seed: int = 0,
    generator: Generator | None = None,
    per_task: bool | None = None,
) -> GateResult:
    """Evaluate ``candidate`` against production (or its base) and judge; records the verdict.

    Answers are generated on ``generator`` when one is given (an engine the caller keeps running across
    gates), else on the engine ``deploy.eval_backend`` names, started and freed here. ``per_task`` (default
    ``deploy.gate_per_task``) adds the per-task checks of a candidate trained on a mix (module doc); ``limit``
    caps each task's examples too.
    """
    from tuneloop.registry import get_version, unservable_reason
    from tuneloop.trainer.evaluate import evaluate

    v = get_version(db, candidate)
    if v.task == "classification":  # macro-F1 vs the production classifier: tuneloop.deploy.gate_classify
        from tuneloop.deploy.gate_classify import run_classification_gate

        return run_classification_gate(db, settings, candidate, dataset=dataset, limit=limit, actor=actor, seed=seed)
    why = unservable_reason(v.kind, v.path)
    if why:
        raise GateError(f"{candidate} cannot be served, so it cannot pass the gate: {why}")
    ds = dataset or v.dataset_id
    if not ds:
        raise GateError(f"{candidate} has no dataset recorded; pass --dataset with a held-out split")
    label, ref = baseline_for(db, candidate)
    golden = golden or settings.deploy.gate_golden or None
    from tuneloop.trainer.evaluate import check_inputs

    check_inputs(db, settings, [candidate, ref], golden, general)  # before an engine starts
    answers = production_answers(db, ref, settings.deploy.gate_shift_responses) if label != "base" else None
    per_task = settings.deploy.gate_per_task if per_task is None else per_task
    tasks = mix_tasks(db, candidate) if per_task else []
    with nullcontext(generator) if generator is not None else eval_generator(settings) as gen:
        report = evaluate(
            [candidate, ref],
            ds,
            db,
            settings,
            golden=golden,
            general=general,
            limit=limit,
            generator=gen,
            responses=answers,
            max_new_tokens=settings.deploy.gate_max_new_tokens,
        )
        task_reports = {
            t: evaluate(
                [candidate, ref],
                t,
                db,
                settings,
                limit=limit,
                generator=gen,
                max_new_tokens=settings.deploy.gate_max_new_tokens,
            )
            for t in tasks
        }
    names = report.get("models") or [candidate, ref]
    result = judge_report(report, names[0], names[1], settings.deploy, seed=seed)
    if per_task:
        _add_task_checks(result, task_reports, names[0], names[1], settings.deploy, seed)
    result.candidate, result.baseline = candidate, label if label != "base" else f"base ({ref})"
    result.extra["dataset"] = ds
    record_verdict(db, candidate, result, actor)
    return result


def _add_task_checks(
    result: GateResult,
    reports: dict[str, dict[str, Any]],
    candidate: str,
    baseline: str,
    deploy: DeploySettings,
    seed: int,
) -> None:
    """Append the per-task checks (or a skipped ``tasks`` check without a mix) and re-decide ``result``."""
    if not reports:
        result.checks.append(
            Check(
                "tasks",
                True,
                None,
                -deploy.gate_task_min_delta,
                "not trained on a multi-task mix (train datasets=): no per-task test splits",
                skipped=True,
            )
        )
        return
    checks, tasks = judge_tasks(reports, candidate, baseline, deploy, seed)
    result.checks.extend(checks)
    result.extra["tasks"] = tasks
    result.passed = all(c.passed for c in result.checks)


def record_verdict(db: Database, candidate: str, result: GateResult, actor: str = "gate") -> None:
    """Record ``result`` as ``candidate``'s latest gate verdict (a deploy event; the stage is unchanged)."""
    from tuneloop.store_deploy import record_gate_verdict

    record_gate_verdict(db, candidate, result.passed, result.baseline, {"gate": result.to_dict()}, actor=actor)


def last_gate(db: Database, version: str) -> dict[str, Any] | None:
    """The latest recorded gate verdict of ``version`` (``GateResult.to_dict()``), or None."""
    from tuneloop.store_deploy import last_gate_details

    details = last_gate_details(db, version)
    return None if details is None else details.get("gate")


def require_passed(db: Database, version: str) -> dict[str, Any]:
    """The version's latest gate verdict if it passed; else a :class:`GateError` saying what to run."""
    g = last_gate(db, version)
    if g is None:
        raise GateError(
            f"{version} has not been through the gate: run `tuneloop deploy gate {version}` (or pass --force)"
        )
    if not g.get("passed"):
        failed = [c["detail"] for c in g.get("checks", []) if not c.get("passed")]
        raise GateError(
            f"{version} did not pass the gate vs {g.get('baseline')}: {'; '.join(failed)} (pass --force to override)"
        )
    return g
