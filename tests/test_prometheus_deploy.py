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
from conftest import require_tool
from fixtures_server import free_port, sse_events
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "deploy" / "prometheus"


def _promtool(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [require_tool("promtool"), *map(str, args)], capture_output=True, text=True, timeout=60, cwd=cwd
    )


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
    prometheus = require_tool("prometheus")
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
            prometheus,
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


def _metric_samples(live_server) -> list:
    text = httpx.get(live_server.url + "/metrics", timeout=10).text
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def _traffic(live_server, versions: list[str], tag: str) -> None:
    """Concurrent chats (plain and streamed) to each version, then thumbs-down and thumbs-up feedback on them."""
    from concurrent.futures import ThreadPoolExecutor

    def chat(args: tuple[str, bool]) -> str:
        version, stream = args
        body = {
            "model": version,
            "messages": [{"role": "user", "content": f"hello prometheus {tag}"}],
            "max_tokens": 4,
            "stream": stream,
        }
        r = httpx.post(live_server.url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return sse_events(r.text)[0]["id"] if stream else r.json()["id"]

    jobs = [(v, stream) for v in versions for stream in (False, False, True, True)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        ids = list(pool.map(chat, jobs))
        ratings = ["down", "up", "down", "up"] * len(versions)
        list(
            pool.map(
                lambda a: httpx.post(
                    live_server.url + "/v1/feedback", json={"request_id": a[0], "rating": a[1]}, timeout=60
                ).raise_for_status(),
                zip(ids, ratings),
            )
        )


def _has_numbers(result: list[dict]) -> bool:
    return any(s["value"][1] not in ("NaN", "+Inf", "-Inf") for s in result)


@pytest.mark.engine
@pytest.mark.slow
def test_prometheus_scrapes_the_live_server_and_every_dashboard_panel_has_data(live_server, prometheus):
    production, canary = live_server.base_name, "tiny-a"  # the base model and the registered adapter version
    versions = [production, canary]
    _wait(
        lambda: [s for s in _query(prometheus, 'up{job="tuneloop"}') if s["value"][1] == "1"],
        30,
        lambda: "target never up: " + json.dumps(httpx.get(prometheus + "/api/v1/targets", timeout=10).json())[:2000],
    )
    # two rounds of traffic: the first creates every series, the second (after a scrape saw the first) moves them,
    # so rate() has an increase to show for each
    _traffic(live_server, versions, "first")
    live_server.flush_log()
    counts = {v: _served_count(live_server, v) for v in versions}
    for v in versions:
        promql = f'sum(tuneloop_feedback_total{{job="tuneloop",model_version="{v}",rating="down"}})'
        _wait(lambda promql=promql: _query(prometheus, promql), 30, f"{promql}: never scraped")
    _traffic(live_server, versions, "second")
    live_server.flush_log()

    # our requests are in Prometheus's time series once a scrape after them happened
    for v in versions:
        served = _served_count(live_server, v)
        assert served >= counts[v] + 4
        promql = f'sum(tuneloop_requests_total{{job="tuneloop",model_version="{v}",status="200"}})'
        _wait(
            lambda promql=promql, served=served: (
                (res := _query(prometheus, promql)) and float(res[0]["value"][1]) >= served
            ),
            30,
            lambda promql=promql, served=served: f"{promql} never reached {served}: {_query(prometheus, promql)}",
        )

    # every query of every Grafana panel returns data (a number) for the versions we sent traffic to
    samples = _metric_samples(live_server)
    have_5xx = any(s.name == "tuneloop_requests_total" and s.labels["status"].startswith("5") for s in samples)
    have_drift = any(s.name in ("tuneloop_drift_score", "tuneloop_drifted") for s in samples)
    dash = json.loads((ROOT / "deploy" / "grafana" / "dashboard.json").read_text())

    def concrete(expr: str) -> str:
        return (
            expr.replace("$__rate_interval", "1m")
            .replace("$version", ".+")
            .replace("$production", production)
            .replace("$canary", canary)
        )

    # (panel title, the query as Grafana sends it, whether it compares canary and production)
    queries = [
        (p["title"], concrete(t["expr"]), "$canary" in t["expr"]) for p in dash["panels"] for t in p.get("targets", [])
    ]

    def exempt(expr: str) -> str | None:
        """Why a query may lack data on this server: the condition it charts cannot be created here."""
        if 'status=~"5.."' in expr and not have_5xx:
            return "error-rate panels chart 5xx answers; the shared live server answers no request with a 5xx"
        if "tuneloop_drift" in expr and not have_drift:
            return (
                "drift panels chart the drift job's gauges; the session's versions have no training data to profile "
                "and the server's drift pass runs once a minute, so it exports none"
            )
        return None

    def missing() -> list[str]:
        out = []
        for title, expr, both in queries:
            res = _query(prometheus, expr)  # asserts status success
            if exempt(expr):
                continue
            if not _has_numbers(res):
                out.append(f"{title!r}: {expr} -> {res}")
            elif both and not set(versions) <= {s["metric"].get("model_version") for s in res}:
                out.append(f"{title!r}: {expr} has no series for one of {versions}: {res}")
        return out

    _wait(lambda: not missing(), 30, lambda: "panels without data:\n" + "\n".join(missing()))

    # only error-rate and drift panels are exempted, and what an error rate divides by has data
    exempted = {title for title, expr, _ in queries if exempt(expr)}
    assert exempted <= {
        "Error rate (5xx share) by model version",
        "Error rate: canary vs production",
        "Overall drift score by model version",
        "Drifted statistics (1 = over threshold)",
        "Drift statistic by feature",
        "Drift score: canary vs production",
    }, exempted
    for title, expr, _ in queries:
        if 'status=~"5.."' in expr:
            denominator = expr.split(" / ", 1)[1]
            assert _has_numbers(_query(prometheus, denominator)), (title, denominator)

    # our alert rules load and evaluate against the live series without errors
    def rules() -> list[dict]:
        groups = httpx.get(prometheus + "/api/v1/rules", timeout=10).json()["data"]["groups"]
        return [rule for g in groups for rule in g["rules"]]

    assert len(rules()) == 5
    _wait(
        lambda: all(rule["health"] == "ok" and rule.get("lastEvaluation", "0001").startswith("2") for rule in rules()),
        10,
        lambda: f"alert rules unhealthy: {rules()}",
    )
