"""Each drift statistic matches scipy or a straightforward reference implementation on fixed inputs,
raises no false alarm on same-distribution samples and fires on a real shift."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon

from tuneloop.errors import UserError
from tuneloop.monitoring import drift, drift_stats


def _vc(x):
    v, c = np.unique(np.asarray(x), return_counts=True)
    return v, c


def test_ks_matches_scipy_exact_and_asymptotic():
    rng = np.random.default_rng(1)
    small_a, small_b = rng.poisson(20, 300), rng.poisson(22, 120)
    d, p = drift_stats.ks_counts(*_vc(small_a), *_vc(small_b))
    ref = stats.ks_2samp(small_a, small_b)
    assert d == pytest.approx(ref.statistic, abs=1e-12) and p == pytest.approx(ref.pvalue, rel=1e-9)
    big_a, big_b = rng.poisson(30, 50_000), rng.poisson(30.3, 20_000)
    d, p = drift_stats.ks_counts(*_vc(big_a), *_vc(big_b))
    ref = stats.ks_2samp(big_a, big_b, method="asymp")
    assert d == pytest.approx(ref.statistic, abs=1e-12) and p == pytest.approx(ref.pvalue, rel=1e-6)


def test_wasserstein_from_counts_matches_scipy_on_raw_samples():
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 60, 5000), rng.integers(5, 80, 700)
    assert drift_stats.wasserstein_counts(*_vc(a), *_vc(b)) == pytest.approx(stats.wasserstein_distance(a, b), rel=1e-9)


def test_js_divergence_is_scipys_jensenshannon_squared_in_bits():
    p = np.array([10, 0, 3, 7, 1.0])
    q = np.array([1, 4, 3, 0, 9.0])
    assert drift_stats.js_divergence(p, q) == pytest.approx(jensenshannon(p, q, base=2) ** 2, rel=1e-12)
    assert drift_stats.js_divergence(p, p) == pytest.approx(0.0, abs=1e-15)
    assert drift_stats.js_divergence(np.array([1.0, 0]), np.array([0, 1.0])) == pytest.approx(1.0)


def _psi_reference(ref, prod, bins):
    """Textbook PSI: reference deciles via sorted positions, right-closed bins, shares clipped at 1e-4."""
    srt = np.sort(ref)
    edges = sorted({srt[math.ceil(len(srt) * k / bins) - 1] for k in range(1, bins)} - {srt[-1]})

    def shares(x):
        c = [0] * (len(edges) + 1)
        for v in x:
            c[sum(v > e for e in edges)] += 1
        return [max(ci / len(x), 1e-4) for ci in c]

    p, q = shares(ref), shares(prod)
    return sum((qi - pi) * math.log(qi / pi) for pi, qi in zip(p, q))


def test_psi_matches_textbook_definition_on_reference_quantile_bins():
    rng = np.random.default_rng(3)
    ref, prod = rng.poisson(25, 2000), rng.poisson(28, 500)
    assert drift_stats.psi(ref, prod, bins=10) == pytest.approx(_psi_reference(ref, prod, 10), rel=1e-9)
    # ties collapse bins, and a value range the reference never saw lands in the outer bins
    ref2, prod2 = np.array([1, 1, 1, 1, 2, 2, 3, 9]), np.array([0, 50, 50, 2, 1])
    assert drift_stats.psi(ref2, prod2, bins=4) == pytest.approx(_psi_reference(ref2, prod2, 4), rel=1e-9)
    assert drift_stats.psi(ref, ref, bins=10) == pytest.approx(0.0, abs=1e-12)


def _mmd2_loops(x, y, bw):
    def k(a, b):
        return math.exp(-float(np.sum((a - b) ** 2)) / (2 * bw * bw))

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_mmd_matches_double_loop_definition_with_median_bandwidth():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(12, 5)), rng.normal(0.5, 1, size=(9, 5))
    z = np.vstack([x, y])
    dists = [np.linalg.norm(z[i] - z[j]) for i in range(len(z)) for j in range(i + 1, len(z))]
    bw = float(np.median(dists))
    assert drift_stats.median_bandwidth(z) == pytest.approx(bw, rel=1e-9)
    assert drift_stats.mmd2_unbiased(x, y) == pytest.approx(_mmd2_loops(x, y, bw), rel=1e-9)


def test_mmd_permutation_test_false_alarms_at_most_5_percent_and_detects_a_shift():
    alarms = 0
    for seed in range(40):
        rng = np.random.default_rng(100 + seed)
        t = drift_stats.mmd_permutation_test(
            rng.normal(size=(60, 8)), rng.normal(size=(60, 8)), permutations=100, seed=seed
        )
        alarms += t["pvalue"] < 0.01
    assert alarms <= 2  # 5% of 40
    rng = np.random.default_rng(7)
    t = drift_stats.mmd_permutation_test(rng.normal(size=(60, 8)), rng.normal(0.6, 1, size=(60, 8)), permutations=100)
    assert t["pvalue"] < 0.01 and t["mmd2"] > t["null_q99"]


def test_psi_and_ks_false_alarm_rates_on_same_distribution_and_detect_a_length_shift():
    psi_alarms = ks_alarms = 0
    ref = np.random.default_rng(0).poisson(30, 5000)
    rv, rc = _vc(ref)
    for seed in range(40):
        prod = np.random.default_rng(seed + 1).poisson(30, 300)
        value, _edges, rb, _pb = drift_stats.psi_counts(rv, rc, *_vc(prod), bins=10)
        null = drift_stats.null_quantile(
            lambda s: drift_stats.psi_from_bins(rb, s),  # noqa: B023
            rb,
            len(prod),
            np.random.default_rng(seed),
        )
        psi_alarms += value > max(0.2, null)
        ks_alarms += drift_stats.ks_counts(rv, rc, *_vc(prod))[1] < 0.01
    assert psi_alarms <= 2 and ks_alarms <= 2
    shifted = np.random.default_rng(99).poisson(40, 300)
    assert drift_stats.psi(ref, shifted) > 0.2
    assert drift_stats.ks_counts(rv, rc, *_vc(shifted))[1] < 1e-6


@pytest.mark.parametrize(
    "text,seconds,requests",
    [("30m", 1800, None), ("1h", 3600, None), ("2d", 172800, None), ("45s", 45, None), ("500r", None, 500)],
)
def test_windows_are_durations_or_request_counts(text, seconds, requests):
    w = drift.parse_window(text)
    assert (w.seconds, w.requests) == (seconds, requests)


@pytest.mark.parametrize("bad", ["", "1y", "-5m", "0r", "abc", "10"])
def test_bad_window_is_a_user_error(bad):
    with pytest.raises(UserError, match="bad window"):
        drift.parse_window(bad)


def test_words_and_prompt_text_follow_one_rule_for_logs_and_training_data():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What's AI? E-mail me!"}]
    assert drift.prompt_text(msgs) == "Be brief. What's AI? E-mail me!"
    assert drift.words(drift.prompt_text(msgs)) == ["be", "brief", "what's", "ai", "e", "mail", "me"]


def test_negative_feedback_in_sql_follows_the_one_rating_rule():
    import duckdb

    from tuneloop.ratings import negative_sql, sentiment

    cases = [(r, k) for r in (None, -1, 0, 1, 2, 3, 4, 5) for k in (None, "thumbs", "stars", "THUMBS", "other")]
    con = duckdb.connect()
    try:
        con.execute("CREATE TABLE f (rating INTEGER, rating_kind VARCHAR)")
        con.executemany("INSERT INTO f VALUES (?, ?)", cases)
        got = con.execute(f"SELECT rating, rating_kind, {negative_sql('rating', 'rating_kind')} FROM f").fetchall()
    finally:
        con.close()
    assert len(got) == len(cases)
    for rating, kind, negative in got:
        assert negative is (sentiment(rating, kind) == "negative"), (rating, kind)
