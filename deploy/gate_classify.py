"""The eval gate for classifiers: macro-F1 on held-out labels, candidate vs production (or the majority class).

Contract
--------
* :func:`macro_f1` — macro-averaged F1 over a fixed label list, ``2tp / (2tp + fp + fn)`` per
  label (0 where a label is neither true nor predicted), equal to scikit-learn's
  ``f1_score(average="macro", labels=labels, zero_division=0)``; vectorised over many
  resamples at once.
* :func:`macro_f1_bootstrap` — the gate's paired bootstrap applied to macro-F1: the same
  resampled example indices for both models (:func:`tuneloop.deploy.gate_stats.bootstrap_indices`,
  the indices :func:`~tuneloop.deploy.gate_stats.paired_bootstrap` draws with the same seed), macro-F1 of
  each model per resample, the percentile CI of the difference. Macro-F1 is not a mean
  of per-example values, so it is recomputed per resample rather than averaged.
* :func:`judge_classification` — pure: a classification eval report
  (:mod:`tuneloop.trainer.classify_eval`: ``references``, ``predictions[model]``,
  ``labels``, ``per_example[model]["correct"]``, ``baseline``) -> :class:`GateResult`.
  ``quality``: the CI's lower bound of the macro-F1 difference >= ``-deploy.gate_min_delta``
  decides; ``accuracy`` (the existing :func:`~tuneloop.deploy.gate_stats.paired_bootstrap` on
  per-example correctness) is reported, not gated. ``baseline="majority"`` compares
  against always predicting the majority training label (``report["baseline"]["label"]``).
* :func:`run_classification_gate` — evaluates a classification candidate against the
  ``production`` classification version (stages are per task:
  :func:`tuneloop.registry.version_by_stage` with ``task="classification"``), or, with none,
  against the majority class, on the candidate dataset's held-out split; judges and
  records the verdict like :func:`tuneloop.deploy.gate.run_gate` (which dispatches here
  for a classification candidate): a ``deploy_events`` row through
  :func:`tuneloop.store_deploy.record_gate_verdict`. This module imports
  :mod:`tuneloop.deploy.gate_stats`, never :mod:`tuneloop.deploy.gate` (which imports it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np

from tuneloop.deploy.gate_stats import Bootstrap, Check, GateError, GateResult, bootstrap_indices, paired_bootstrap

if TYPE_CHECKING:
    from tuneloop.db import Database
    from tuneloop.settings import DeploySettings, Settings

MAJORITY = "majority"


def _codes(values: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    pos = {lab: i for i, lab in enumerate(labels)}
    missing = sorted({v for v in values if v not in pos})
    if missing:
        raise GateError(f"labels {missing} are not in the report's label list {list(labels)}")
    return np.asarray([pos[v] for v in values], dtype=np.int64)


def macro_f1(true: np.ndarray, pred: np.ndarray, num_labels: int) -> np.ndarray:
    """Macro-F1 of each row of ``true``/``pred`` (label codes, shape ``(samples, n)`` or ``(n,)``)."""
    t = np.atleast_2d(true)
    p = np.atleast_2d(pred)
    s = t.shape[0]
    off = (np.arange(s, dtype=np.int64) * num_labels)[:, None]
    size = s * num_labels
    tp = np.bincount((off + t)[t == p], minlength=size).reshape(s, num_labels)
    n_true = np.bincount((off + t).ravel(), minlength=size).reshape(s, num_labels)
    n_pred = np.bincount((off + p).ravel(), minlength=size).reshape(s, num_labels)
    denom = n_true + n_pred  # 2tp + fp + fn
    f1 = np.divide(2.0 * tp, denom, out=np.zeros((s, num_labels)), where=denom > 0)
    return f1.mean(axis=1)


def macro_f1_bootstrap(
    references: Sequence[str],
    candidate: Sequence[str],
    baseline: Sequence[str],
    labels: Sequence[str],
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Bootstrap:
    """Percentile CI of macro-F1(candidate) - macro-F1(baseline) over ``samples`` paired resamples (seeded)."""
    if not (len(references) == len(candidate) == len(baseline)):
        raise GateError(
            f"paired bootstrap needs predictions for the same examples: {len(references)} references, "
            f"{len(candidate)} and {len(baseline)} predictions"
        )
    if not references:
        raise GateError("paired bootstrap needs at least one example")
    k = len(labels)
    t, a, b = (_codes(x, labels) for x in (references, candidate, baseline))
    full = float(macro_f1(t, a, k)[0] - macro_f1(t, b, k)[0])
    deltas = []
    for chunk in np.array_split(bootstrap_indices(len(t), samples, seed), max(1, samples * len(t) // 2_000_000)):
        deltas.append(macro_f1(t[chunk], a[chunk], k) - macro_f1(t[chunk], b[chunk], k))
    d = np.concatenate(deltas)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(d, [alpha, 1 - alpha])
    return Bootstrap(full, float(lo), float(hi), samples, confidence)


def judge_classification(
    report: dict[str, Any], candidate: str, baseline: str, deploy: DeploySettings, seed: int = 0
) -> GateResult:
    """Judge a classification report (module doc); ``baseline`` is a model of the report or ``"majority"``."""
    if report.get("task") != "classification":
        raise GateError("judge_classification needs a classification eval report (task: classification)")
    refs = [str(x) for x in report["references"]]
    labels = [str(x) for x in report["labels"]]
    preds = report.get("predictions") or {}
    if candidate not in preds:
        raise GateError(f"the eval report has no predictions for {candidate!r} (models: {report.get('models')})")
    if baseline == MAJORITY:
        maj = (report.get("baseline") or {}).get("label")
        if maj is None:
            raise GateError("the eval report has no majority-class baseline")
        base_preds = [str(maj)] * len(refs)
        base_name = f"majority class ({maj})"
    elif baseline in preds:
        base_preds, base_name = [str(x) for x in preds[baseline]], baseline
    else:
        raise GateError(f"the eval report has no predictions for {baseline!r} (models: {report.get('models')})")
    cand_preds = [str(x) for x in preds[candidate]]
    bs = macro_f1_bootstrap(refs, cand_preds, base_preds, labels, deploy.bootstrap_samples, 0.95, seed)
    k = len(labels)
    t = _codes(refs, labels)
    f_c = float(macro_f1(t, _codes(cand_preds, labels), k)[0])
    f_b = float(macro_f1(t, _codes(base_preds, labels), k)[0])
    need = 0.0 - deploy.gate_min_delta  # 0.0 - 0.0 prints as +0.0000, not -0.0000
    correct_c = [float(p == r) for p, r in zip(cand_preds, refs)]
    correct_b = [float(p == r) for p, r in zip(base_preds, refs)]
    acc = paired_bootstrap(correct_c, correct_b, deploy.bootstrap_samples, 0.95, seed)
    checks = [
        Check(
            "quality",
            bs.ci_low >= need,
            bs.ci_low,
            need,
            f"macro_f1 candidate {f_c:.4f} vs {f_b:.4f}, delta {bs.mean_delta:+.4f}, 95% CI "
            f"[{bs.ci_low:+.4f}, {bs.ci_high:+.4f}] over {bs.samples} paired resamples; lower bound must be "
            f">= {need:+.4f}",
        ),
        Check(
            "accuracy",
            True,
            acc.ci_low,
            None,
            f"accuracy candidate {np.mean(correct_c):.4f} vs {np.mean(correct_b):.4f}, delta {acc.mean_delta:+.4f}, "
            f"95% CI [{acc.ci_low:+.4f}, {acc.ci_high:+.4f}] (reported; the gate decides on macro-F1)",
            skipped=True,
        ),
    ]
    return GateResult(
        candidate,
        base_name,
        "macro_f1",
        all(c.passed for c in checks),
        checks,
        len(refs),
        report_id=report.get("id"),
        extra={
            "bootstrap": asdict(bs),
            "accuracy_bootstrap": asdict(acc),
            "summary": {
                candidate: {"macro_f1": f_c, "accuracy": float(np.mean(correct_c))},
                base_name: {"macro_f1": f_b, "accuracy": float(np.mean(correct_b))},
            },
        },
    )


def run_classification_gate(
    db: Database,
    settings: Settings,
    candidate: str,
    dataset: str | None = None,
    limit: int | None = None,
    actor: str = "gate",
    seed: int = 0,
) -> GateResult:
    """Evaluate a classifier against the production classifier (or the majority class), judge, record."""
    from tuneloop.registry import get_version, version_by_stage
    from tuneloop.store_deploy import record_gate_verdict
    from tuneloop.trainer.classify_eval import evaluate_classifiers
    from tuneloop.trainer.evaluate import resolve_models

    v = get_version(db, candidate)
    ds = dataset or v.dataset_id
    if not ds:
        raise GateError(f"{candidate} has no dataset recorded; pass --dataset with a held-out split")
    prod = version_by_stage(db, "production", task="classification")
    models = [candidate] if prod is None or prod.name == candidate else [candidate, prod.name]
    refs = resolve_models(models, db, settings)
    report = evaluate_classifiers([(m.name, m.base, m.adapter) for m in refs], ds, db, settings, limit, progress=False)
    baseline = models[1] if len(models) > 1 else MAJORITY
    result = judge_classification(report, candidate, baseline, settings.deploy, seed=seed)
    result.extra["dataset"] = ds
    record_gate_verdict(db, candidate, result.passed, result.baseline, {"gate": result.to_dict()}, actor=actor)
    return result
