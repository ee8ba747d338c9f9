"""The Grafana dashboard is valid and only charts series tuneloop really exports.

Every PromQL expression of deploy/grafana/dashboard.json must name metrics (and
label names) present in the exposition of a real registry carrying
``monitoring.metrics.ServingMetrics`` and the drift job's gauges, be valid
PromQL (``promtool check rules``), use only template variables the dashboard
defines, and point at the datasource the provisioning files create.
"""

from __future__ import annotations

import json
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import yaml
from conftest import require_tool
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tuneloop.monitoring.drift_job import DriftJob
from tuneloop.monitoring.metrics import ServingMetrics
from tuneloop.monitoring.records import RequestRecord
from tuneloop.settings import DriftSettings

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "deploy" / "grafana"
METRIC_RE = re.compile(r"\btuneloop_[a-z0-9_]+")
SELECTOR_RE = re.compile(r"\b(tuneloop_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER_RE = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING_RE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
VAR_RE = re.compile(r"\$(\w+)")


def exposition() -> dict[str, set[str]]:
    """Sample name -> label names, from a real registry holding every series tuneloop exports."""
    registry = CollectorRegistry()
    metrics = ServingMetrics(registry)
    job = DriftJob(None, DriftSettings(), registry)
    metrics.observe(
        RequestRecord(
            id="r1",
            received_at=datetime.now(UTC),
            route="chat.completions",
            status=200,
            model_version="chat-v1",
            prompt_tokens=12,
            completion_tokens=7,
            ttft_s=0.4,
            latency_s=1.2,
        )
    )
    metrics.in_flight("chat.completions").inc()
    metrics.set_model_info("chat-v1", "smollm2-135m-instruct", "adapter")
    metrics.observe_feedback(-1, "thumbs", "chat-v1")
    metrics.log_queue_depth.set(0)
    metrics.log_rows_written_total.inc()
    metrics.log_rows_dropped_total.inc(0)
    metrics.log_flush_errors_total.inc(0)
    metrics.log_flush_duration_seconds.observe(0.01)
    job.score.labels("overall", "chat-v1").set(0.5)
    job.drifted.labels("overall", "chat-v1").set(1)
    out: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(metrics.exposition().decode()):
        for s in fam.samples:
            out.setdefault(s.name, set()).update(k for k in s.labels if k != "le")
            if s.name.endswith("_bucket"):
                out[s.name].add("le")
    return out


def dashboard() -> dict:
    return json.loads((GRAFANA / "dashboard.json").read_text())


def targets(d: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every query in the dashboard."""
    return [(p["title"], t["expr"]) for p in d["panels"] for t in p.get("targets", [])]


def concrete(expr: str) -> str:
    """The expression as Grafana sends it, with template variables filled in."""
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$version", ".+")
        .replace("$production", "chat-v1")
        .replace("$canary", "chat-v2")
    )


def test_dashboard_json_is_a_grafana_dashboard_with_unique_panels():
    d = dashboard()
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 30
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] != "row":
            assert p["targets"], f"panel {p['title']!r} has no query"
    titles = " | ".join(p["title"].lower() for p in d["panels"])
    for topic in ("requests / s", "latency", "time to first token", "tokens / s", "drift", "canary vs production"):
        assert topic in titles, topic


def dashboard_errors(d: dict, exposed: dict[str, set[str]]) -> list[str]:
    """What the dashboard queries that our exposition lacks: metrics, matcher labels, grouping labels."""
    errors = []
    for title, expr in targets(d):
        names = METRIC_RE.findall(expr)
        if not names:
            errors.append(f"{title!r}: {expr!r} queries no tuneloop metric")
        missing = [n for n in names if n not in exposed]
        errors += [f"{title!r}: {n} is not exported" for n in missing]
        for name, matchers in SELECTOR_RE.findall(expr):
            for label in MATCHER_RE.findall(matchers):
                if name in exposed and label not in exposed[name]:
                    errors.append(f"{title!r}: {name} has no label {label!r}")
        for grouping in GROUPING_RE.findall(expr):
            labels = {g.strip() for g in grouping.split(",") if g.strip()}
            if not any(labels <= exposed.get(n, set()) for n in names):
                errors.append(f"{title!r}: no metric of {names} has labels {sorted(labels)}")
    return errors


def test_every_metric_and_label_the_dashboard_queries_is_in_our_exposition():
    exposed = exposition()
    assert dashboard_errors(dashboard(), exposed) == [], f"exported: {sorted(exposed)}"
    used = {name for _, expr in targets(dashboard()) for name in METRIC_RE.findall(expr)}
    # the panels the issue asks for: traffic, latency, TTFT, tokens, drift, canary vs production
    for name in (
        "tuneloop_requests_total",
        "tuneloop_request_duration_seconds_bucket",
        "tuneloop_time_to_first_token_seconds_bucket",
        "tuneloop_generation_tokens_total",
        "tuneloop_drift_score",
        "tuneloop_drifted",
    ):
        assert name in used, name


def test_the_check_catches_a_metric_we_do_not_export():
    """The check above reports a dashboard with a typo in a metric name, a label or a grouping, naming each."""
    exposed = exposition()
    d = dashboard()
    assert dashboard_errors(d, exposed) == []
    broken = json.loads(json.dumps(d))
    latency = next(p for p in broken["panels"] if p["title"].startswith("Request latency"))
    latency["targets"][0]["expr"] = latency["targets"][0]["expr"].replace(
        "tuneloop_request_duration_seconds_bucket", "tuneloop_request_latency_seconds_bucket"
    )
    rate = next(p for p in broken["panels"] if p["title"].startswith("Requests / s by"))
    rate["targets"][0]["expr"] = rate["targets"][0]["expr"].replace('model_version=~"', 'modelversion=~"')
    tokens = next(p for p in broken["panels"] if p["title"].startswith("Generated tokens"))
    tokens["targets"][0]["expr"] = tokens["targets"][0]["expr"].replace("by (model_version)", "by (route)")
    errors = dashboard_errors(broken, exposed)
    assert errors == [
        f"{rate['title']!r}: tuneloop_requests_total has no label 'modelversion'",
        f"{latency['title']!r}: tuneloop_request_latency_seconds_bucket is not exported",
        f"{latency['title']!r}: no metric of ['tuneloop_request_latency_seconds_bucket'] has labels "
        "['le', 'model_version']",
        f"{tokens['title']!r}: no metric of ['tuneloop_generation_tokens_total'] has labels ['route']",
    ], errors


def test_template_variables_and_datasource_are_defined_by_the_dashboard_and_provisioning():
    d = dashboard()
    defined = {v["name"] for v in d["templating"]["list"]}
    for title, expr in targets(d):
        for var in VAR_RE.findall(expr):
            assert var.startswith("__") or var in defined, f"{title!r} uses undefined ${var}"
    for v in d["templating"]["list"]:
        assert METRIC_RE.search(v["definition"]), v  # values come from our own series
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus"
    uids = {p["datasource"]["uid"] for p in d["panels"] if "datasource" in p}
    uids |= {t["datasource"]["uid"] for p in d["panels"] for t in p.get("targets", [])}
    assert uids == {source["uid"]}
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "tuneloop.yaml").read_text())
    (provider,) = prov["providers"]
    compose = yaml.safe_load((ROOT / "deploy" / "docker" / "compose.yaml").read_text())
    mounts = [v.split(":") for v in compose["services"]["grafana"]["volumes"]]
    dash_target = next(t for src, t, *_ in mounts if src.endswith("dashboard.json"))
    assert Path(dash_target).parent == Path(provider["options"]["path"])


def test_every_dashboard_query_is_valid_promql(tmp_path):
    promtool = require_tool("promtool")
    rules = [
        {"record": f"tuneloop:dashboard_query_{i}", "expr": concrete(expr)}
        for i, (_, expr) in enumerate(targets(dashboard()))
    ]
    (tmp_path / "q.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run(
        [promtool, "check", "rules", str(tmp_path / "q.yml")], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and f"{len(rules)} rules found" in r.stdout, r.stdout + r.stderr
