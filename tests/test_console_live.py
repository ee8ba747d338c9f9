"""The console's live numbers: deltas of the server's own Prometheus counters and histograms (no scrape)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from tuneloop.monitoring.metrics import ServingMetrics
from tuneloop.server.console_live import LiveStats, quantile


def test_quantiles_interpolate_inside_the_bucket_as_histogram_quantile_does():
    buckets = {0.1: 0.0, 0.5: 50.0, 1.0: 100.0, float("inf"): 100.0}
    assert quantile(0.5, buckets) == pytest.approx(0.5)
    assert quantile(0.25, buckets) == pytest.approx(0.3)  # halfway through the (0.1, 0.5] bucket
    assert quantile(0.99, {1.0: 10.0, float("inf"): 20.0}) == 1.0  # in +Inf: the top finite bound
    assert quantile(0.5, {}) is None and quantile(0.5, {1.0: 0.0, float("inf"): 0.0}) is None


def test_live_numbers_count_only_what_happened_since_the_previous_read():
    reg = CollectorRegistry()
    m = ServingMetrics(reg)
    live = LiveStats(reg, window_s=60)
    for _ in range(30):
        m.requests_total.labels("chat.completions", "v1", "200").inc()
        m.request_duration_seconds.labels("chat.completions", "v1").observe(3.0)
    first = live.read()
    assert first["since_start"] and first["requests"] == 30 and first["request_rate"] is None
    assert 2.5 <= first["latency_p50_s"] <= 5.0
    for _ in range(99):
        m.requests_total.labels("chat.completions", "v2", "200").inc()
        m.request_duration_seconds.labels("chat.completions", "v2").observe(0.3)
        m.time_to_first_token_seconds.labels("chat.completions", "v2").observe(0.04)
    m.requests_total.labels("chat.completions", "v2", "500").inc()
    now = live.read()
    assert not now["since_start"] and now["requests"] == 100  # the first read's 30 are not counted again
    assert now["error_rate"] == pytest.approx(0.01) and now["request_rate"] > 0
    assert 0.25 <= now["latency_p50_s"] <= 0.5 and 0.025 <= now["ttft_p50_s"] <= 0.05
    assert now["versions"]["v2"]["requests"] == 100 and now["versions"]["v2"]["errors"] == 1
