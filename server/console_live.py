"""Live serving numbers for the console, read from the server's own Prometheus registry (no scrape, no database).

Contract
--------
* :class:`LiveStats` lives on ``app.state.console_live``. :meth:`LiveStats.read` takes a snapshot of the
  registry's counters (``tuneloop_requests_total`` by status, the latency and time-to-first-token histograms'
  buckets) and compares it with the newest snapshot it kept that is at least ``window_s`` old (every read keeps
  one), so the span is about one window however often the page polls; before any is that old, with the zero
  state at the server's start (``since_start``; the span is then the server's age). It answers the request rate (per second), the error rate (share of requests
  with status >= 500) and p50 / p99 of latency and TTFT over that span, estimated from the histogram buckets as
  Prometheus' ``histogram_quantile`` does (linear inside a bucket; the top finite bound when the quantile falls in
  ``+Inf``). None where nothing was observed.
* Per model version too (``versions``): requests, errors and p50 TTFT, so the canary page can show both arms.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

REQUESTS = "tuneloop_requests"
LATENCY = "tuneloop_request_duration_seconds"
TTFT = "tuneloop_time_to_first_token_seconds"


@dataclass
class _Snap:
    t: float
    requests: dict[str, float] = field(default_factory=dict)  # version -> total
    errors: dict[str, float] = field(default_factory=dict)  # version -> status >= 500
    latency: dict[str, dict[float, float]] = field(default_factory=dict)  # version -> le -> cumulative count
    ttft: dict[str, dict[float, float]] = field(default_factory=dict)


def _snapshot(registry: CollectorRegistry, t: float) -> _Snap:
    s = _Snap(t)
    for fam in registry.collect():
        if fam.name == REQUESTS:
            for smp in fam.samples:
                if not smp.name.endswith("_total"):
                    continue
                v = smp.labels.get("model_version", "")
                s.requests[v] = s.requests.get(v, 0.0) + smp.value
                if int(smp.labels.get("status", "0") or 0) >= 500:
                    s.errors[v] = s.errors.get(v, 0.0) + smp.value
        elif fam.name in (LATENCY, TTFT):
            into = s.latency if fam.name == LATENCY else s.ttft
            for smp in fam.samples:
                if smp.name.endswith("_bucket"):
                    v = smp.labels.get("model_version", "")
                    le = float(smp.labels["le"])
                    b = into.setdefault(v, {})
                    b[le] = b.get(le, 0.0) + smp.value
    return s


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The ``q`` quantile of cumulative ``buckets`` (upper bound -> count), as Prometheus' histogram_quantile."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        c = buckets[b]
        if c >= rank:
            if math.isinf(b):
                finite = [x for x in bounds if not math.isinf(x)]
                return finite[-1] if finite else None
            if c == prev_count:
                return b
            return prev_bound + (b - prev_bound) * (rank - prev_count) / (c - prev_count)
        prev_bound, prev_count = b, c
    return None


def _delta(new: dict[str, dict[float, float]], old: dict[str, dict[float, float]]) -> dict[str, dict[float, float]]:
    return {v: {le: c - old.get(v, {}).get(le, 0.0) for le, c in b.items()} for v, b in new.items()}


def _merge(per_version: dict[str, dict[float, float]]) -> dict[float, float]:
    out: dict[float, float] = {}
    for b in per_version.values():
        for le, c in b.items():
            out[le] = out.get(le, 0.0) + c
    return out


class LiveStats:
    """See module docstring."""

    def __init__(
        self, registry: CollectorRegistry, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ):
        self.registry = registry
        self.window_s = window_s
        self.clock = clock
        self._start = _Snap(clock())  # the zero state: nothing counted before the app existed
        self._snaps: deque[_Snap] = deque(maxlen=4096)

    def read(self) -> dict[str, Any]:
        now = _snapshot(self.registry, self.clock())
        # the base is the newest snapshot at least window_s old (so the span is about a window, however often or
        # rarely the page is looked at), else the zero state at start (the span is then everything since start)
        base = self._start
        while self._snaps and now.t - self._snaps[0].t >= self.window_s:
            base = self._snaps.popleft()
        if base is not self._start:
            self._snaps.appendleft(base)  # kept: it is the base until a newer snapshot is window_s old
        since_start = base is self._start
        self._snaps.append(now)
        span = max(now.t - base.t, 1e-9)
        reqs = {v: n - base.requests.get(v, 0.0) for v, n in now.requests.items()}
        errs = {v: n - base.errors.get(v, 0.0) for v, n in now.errors.items()}
        lat = _delta(now.latency, base.latency)
        ttft = _delta(now.ttft, base.ttft)
        total = sum(reqs.values())
        all_lat, all_ttft = _merge(lat), _merge(ttft)
        versions = {
            v: {
                "requests": int(reqs.get(v, 0)),
                "errors": int(errs.get(v, 0)),
                "ttft_p50_s": quantile(0.5, ttft.get(v, {})),
                "latency_p50_s": quantile(0.5, lat.get(v, {})),
            }
            for v in sorted(now.requests)
            if v
        }
        return {
            "span_s": round(span, 1),
            "since_start": since_start,
            "requests": int(total),
            "request_rate": total / span,
            "error_rate": (sum(errs.values()) / total) if total else None,
            "latency_p50_s": quantile(0.5, all_lat),
            "latency_p99_s": quantile(0.99, all_lat),
            "ttft_p50_s": quantile(0.5, all_ttft),
            "ttft_p99_s": quantile(0.99, all_ttft),
            "versions": versions,
        }
