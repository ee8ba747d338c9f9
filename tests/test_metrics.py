"""Prometheus metrics as a scraper and a dashboard see them, and their agreement with the request log."""

from __future__ import annotations

import random

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tuneloop.db import utcnow
from tuneloop.ids import new_id
from tuneloop.monitoring.metrics import LATENCY_BUCKETS_S, ServingMetrics
from tuneloop.monitoring.records import RequestRecord
from tuneloop.monitoring.requestlog import RequestLogWriter
from tuneloop.settings import LogSettings

EXPECTED = {
    "tuneloop_requests": "counter",
    "tuneloop_request_duration_seconds": "histogram",
    "tuneloop_time_to_first_token_seconds": "histogram",
    "tuneloop_prompt_tokens": "counter",
    "tuneloop_generation_tokens": "counter",
    "tuneloop_requests_in_flight": "gauge",
    "tuneloop_log_queue_depth": "gauge",
    "tuneloop_log_rows_written": "counter",
    "tuneloop_log_rows_dropped": "counter",
    "tuneloop_log_flush_errors": "counter",
    "tuneloop_log_flush_duration_seconds": "histogram",
    "tuneloop_model_info": "gauge",
    "tuneloop_feedback": "counter",
}


def families(m: ServingMetrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(m.exposition().decode())}


def random_records(n: int, seed: int = 0) -> list[RequestRecord]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        status = rnd.choice([200, 200, 200, 200, 400, 499, 503])
        ok = status == 200
        out.append(
            RequestRecord(
                id=new_id("chatcmpl-"),
                received_at=utcnow(),
                route=rnd.choice(["chat.completions", "completions"]),
                status=status,
                model_version=rnd.choice(["v1", "v2", "base"]),
                arm=rnd.choice(["production", "canary"]),
                prompt_tokens=rnd.randint(1, 300) if status != 400 else None,
                completion_tokens=rnd.randint(1, 200) if ok else None,
                ttft_s=rnd.uniform(0.005, 30) if ok or status == 499 else None,
                latency_s=rnd.uniform(0.01, 150),
                stream=rnd.random() < 0.5,
            )
        )
    return out


def test_exposition_parses_and_names_follow_the_conventions():
    m = ServingMetrics(CollectorRegistry())
    m.observe(random_records(1)[0])
    m.set_model_info("v1", "/models/smollm2", "adapter")
    m.observe_feedback(1, "thumbs", "v1")
    m.in_flight("chat.completions").inc()
    fams = families(m)
    for name, kind in EXPECTED.items():
        assert name in fams, name
        assert fams[name].type == kind, name
    assert all(n.startswith("tuneloop_") for n in fams)
    for f in fams.values():
        for s in f.samples:
            assert not ({"id", "request_id", "user_id", "key_id"} & set(s.labels)), s


def test_latency_histograms_use_llm_sized_buckets():
    m = ServingMetrics(CollectorRegistry())
    m.observe(
        RequestRecord(
            id="x",
            received_at=utcnow(),
            route="completions",
            status=200,
            model_version="v1",
            ttft_s=1.7,
            latency_s=95.0,
        )
    )
    for name in ("tuneloop_request_duration_seconds", "tuneloop_time_to_first_token_seconds"):
        les = [float(s.labels["le"]) for s in families(m)[name].samples if s.name.endswith("_bucket")]
        assert les[:-1] == list(LATENCY_BUCKETS_S) and les[-1] == float("inf")
        assert les[0] == 0.01 and les[-2] == 120
    reg = m.registry
    lbl = {"route": "completions", "model_version": "v1"}
    # 95 s lands below 120 s, 1.7 s TTFT in the 2.5 s bucket but not the 1 s one
    assert reg.get_sample_value("tuneloop_request_duration_seconds_bucket", {**lbl, "le": "80.0"}) == 0
    assert reg.get_sample_value("tuneloop_request_duration_seconds_bucket", {**lbl, "le": "120.0"}) == 1
    assert reg.get_sample_value("tuneloop_time_to_first_token_seconds_bucket", {**lbl, "le": "1.0"}) == 0
    assert reg.get_sample_value("tuneloop_time_to_first_token_seconds_bucket", {**lbl, "le": "2.5"}) == 1


def test_counters_agree_with_the_request_log(db):
    m = ServingMetrics(CollectorRegistry())
    w = RequestLogWriter(db, LogSettings(flush_interval_s=60), m)
    recs = random_records(300, seed=7)
    for r in recs:
        assert w.submit(r)
    assert w.close() == 0
    reg = m.registry

    rows = db.query("SELECT route, model_version, status, count(*) AS n FROM requests GROUP BY ALL")
    assert sum(r["n"] for r in rows) == 300
    for r in rows:
        got = reg.get_sample_value(
            "tuneloop_requests_total",
            {"route": r["route"], "model_version": r["model_version"], "status": str(r["status"])},
        )
        assert got == r["n"], r

    for r in db.query(
        "SELECT model_version, sum(prompt_tokens) AS p, sum(completion_tokens) AS c FROM requests GROUP BY ALL"
    ):
        assert reg.get_sample_value("tuneloop_prompt_tokens_total", {"model_version": r["model_version"]}) == r["p"]
        assert reg.get_sample_value("tuneloop_generation_tokens_total", {"model_version": r["model_version"]}) == r["c"]

    for r in db.query(
        "SELECT route, model_version, count(latency_s) AS nl, sum(latency_s) AS sl, count(ttft_s) AS nt "
        "FROM requests GROUP BY ALL"
    ):
        lbl = {"route": r["route"], "model_version": r["model_version"]}
        assert reg.get_sample_value("tuneloop_request_duration_seconds_count", lbl) == r["nl"]
        assert abs(reg.get_sample_value("tuneloop_request_duration_seconds_sum", lbl) - r["sl"]) < 1e-6
        assert (reg.get_sample_value("tuneloop_time_to_first_token_seconds_count", lbl) or 0) == r["nt"]

    assert reg.get_sample_value("tuneloop_log_rows_written_total") == 300
    assert reg.get_sample_value("tuneloop_log_rows_dropped_total") == 0
    assert reg.get_sample_value("tuneloop_log_flush_duration_seconds_count") >= 1


def test_model_info_follows_the_served_versions():
    m = ServingMetrics(CollectorRegistry())
    m.set_model_info("v1", "/m/base", "adapter")
    m.set_model_info("v2", "/m/base", "adapter")
    m.set_model_info("v1", "/m/base", "merged")  # re-registered with another kind: one series, not two
    m.clear_model_info("v2")
    m.clear_model_info("never-served")
    series = [s.labels for s in families(m)["tuneloop_model_info"].samples]
    assert series == [{"model_version": "v1", "base_model": "/m/base", "kind": "merged"}]
    assert m.served_versions() == ["v1"]


def test_feedback_counts_by_rating_and_version():
    m = ServingMetrics(CollectorRegistry())
    m.observe_feedback(1, "thumbs", "v1")
    m.observe_feedback(-1, "thumbs", "v1")
    m.observe_feedback(-1, "thumbs", "v1")
    m.observe_feedback(4, "stars", "v2")
    m.observe_feedback(None, None, None)
    get = m.registry.get_sample_value
    assert get("tuneloop_feedback_total", {"rating": "up", "model_version": "v1"}) == 1
    assert get("tuneloop_feedback_total", {"rating": "down", "model_version": "v1"}) == 2
    assert get("tuneloop_feedback_total", {"rating": "4", "model_version": "v2"}) == 1
    assert get("tuneloop_feedback_total", {"rating": "none", "model_version": "unknown"}) == 1


def test_two_apps_in_one_process_keep_separate_registries():
    a, b = ServingMetrics(CollectorRegistry()), ServingMetrics(CollectorRegistry())  # no duplicate-name error
    a.observe(RequestRecord(id="1", received_at=utcnow(), route="completions", status=200, model_version="v1"))
    lbl = {"route": "completions", "model_version": "v1", "status": "200"}
    assert a.registry.get_sample_value("tuneloop_requests_total", lbl) == 1
    assert b.registry.get_sample_value("tuneloop_requests_total", lbl) is None
    assert REGISTRY.get_sample_value("tuneloop_requests_total", lbl) is None  # nothing on the global registry


def test_in_flight_gauge_tracks_running_requests():
    m = ServingMetrics(CollectorRegistry())
    g = m.in_flight("chat.completions")
    with g.track_inprogress():
        assert m.registry.get_sample_value("tuneloop_requests_in_flight", {"route": "chat.completions"}) == 1
    assert m.registry.get_sample_value("tuneloop_requests_in_flight", {"route": "chat.completions"}) == 0
