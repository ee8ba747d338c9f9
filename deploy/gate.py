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
* :func:`last_gate` — the latest recorded verdict for a version.
* :func:`production_answers` — production's logged answers for the ``shift`` check:
  DuckDB SQL (``json_extract`` on the logged parameters) on
  :meth:`Database.analytics`; on PostgreSQL only that version's successful chats are
  copied over (``where``). The deploy tables are read and written only through
  :mod:`tuneloop.store_deploy` and :mod:`tuneloop.registry`, on both backends.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tuneloop.db import Database, loads
from tuneloop.errors import UserError

if TYPE_CHECKING:
    from tuneloop.settings import DeploySettings, Settings
    from tuneloop.trainer.evaluate import Generator


class GateError(UserError, ValueError):
    """The gate could not judge (bad report, mismatched examples ...)."""


@dataclass
class Check:
    name: str
    passed: bool
    value: float | None
    threshold: float | None
    detail: str
    skipped: bool = False


@dataclass
class GateResult:
    candidate: str
    baseline: str
    metric: str
    passed: bool
    checks: list[Check]
    n_examples: int
    report_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def message(self) -> str:
        head = f"gate {'PASSED' if self.passed else 'FAILED'}: {self.candidate} vs {self.baseline} ({self.n_examples} held-out examples)"
        lines = [head] + [
            f"  [{'skip' if c.skipped else ('ok' if c.passed else 'FAIL')}] {c.name}: {c.detail}" for c in self.checks
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Bootstrap:
    mean_delta: float
    ci_low: float
    ci_high: float
    samples: int
    confidence: float


def paired_bootstrap(
    candidate: Sequence[float] | np.ndarray,
    baseline: Sequence[float] | np.ndarray,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Bootstrap:
    """Percentile CI of mean(candidate - baseline) over ``samples`` paired resamples (seeded)."""
    a = np.asarray(candidate, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise GateError(f"paired bootstrap needs two equal-length lists, got {a.shape} and {b.shape}")
    if len(a) == 0:
        raise GateError("paired bootstrap needs at least one example")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise GateError("per-example metrics contain NaN or infinity")
    d = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(samples, len(d)))
    means = d[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return Bootstrap(float(d.mean()), float(lo), float(hi), samples, confidence)


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
    metric = deploy.gate_metric
    a = _per_example(report, candidate, metric)
    b = _per_example(report, baseline, metric)
    if len(a) != len(b):
        raise GateError(
            f"{candidate} has {len(a)} per-example values but {baseline} has {len(b)}: not the same examples"
        )
    bs = paired_bootstrap(a, b, deploy.bootstrap_samples, 0.95, seed)
    need = -deploy.gate_min_delta
    checks = [
        Check(
            "quality",
            bs.ci_low >= need,
            bs.ci_low,
            need,
            f"{metric} candidate {np.mean(a):.4f} vs {np.mean(b):.4f}, mean delta {bs.mean_delta:+.4f}, "
            f"95% CI [{bs.ci_low:+.4f}, {bs.ci_high:+.4f}] over {bs.samples} paired resamples; "
            f"lower bound must be >= {need:+.4f}",
        )
    ]

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
) -> GateResult:
    """Evaluate ``candidate`` against production (or its base) and judge; records the verdict.

    Answers are generated on ``generator`` when one is given (an engine the caller keeps running across
    gates), else on the engine ``deploy.eval_backend`` names, started and freed here.
    """
    from tuneloop.registry import get_version, unservable_reason
    from tuneloop.trainer.evaluate import evaluate

    v = get_version(db, candidate)
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
    names = report.get("models") or [candidate, ref]
    result = judge_report(report, names[0], names[1], settings.deploy, seed=seed)
    result.candidate, result.baseline = candidate, label if label != "base" else f"base ({ref})"
    result.extra["dataset"] = ds
    record_verdict(db, candidate, result, actor)
    return result


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
