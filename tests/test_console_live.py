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


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def serve(m: ServingMetrics, version: str, n: int, latency_s: float, errors: int = 0) -> None:
    for _ in range(n):
        m.requests_total.labels("chat.completions", version, "200").inc()
        m.request_duration_seconds.labels("chat.completions", version).observe(latency_s)
        m.time_to_first_token_seconds.labels("chat.completions", version).observe(latency_s / 10)
    for _ in range(errors):
        m.requests_total.labels("chat.completions", version, "500").inc()


def test_live_numbers_cover_about_the_last_window_however_often_they_are_read():
    reg, clock = CollectorRegistry(), Clock()
    m = ServingMetrics(reg)
    live = LiveStats(reg, window_s=60, clock=clock)
    serve(m, "v1", 30, 3.0)
    clock.t += 10
    first = live.read()  # younger than a window: everything since the server started
    assert first["since_start"] and first["requests"] == 30 and first["span_s"] == 10
    assert first["request_rate"] == pytest.approx(3.0) and 2.5 <= first["latency_p50_s"] <= 5.0
    clock.t += 5
    again = live.read()  # read again 5 s later with no traffic: still the same 30, not an empty 5-s window
    assert again["since_start"] and again["requests"] == 30
    clock.t += 60  # a window after the second read: that read is the base now
    serve(m, "v2", 99, 0.3, errors=1)
    now = live.read()
    assert not now["since_start"] and now["span_s"] == 60  # since the newest read at least 60 s old (the second)
    assert now["requests"] == 100  # the 30 before it are not counted again
    assert now["error_rate"] == pytest.approx(0.01) and now["request_rate"] == pytest.approx(100 / 60)
    assert 0.25 <= now["latency_p50_s"] <= 0.5 and 0.025 <= now["ttft_p50_s"] <= 0.05
    assert now["versions"]["v2"]["requests"] == 100 and now["versions"]["v2"]["errors"] == 1
    assert now["versions"]["v1"]["requests"] == 0
