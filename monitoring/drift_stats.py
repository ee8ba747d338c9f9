"""Drift statistics: pure functions of numpy arrays and value counts.

Contract
--------
Every function here is a pure function of its array / count arguments (and, where
it samples, an explicit ``numpy.random.Generator`` or seed): no I/O, no database,
no settings. :mod:`monitoring.drift` aggregates production windows and compares
them with a profile using these. Each statistic is checked against scipy or a
reference implementation in ``tests/test_drift_stats.py``.

Conventions
-----------
* PSI (:func:`psi`, :func:`psi_counts`, :func:`psi_from_bins`): population
  stability index ``sum((q - p) * ln(q / p))`` over bins whose inner edges are
  the reference's 1/bins .. (bins-1)/bins quantiles (:func:`quantile_edges`,
  ties merged, right-closed bins ``(-inf, e1], ..., (ek, inf)``,
  :func:`bin_counts`); bin shares are clipped below at ``PSI_EPS``; natural log.
* KS (:func:`ks_counts`): two-sided two-sample Kolmogorov-Smirnov (statistic,
  p-value) from value counts, as ``scipy.stats.ks_2samp``: exact when both
  samples have at most 10,000 values, else the asymptotic Kolmogorov
  distribution with n*m/(n+m).
* Wasserstein (:func:`wasserstein_counts`): earth mover's distance between two
  value-count distributions (``scipy.stats.wasserstein_distance``).
* JS (:func:`js_divergence`): Jensen-Shannon divergence of two count or
  probability vectors, in bits by default (0..1), i.e. scipy's
  ``jensenshannon(p, q, base=2) ** 2``.
* MMD (:func:`mmd2_unbiased`, :func:`mmd_permutation_test`): unbiased MMD² with
  an RBF kernel ``exp(-d² / (2 bw²))`` (:func:`rbf_kernel`) whose bandwidth is the
  median pairwise Euclidean distance of the pooled sample
  (:func:`median_bandwidth`, 1.0 if that is 0); permutation p-value
  ``(1 + #{perm >= observed}) / (1 + permutations)``.
* Null calibration (:func:`null_quantile`): the ``NULL_QUANTILE`` (0.99)
  quantile of a statistic between a reference distribution and ``NULL_DRAWS``
  same-sized multinomial samples drawn from it, i.e. the statistic's spread
  when nothing changed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike

from tuneloop.errors import UserError

PSI_EPS = 1e-4
NULL_DRAWS = 200
NULL_QUANTILE = 0.99


def quantile_edges(ref_values: ArrayLike, ref_counts: ArrayLike | None = None, bins: int = 10) -> np.ndarray:
    """Inner bin edges at the reference's 1/bins .. (bins-1)/bins quantiles (ties merged).

    Bins are right-closed: (-inf, e1], (e1, e2], ..., (ek, inf).
    """
    v = np.asarray(ref_values, dtype=float)
    c = np.ones_like(v) if ref_counts is None else np.asarray(ref_counts, dtype=float)
    order = np.argsort(v, kind="stable")
    v, c = v[order], c[order]
    cdf = np.cumsum(c) / c.sum()
    qs = np.arange(1, bins) / bins
    edges = v[np.minimum(np.searchsorted(cdf, qs, side="left"), len(v) - 1)]
    edges = np.unique(edges)
    return edges[edges < v[-1]] if len(edges) else edges  # an edge at the max leaves an empty last bin


def bin_counts(edges: np.ndarray, values: ArrayLike, counts: ArrayLike | None = None) -> np.ndarray:
    """Counts per right-closed bin defined by ``edges`` (len(edges) + 1 bins)."""
    idx = np.searchsorted(edges, np.asarray(values, dtype=float), side="left")
    w = None if counts is None else np.asarray(counts, dtype=float)
    return np.bincount(idx, weights=w, minlength=len(edges) + 1).astype(float)


def psi_from_bins(ref_bins: np.ndarray, prod_bins: np.ndarray, eps: float = PSI_EPS) -> float:
    """PSI = sum((q - p) * ln(q / p)) over bins, shares clipped at ``eps``."""
    p = np.clip(ref_bins / ref_bins.sum(), eps, None)
    q = np.clip(prod_bins / prod_bins.sum(), eps, None)
    return float(np.sum((q - p) * np.log(q / p)))


def psi_counts(
    ref_values: ArrayLike,
    ref_counts: ArrayLike | None,
    prod_values: ArrayLike,
    prod_counts: ArrayLike | None,
    bins: int = 10,
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """(PSI, edges, reference bin counts, production bin counts) from value counts."""
    edges = quantile_edges(ref_values, ref_counts, bins)
    rb, pb = bin_counts(edges, ref_values, ref_counts), bin_counts(edges, prod_values, prod_counts)
    return psi_from_bins(rb, pb), edges, rb, pb


def psi(reference: Sequence[float], production: Sequence[float], bins: int = 10) -> float:
    """PSI of two raw samples over ``bins`` reference-quantile bins."""
    return psi_counts(np.asarray(reference), None, np.asarray(production), None, bins)[0]


def null_quantile(
    stat: Callable[[np.ndarray], float],
    p: np.ndarray,
    n: int,
    rng: np.random.Generator,
    draws: int = NULL_DRAWS,
    q: float = NULL_QUANTILE,
) -> float:
    """``q`` quantile of ``stat(multinomial(n, p))``: the statistic's spread when nothing changed."""
    if n <= 0:
        return 0.0
    samples = rng.multinomial(int(n), p / p.sum(), size=draws).astype(float)
    return float(np.quantile([stat(s) for s in samples], q))


def ks_counts(
    ref_values: ArrayLike, ref_counts: ArrayLike, prod_values: ArrayLike, prod_counts: ArrayLike
) -> tuple[float, float]:
    """Two-sided two-sample KS (statistic, p-value) from value counts, as ``scipy.stats.ks_2samp``.

    Exact p-value (scipy) when both samples have at most 10,000 values, else the
    asymptotic Kolmogorov distribution with n*m/(n+m) (scipy's ``method='asymp'``).
    """
    from scipy import stats

    rv, rc = np.asarray(ref_values, dtype=float), np.asarray(ref_counts, dtype=np.int64)
    pv, pc = np.asarray(prod_values, dtype=float), np.asarray(prod_counts, dtype=np.int64)
    n, m = int(rc.sum()), int(pc.sum())
    if n == 0 or m == 0:
        raise UserError("KS needs at least one value on each side")
    if max(n, m) <= 10_000:
        r = stats.ks_2samp(np.repeat(rv, rc), np.repeat(pv, pc))
        return float(r.statistic), float(r.pvalue)
    grid = np.union1d(rv, pv)
    o1, o2 = np.argsort(rv), np.argsort(pv)
    cdf1 = np.cumsum(rc[o1])[np.searchsorted(rv[o1], grid, side="right") - 1] / n
    cdf1[np.searchsorted(rv[o1], grid, side="right") == 0] = 0
    cdf2 = np.cumsum(pc[o2])[np.searchsorted(pv[o2], grid, side="right") - 1] / m
    cdf2[np.searchsorted(pv[o2], grid, side="right") == 0] = 0
    d = float(np.max(np.abs(cdf1 - cdf2)))
    en = n * m / (n + m)
    return d, float(np.clip(stats.kstwo.sf(d, np.round(en)), 0, 1))


def wasserstein_counts(
    ref_values: ArrayLike, ref_counts: ArrayLike, prod_values: ArrayLike, prod_counts: ArrayLike
) -> float:
    """Earth mover's distance between two value-count distributions (``scipy.stats.wasserstein_distance``)."""
    from scipy import stats

    return float(stats.wasserstein_distance(ref_values, prod_values, ref_counts, prod_counts))


def js_divergence(p: np.ndarray, q: np.ndarray, base: float = 2.0) -> float:
    """Jensen-Shannon divergence of two count/probability vectors (bits by default; 0..1 in base 2)."""
    p = np.asarray(p, dtype=float)
    q = np.asarray(q, dtype=float)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / m[nz])))

    return max(0.0, (kl(p) + kl(q)) / 2 / np.log(base))


def rbf_kernel(z: np.ndarray, bandwidth: float) -> np.ndarray:
    sq = np.sum(z * z, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0)
    return np.exp(-d2 / (2 * bandwidth**2))


def median_bandwidth(z: np.ndarray) -> float:
    """Median heuristic: the median pairwise Euclidean distance of the pooled sample."""
    sq = np.sum(z * z, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0)
    iu = np.triu_indices(len(z), k=1)
    med = float(np.median(np.sqrt(d2[iu])))
    return med if med > 0 else 1.0


def _mmd2_from_kernel(k: np.ndarray, ix: np.ndarray, iy: np.ndarray) -> float:
    n, m = len(ix), len(iy)
    kxx, kyy, kxy = k[np.ix_(ix, ix)], k[np.ix_(iy, iy)], k[np.ix_(ix, iy)]
    return float(
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    )


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, bandwidth: float | None = None) -> float:
    """Unbiased MMD² between samples ``x`` and ``y`` (rows) with an RBF kernel."""
    z = np.vstack([x, y]).astype(np.float64)
    bw = bandwidth or median_bandwidth(z)
    return _mmd2_from_kernel(rbf_kernel(z, bw), np.arange(len(x)), np.arange(len(x), len(z)))


def mmd_permutation_test(x: np.ndarray, y: np.ndarray, permutations: int = 200, seed: int = 0) -> dict[str, float]:
    """MMD² with its permutation p-value ``(1 + #{perm >= observed}) / (1 + permutations)`` and bandwidth."""
    if len(x) < 2 or len(y) < 2:
        raise UserError("the embedding test needs at least 2 rows per side")
    z = np.vstack([x, y]).astype(np.float64)
    bw = median_bandwidth(z)
    k = rbf_kernel(z, bw)
    n = len(x)
    idx = np.arange(len(z))
    obs = _mmd2_from_kernel(k, idx[:n], idx[n:])
    rng = np.random.default_rng(seed)
    perm = np.empty(permutations)
    for i in range(permutations):
        p = rng.permutation(len(z))
        perm[i] = _mmd2_from_kernel(k, p[:n], p[n:])
    pval = (1 + int(np.sum(perm >= obs))) / (1 + permutations)
    return {"mmd2": obs, "pvalue": pval, "bandwidth": bw, "null_q99": float(np.quantile(perm, 0.99))}
