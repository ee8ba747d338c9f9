"""Prometheus metrics of the serving path, on an explicit registry.

Contract
--------
* :class:`ServingMetrics` creates every metric on the ``CollectorRegistry`` it
  is given (the app owns it as ``app.state.registry``); nothing is registered
  on prometheus_client's global default registry and nothing here is
  module-global, so several apps (or tests) can live in one process.
* Names carry the ``tuneloop_`` prefix, base units (seconds, tokens) and
  ``_total`` for counters. Labels never carry request ids or user ids, only
  low-cardinality values (route, model version, HTTP status, rating).
* :meth:`ServingMetrics.observe` updates the per-request series from one
  finished :class:`monitoring.records.RequestRecord`. The request log
  writer calls it for every submitted record (see
  :meth:`monitoring.requestlog.RequestLogWriter.submit`), so the counters and
  the ``requests`` table are two views of the same records: the server must
  not call ``observe`` itself as well.
* Latency histograms use LLM-sized buckets (:data:`LATENCY_BUCKETS_S`,
  10 ms .. 120 s): a CPU engine needs seconds for the first token, a GPU one
  tens of milliseconds, and both must land in distinct buckets.

Series (label names in braces):

================================================  =========  ====================================
name                                              type       meaning
================================================  =========  ====================================
tuneloop_requests_total{route,model_version,status}  counter  finished requests by HTTP status
tuneloop_request_duration_seconds{route,model_version}  histogram  request latency (receive -> last byte)
tuneloop_time_to_first_token_seconds{route,model_version}  histogram  receive -> first generated token
tuneloop_prompt_tokens_total{model_version}       counter    prompt tokens processed
tuneloop_generation_tokens_total{model_version}   counter    completion tokens generated
tuneloop_requests_in_flight{route}                gauge      requests being served now
tuneloop_log_queue_depth                          gauge      request-log rows waiting in memory
tuneloop_log_rows_written_total                   counter    request-log rows committed to the database
tuneloop_log_rows_dropped_total                   counter    rows dropped (queue full / unwritable)
tuneloop_log_flush_errors_total                   counter    failed flushes (rows kept, retried)
tuneloop_log_flush_duration_seconds               histogram  one flush: open + insert + commit
tuneloop_model_info{model_version,base_model,kind}  gauge    1 for each version the server serves
tuneloop_feedback_total{rating,model_version}     counter    feedback received (up|down|1..5|none)
tuneloop_classify_predictions_total{model_version,label}  counter  classified inputs by predicted label
tuneloop_classify_confidence{model_version}       histogram  max probability of each classified input
================================================  =========  ====================================

A classify request with several inputs is logged as one record per input: the
request series (count, latency) count it once (``observe(rec, count_request=False)``
for the others), the prompt tokens and the prediction series count every input.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tuneloop.ratings import metric_label

if TYPE_CHECKING:  # pragma: no cover
    from tuneloop.monitoring.records import RequestRecord

PREFIX = "tuneloop_"
LATENCY_BUCKETS_S: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 120)
CONFIDENCE_BUCKETS: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
FLUSH_BUCKETS_S: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
UNKNOWN = "unknown"


class ServingMetrics:
    """All serving metrics on one registry; see module docstring."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        r = registry
        self.requests_total = Counter(
            PREFIX + "requests",
            "Finished requests by route, resolved model version and HTTP status (499 = client went away).",
            ["route", "model_version", "status"],
            registry=r,
        )
        self.synthetic_requests_total = Counter(
            PREFIX + "synthetic_requests",
            "Requests marked synthetic (X-Tuneloop-Origin: synthetic, e.g. tuneloop data synthesize) by route, "
            "model version and status: kept out of every production metric and of the request log.",
            ["route", "model_version", "status"],
            registry=r,
        )
        self.request_duration_seconds = Histogram(
            PREFIX + "request_duration_seconds",
            "Request latency from receipt to the last byte, in seconds.",
            ["route", "model_version"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.time_to_first_token_seconds = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from receipt to the first generated token, in seconds.",
            ["route", "model_version"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.prompt_tokens_total = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens processed.", ["model_version"], registry=r
        )
        self.generation_tokens_total = Counter(
            PREFIX + "generation_tokens", "Completion tokens generated.", ["model_version"], registry=r
        )
        self.requests_in_flight = Gauge(
            PREFIX + "requests_in_flight", "Requests being served right now.", ["route"], registry=r
        )
        self.log_queue_depth = Gauge(
            PREFIX + "log_queue_depth", "Request-log rows waiting in memory to be written.", registry=r
        )
        self.log_rows_written_total = Counter(
            PREFIX + "log_rows_written", "Request-log rows committed to the database.", registry=r
        )
        self.log_rows_dropped_total = Counter(
            PREFIX + "log_rows_dropped",
            "Request-log rows dropped: queue full, writer closed, or rows the database rejected.",
            registry=r,
        )
        self.log_flush_errors_total = Counter(
            PREFIX + "log_flush_errors",
            "Request-log flushes that failed (database busy or error); rows are kept and retried.",
            registry=r,
        )
        self.log_flush_duration_seconds = Histogram(
            PREFIX + "log_flush_duration_seconds",
            "Duration of one request-log flush (open, insert, commit), in seconds.",
            buckets=FLUSH_BUCKETS_S,
            registry=r,
        )
        self.model_info = Gauge(
            PREFIX + "model_info",
            "1 for every model version the server serves, with its base model and kind.",
            ["model_version", "base_model", "kind"],
            registry=r,
        )
        self.feedback_total = Counter(
            PREFIX + "feedback",
            "Feedback received by rating (up|down|1..5) and the model version that answered.",
            ["rating", "model_version"],
            registry=r,
        )
        self.classify_predictions_total = Counter(
            PREFIX + "classify_predictions",
            "Classified inputs by the model version that answered and the predicted label.",
            ["model_version", "label"],
            registry=r,
        )
        self.classify_confidence = Histogram(
            PREFIX + "classify_confidence",
            "Confidence (the highest class probability) of each classified input.",
            ["model_version"],
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self._model_info_labels: dict[str, tuple[str, str, str]] = {}

    # -- per request ---------------------------------------------------------
    def observe(self, rec: RequestRecord, count_request: bool = True) -> None:
        """Count one finished request (status, latency, TTFT, tokens) from its log record; a classify record
        also counts its prediction. ``count_request`` false: a further input of a request already counted."""
        version = rec.model_version or UNKNOWN
        route = rec.route or UNKNOWN
        if count_request:
            status = str(int(rec.status)) if isinstance(rec.status, (int, float)) else UNKNOWN
            self.requests_total.labels(route, version, status).inc()
            if rec.latency_s is not None:
                self.request_duration_seconds.labels(route, version).observe(max(0.0, float(rec.latency_s)))
            if rec.ttft_s is not None:
                self.time_to_first_token_seconds.labels(route, version).observe(max(0.0, float(rec.ttft_s)))
        if isinstance(rec.scores, dict) and rec.scores and rec.status < 400:
            self.classify_predictions_total.labels(version, str(rec.response)).inc()
            self.classify_confidence.labels(version).observe(float(max(rec.scores.values())))
        if rec.prompt_tokens:
            self.prompt_tokens_total.labels(version).inc(int(rec.prompt_tokens))
        if rec.completion_tokens:
            self.generation_tokens_total.labels(version).inc(int(rec.completion_tokens))

    def observe_synthetic(self, rec: RequestRecord) -> None:
        """Count one synthetic request (see :mod:`tuneloop.monitoring.records`); nothing else is touched."""
        status = str(int(rec.status)) if isinstance(rec.status, (int, float)) else UNKNOWN
        self.synthetic_requests_total.labels(rec.route or UNKNOWN, rec.model_version or UNKNOWN, status).inc()

    def in_flight(self, route: str) -> Gauge:
        """The in-flight gauge child of ``route``; use ``with metrics.in_flight(route).track_inprogress():``."""
        return self.requests_in_flight.labels(route)

    # -- models --------------------------------------------------------------
    def set_model_info(self, model_version: str, base_model: str, kind: str) -> None:
        """Mark ``model_version`` as served (replacing an earlier label set of the same version)."""
        self.clear_model_info(model_version)
        labels = (model_version, base_model or UNKNOWN, kind or UNKNOWN)
        self.model_info.labels(*labels).set(1)
        self._model_info_labels[model_version] = labels

    def clear_model_info(self, model_version: str) -> None:
        """Remove ``model_version`` from ``tuneloop_model_info`` (unloaded / retired)."""
        labels = self._model_info_labels.pop(model_version, None)
        if labels is not None:
            try:
                self.model_info.remove(*labels)
            except KeyError:
                pass

    def served_versions(self) -> list[str]:
        return sorted(self._model_info_labels)

    # -- feedback ------------------------------------------------------------
    def observe_feedback(self, rating: float | None, rating_kind: str | None, model_version: str | None) -> None:
        """Count one feedback post; ``rating`` as stored (-1/+1 thumbs, 1..5 stars, None = text only)."""
        self.feedback_total.labels(metric_label(rating, rating_kind), model_version or UNKNOWN).inc()

    # -- exposition ------------------------------------------------------------
    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (what ``GET /metrics`` returns)."""
        return generate_latest(self.registry)
