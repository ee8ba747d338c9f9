"""The Prometheus deployment files are valid, and the drift alert fires on tuneloop's drift gauge (promtool)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

PROM = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
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
