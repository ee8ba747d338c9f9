"""Always-valid confidence sequences for comparing a canary with production.

Contract
--------
A canary is judged again and again while its traffic grows; a fixed-sample
confidence interval checked at every look would promote a worse canary far more
often than its nominal error rate. This module gives intervals that hold
*simultaneously at every sample size*, so the judge may look as often as it likes.

* :func:`diff_cs` — the mixture-SPRT confidence sequence for a difference of two
  means (Johari, Koomen, Pekelis and Walsh, "Always valid inference: continuous
  monitoring of A/B tests", Operations Research 2022; the normal-mixture boundary of
  Robbins). With the difference of the running means ``d``, its estimated variance
  ``V = var_canary / n_canary + var_production / n_production`` and a normal mixing
  distribution of variance ``tau^2`` over the true difference,

      d +/- sqrt( V (V + tau^2) / tau^2 * log( (V + tau^2) / (V alpha^2) ) )

  covers the true difference at every sample size at once with probability at least
  ``1 - alpha`` (exactly for Gaussian data with known variance, asymptotically with
  the plug-in variances used here). ``tau`` says which differences the test is
  tuned to detect; the canary judge uses each metric's margin.
* :func:`bernoulli` — ``(mean, variance, n)`` of yes/no observations. The variance
  is floored at that of ``(k + 1/2) / (n + 1)`` so that an arm with no errors yet
  (observed variance 0) does not make the interval collapse to a point.
* The plug-in variances make the guarantee asymptotic; with a handful of
  observations they can be far off (3 thumbs-down out of 3 has variance 0), so an arm
  with fewer than :data:`MIN_N` observations gives the whole line: no decision rests
  on fewer than 50 observations per arm.
* :class:`Interval` is ``(lo, hi)``.

Everything here is a pure function of counts and moments: no I/O, no database.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Interval:
    """A confidence interval ``[lo, hi]`` (``-inf``/``inf`` when there is no data)."""

    lo: float
    hi: float

    def __str__(self) -> str:
        return f"[{self.lo:+.3g}, {self.hi:+.3g}]"


EVERYTHING = Interval(-math.inf, math.inf)
MIN_VAR = 1e-12
MIN_N = 50


def half_width(v: float, tau: float, alpha: float) -> float:
    """Half-width of the normal-mixture confidence sequence for an estimate of variance ``v``."""
    if not 0 < alpha < 1 or tau <= 0:
        raise ValueError(f"alpha must be in (0, 1) and tau > 0, got {alpha}, {tau}")
    v = max(v, MIN_VAR)
    t2 = tau * tau
    return math.sqrt(v * (v + t2) / t2 * math.log((v + t2) / (v * alpha * alpha)))


def diff_cs(
    canary: tuple[float, float, int], production: tuple[float, float, int], alpha: float, tau: float
) -> Interval:
    """Confidence sequence for canary minus production; each arm is ``(mean, variance, n)`` (see module doc)."""
    (mc, vc, nc), (mp, vp, np_) = canary, production
    if nc < MIN_N or np_ < MIN_N:
        return EVERYTHING
    d = mc - mp
    h = half_width(vc / nc + vp / np_, tau, alpha)
    return Interval(d - h, d + h)


def bernoulli(successes: int, n: int) -> tuple[float, float, int]:
    """``(mean, variance, n)`` of ``n`` yes/no observations with ``successes`` yeses (variance floored, see doc)."""
    if n <= 0:
        return 0.0, 0.0, 0
    p = successes / n
    q = (successes + 0.5) / (n + 1)
    return p, max(p * (1.0 - p), q * (1.0 - q)), n
