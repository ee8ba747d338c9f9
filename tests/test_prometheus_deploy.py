"""The Prometheus deployment files are valid, the drift alert fires on tuneloop's drift gauge (promtool), and a
real Prometheus running our config scrapes a live ``tuneloop serve`` and answers queries on its metrics."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from fixtures_server import free_port
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "deploy" / "prometheus"
pytestmark = pytest.mark.skipif(not shutil.which("promtool"), reason="promtool not installed (make system-deps)")


def _promtool(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *map(str, args)], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_scrape_config_and_alert_rules_pass_promtool():
    r = _promtool("check", "config", PROM / "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    r = _promtool("check", "rules", PROM / "alerts.yml")
    assert r.returncode == 0 and "5 rules found" in r.stdout, r.stdout + r.stderr


def test_drift_alert_fires_after_ten_minutes_of_drift_and_not_before(tmp_path):
    shutil.copy(PROM / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "t.yml").write_text("""
rule_files: [alerts.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'tuneloop_drifted{feature="overall",model_version="chat-v1"}'
        values: '0 0 1x20'
      - series: 'tuneloop_drift_score{feature="overall",model_version="chat-v1"}'
        values: '0 0 0.5x20'
    alert_rule_test:
      - eval_time: 5m
        alertname: TuneloopDrift
        exp_alerts: []
      - eval_time: 15m
        alertname: TuneloopDrift
        exp_alerts:
          - exp_labels: {severity: warning, model_version: chat-v1}
            exp_annotations:
              summary: "Model version chat-v1 drifted from its training data"
              description: "Overall drift score 0.5; run `tuneloop drift report --version chat-v1`."
""")
    r = _promtool("test", "rules", "t.yml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


# ---- a real Prometheus scraping a live tuneloop server ------------------------------------------------------------


@pytest.fixture
def prometheus(live_server, tmp_path):
    """``prometheus`` on a free loopback port with tmp storage, running deploy/prometheus/prometheus.yml (and its
    alert rules) with the target pointed at the live server and 1 s scrape/evaluation intervals; killed afterwards."""
    if not shutil.which("prometheus"):
        pytest.skip("prometheus not installed (make system-deps)")
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (job,) = cfg["scrape_configs"]
    job["static_configs"] = [{"targets": [live_server.url.removeprefix("http://")]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    shutil.copy(PROM / "alerts.yml", tmp_path / "alerts.yml")
    port = free_port()
    log = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(
            lambda: httpx.get(url + "/-/ready", timeout=2).status_code == 200,
            30,
            lambda: f"Prometheus not ready (exit {proc.poll()}):\n" + (tmp_path / "prometheus.log").read_text()[-3000:],
        )
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _wait(cond, timeout_s: float, why):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(why() if callable(why) else why)


def _query(url: str, promql: str) -> list[dict]:
    r = httpx.get(url + "/api/v1/query", params={"query": promql}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (promql, body)
    return body["data"]["result"]


def _served_count(live_server, version: str) -> float:
    """tuneloop_requests_total{model_version=version,status="200"} summed, read straight from the server's /metrics."""
    text = httpx.get(live_server.url + "/metrics", timeout=10).text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "tuneloop_requests_total"
        and s.labels.get("model_version") == version
        and s.labels.get("status") == "200"
    )


@pytest.mark.engine
@pytest.mark.slow
def test_prometheus_scrapes_the_live_server_and_answers_queries_on_our_metrics(live_server, prometheus):
    version = live_server.base_name
    r = httpx.post(
        live_server.url + "/v1/chat/completions",
        timeout=120,
        json={"model": version, "messages": [{"role": "user", "content": "hello prometheus"}], "max_tokens": 4},
    )
    assert r.status_code == 200, r.text
    served = _served_count(live_server, version)
    assert served >= 1

    # the target is up, and our request is in Prometheus's time series once a scrape after it happened
    promql = f'sum(tuneloop_requests_total{{job="tuneloop",model_version="{version}",status="200"}})'
    _wait(
        lambda: (res := _query(prometheus, promql)) and float(res[0]["value"][1]) >= served,
        30,
        lambda: (
            f"{promql} never reached {served}: {_query(prometheus, promql)}; targets: "
            + json.dumps(httpx.get(prometheus + "/api/v1/targets", timeout=10).json())[:2000]
        ),
    )
    (up,) = _query(prometheus, 'up{job="tuneloop"}')
    assert up["value"][1] == "1"
    latency = _query(prometheus, f'tuneloop_request_duration_seconds_count{{model_version="{version}"}}')
    assert latency and sum(float(s["value"][1]) for s in latency) >= 1

    # our alert rules load and evaluate against the live series without errors
    groups = httpx.get(prometheus + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = [rule for g in groups for rule in g["rules"]]
    assert len(rules) == 5
    _wait(
        lambda: all(
            rule["health"] == "ok"
            for rule in (
                rr
                for g in httpx.get(prometheus + "/api/v1/rules", timeout=10).json()["data"]["groups"]
                for rr in g["rules"]
            )
        ),
        10,
        lambda: f"alert rules unhealthy: {rules}",
    )

    # every Grafana dashboard query is accepted by this Prometheus, and the request-rate panel has data
    dash = json.loads((ROOT / "deploy" / "grafana" / "dashboard.json").read_text())
    for p in dash["panels"]:
        for t in p.get("targets", []):
            expr = (
                t["expr"]
                .replace("$__rate_interval", "1m")
                .replace("$version", ".+")
                .replace("$production", version)
                .replace("$canary", "none")
            )
            _query(prometheus, expr)  # asserts status success
    _wait(
        lambda: _query(
            prometheus, 'sum by (model_version, status) (rate(tuneloop_requests_total{model_version=~".+"}[1m]))'
        ),
        15,
        "no request rate after two scrapes",
    )
