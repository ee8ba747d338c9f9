"""The canary's confidence sequences stay valid however often they are looked at."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tuneloop.monitoring.sequential import EVERYTHING, bernoulli, diff_cs, half_width

ALPHA, TAU, RUNS, LOOKS, STEP = 0.05, 0.1, 1000, 200, 10  # 200 looks, 10 canary + 90 production observations apart


def _paths(p_canary: float, p_prod: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative yes-counts and sizes of both arms at every look, for RUNS simulated canaries."""
    rng = np.random.default_rng(seed)
    kc = rng.binomial(STEP, p_canary, (RUNS, LOOKS)).cumsum(1)
    kp = rng.binomial(9 * STEP, p_prod, (RUNS, LOOKS)).cumsum(1)
    nc = np.arange(1, LOOKS + 1) * STEP
    return kc, kp, nc, nc * 9


def _ever_misses(true_diff: float, interval) -> float:
    kc, kp, nc, np_ = _paths(0.3 + true_diff, 0.3, seed=7)
    missed = np.zeros(RUNS, dtype=bool)
    for j in range(LOOKS):
        for i in np.flatnonzero(~missed):
            lo, hi = interval(bernoulli(int(kc[i, j]), int(nc[j])), bernoulli(int(kp[i, j]), int(np_[j])))
            missed[i] = not lo <= true_diff <= hi
    return float(missed.mean())


def test_the_sequence_covers_the_true_difference_at_every_one_of_200_looks_in_at_least_95_percent_of_1000_runs():
    def cs(c, p):
        iv = diff_cs(c, p, ALPHA, TAU)
        return iv.lo, iv.hi

    assert _ever_misses(0.0, cs) <= ALPHA
    assert _ever_misses(0.1, cs) <= ALPHA


def test_a_fixed_sample_95_percent_interval_peeked_at_every_look_misses_far_more_often():
    def peeked(c, p):
        d, v = c[0] - p[0], c[1] / c[2] + p[1] / p[2]
        return d - 1.96 * math.sqrt(v), d + 1.96 * math.sqrt(v)

    assert _ever_misses(0.0, peeked) >= 3 * ALPHA  # why the judge cannot use ordinary intervals


def test_the_interval_narrows_as_data_grows_and_an_empty_arm_gives_the_whole_line():
    widths = [half_width(0.21 / n + 0.21 / (9 * n), TAU, ALPHA) for n in (50, 200, 800, 3200)]
    assert widths == sorted(widths, reverse=True) and widths[-1] < 0.05
    assert diff_cs(bernoulli(0, 0), bernoulli(3, 10), ALPHA, TAU) == EVERYTHING


def test_an_arm_with_no_events_yet_keeps_a_positive_variance():
    mean, var, n = bernoulli(0, 40)
    assert (mean, n) == (0.0, 40) and var == pytest.approx((0.5 / 41) * (1 - 0.5 / 41))
    iv = diff_cs(bernoulli(0, 40), bernoulli(0, 360), ALPHA, 0.02)
    assert iv.lo < -0.02 and iv.hi > 0.02  # 0 errors in 40 requests cannot show a 2-point margin
