"""What every gate shares: verdict types and the paired bootstrap (chat and classification gates).

Contract
--------
* :class:`GateError` — the gate could not judge (a :class:`~tuneloop.errors.UserError`).
* :class:`Check` / :class:`GateResult` — one criterion / a verdict (``message()``, ``to_dict()``).
* :func:`bootstrap_indices` — ``samples`` resamples of ``n`` example indices, seeded: every
  paired bootstrap draws these, so both models are always scored on the same examples.
* :func:`paired_bootstrap` — mean of ``candidate - baseline`` per example and its percentile
  confidence interval over those resamples (:class:`Bootstrap`).

:mod:`tuneloop.deploy.gate` (chat) and :mod:`tuneloop.deploy.gate_classify` (macro-F1) both
use these; ``gate`` dispatches to ``gate_classify``, so they live here rather than in either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tuneloop.errors import UserError


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


def bootstrap_indices(n: int, samples: int, seed: int = 0) -> np.ndarray:
    """``samples`` resamples (rows) of ``n`` example indices drawn with replacement (seeded): every paired
    bootstrap here (:func:`paired_bootstrap`, the classification gate's macro-F1) draws these."""
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


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
    means = d[bootstrap_indices(len(d), samples, seed)].mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return Bootstrap(float(d.mean()), float(lo), float(hi), samples, confidence)
