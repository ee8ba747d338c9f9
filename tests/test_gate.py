"""The eval gate: paired bootstrap math, and a worse candidate is refused with the numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tuneloop.db import dumps, utcnow
from tuneloop.deploy.gate import GateError, judge_report, last_gate, paired_bootstrap, record_verdict
from tuneloop.ids import new_id
from tuneloop.registry import ModelVersion, register_version, set_stage
from tuneloop.settings import DeploySettings


def report(cand, base, metric="token_f1", general=None, golden=None):
    n = len(cand)
    return {
        "models": ["cand", "prod"],
        "summary": {
            "cand": {metric: float(np.mean(cand)), **({"general_perplexity": general[0]} if general else {})},
            "prod": {metric: float(np.mean(base)), **({"general_perplexity": general[1]} if general else {})},
        },
        "per_example": {
            "cand": {metric: list(cand), "loss": [1.0] * n},
            "prod": {metric: list(base), "loss": [1.0] * n},
        },
        "golden": golden or {},
    }


def test_paired_bootstrap_matches_a_direct_computation():
    rng = np.random.default_rng(7)
    a, b = rng.random(40), rng.random(40)
    got = paired_bootstrap(a, b, samples=500, confidence=0.9, seed=3)
    # the same resampling written as a plain loop over resamples
    r = np.random.default_rng(3)
    d = a - b
    means = []
    for _ in range(500):
        idx = r.integers(0, 40, size=40)
        means.append(sum(d[i] for i in idx) / 40)
    assert got.mean_delta == pytest.approx(d.mean())
    assert got.ci_low == pytest.approx(np.quantile(means, 0.05))
    assert got.ci_high == pytest.approx(np.quantile(means, 0.95))
    # and it agrees with scipy's percentile bootstrap of the paired differences (different draws, same estimator)
    from scipy.stats import bootstrap

    ci = bootstrap(
        (d,), np.mean, n_resamples=20000, confidence_level=0.9, method="percentile", rng=1
    ).confidence_interval
    assert got.ci_low == pytest.approx(ci.low, abs=0.02) and got.ci_high == pytest.approx(ci.high, abs=0.02)


def test_pairing_matters_a_constant_improvement_has_a_tight_interval():
    base = np.linspace(0, 1, 50)
    got = paired_bootstrap(base + 0.01, base, samples=200)
    assert got.ci_low == pytest.approx(0.01) and got.ci_high == pytest.approx(0.01)


def test_bad_per_example_inputs_are_clear_errors():
    with pytest.raises(GateError, match="equal-length"):
        paired_bootstrap([1, 2], [1])
    with pytest.raises(GateError, match="NaN"):
        paired_bootstrap([1, float("nan")], [1, 2])
    with pytest.raises(GateError, match="no per-example 'rouge_l'"):
        judge_report(report([1.0], [1.0]), "cand", "prod", DeploySettings(gate_metric="rouge_l"))
    with pytest.raises(GateError, match="not the same examples"):
        r = report([1.0, 0.5], [1.0, 0.5])
        r["per_example"]["prod"]["token_f1"] = [1.0]
        judge_report(r, "cand", "prod", DeploySettings())


def test_a_worse_candidate_is_blocked_with_the_numbers():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.4, 0.9, 60)
    worse = np.clip(base - 0.15 + rng.normal(0, 0.05, 60), 0, 1)
    res = judge_report(report(worse, base), "cand", "prod", DeploySettings())
    assert not res.passed
    q = res.checks[0]
    assert q.name == "quality" and not q.passed and q.value < 0
    msg = res.message()
    assert "gate FAILED" in msg and "token_f1" in msg and "95% CI" in msg and f"{q.value:+.4f}" in msg


def test_an_equal_or_better_candidate_passes():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.3, 0.8, 60)
    assert judge_report(report(base, base), "cand", "prod", DeploySettings()).passed
    assert judge_report(report(np.clip(base + 0.05, 0, 1), base), "cand", "prod", DeploySettings()).passed


def test_tolerance_lets_a_slightly_worse_candidate_through():
    base = np.linspace(0.2, 0.9, 80)
    cand = base - 0.01
    assert not judge_report(report(cand, base), "cand", "prod", DeploySettings()).passed
    assert judge_report(report(cand, base), "cand", "prod", DeploySettings(gate_min_delta=0.02)).passed


def test_forgetting_and_golden_prompts_are_checked():
    base = np.linspace(0.2, 0.9, 30)
    forgot = judge_report(report(base + 0.05, base, general=(13.0, 10.0)), "cand", "prod", DeploySettings())
    f = next(c for c in forgot.checks if c.name == "forgetting")
    assert not forgot.passed and f.value == pytest.approx(0.3) and "+30.0%" in f.detail
    golden = {"cand": {"passed": 3, "total": 5, "results": []}, "prod": {"passed": 5, "total": 5, "results": []}}
    g = judge_report(report(base, base, golden=golden), "cand", "prod", DeploySettings())
    assert not g.passed and "3/5" in g.message()
    # relative to production when production itself passes fewer than the configured share
    golden["prod"]["passed"] = 3
    assert judge_report(report(base, base, golden=golden), "cand", "prod", DeploySettings()).passed


def test_neg_loss_metric_prefers_lower_loss():
    r = report([0.5] * 20, [0.5] * 20)
    r["per_example"]["cand"]["loss"] = [2.0] * 20
    r["per_example"]["prod"]["loss"] = [1.0] * 20
    assert not judge_report(r, "cand", "prod", DeploySettings(gate_metric="neg_loss")).passed
    assert judge_report(r, "prod", "cand", DeploySettings(gate_metric="neg_loss")).passed


def test_verdicts_are_recorded_without_changing_the_stage(db):
    register_version(db, ModelVersion(name="c1", kind="adapter", base_model="/b", path="/p", content_hash="h"))
    res = judge_report(report([0.1] * 10, [0.9] * 10), "cand", "prod", DeploySettings())
    res.candidate = "c1"
    record_verdict(db, "c1", res)
    got = last_gate(db, "c1")
    assert got["passed"] is False and got["checks"][0]["name"] == "quality"
    assert db.query("SELECT stage FROM model_versions WHERE name = 'c1'")[0]["stage"] == "candidate"


def _store_report(db, rep, models):
    rid = new_id()
    db.execute(
        "INSERT INTO eval_reports (id, dataset_id, models, report, path, created_at) VALUES (?, NULL, ?, ?, NULL, ?)",
        [rid, dumps(models), dumps(rep), utcnow()],
    )
    return rid


def test_cli_gate_refuses_a_worse_candidate_with_exit_1_and_the_numbers(cli, db):
    for name in ("prod", "cand"):
        register_version(
            db, ModelVersion(name=name, kind="adapter", base_model="/b", path=f"/p/{name}", content_hash=name)
        )
    set_stage(db, "prod", "production")
    base = list(np.linspace(0.5, 0.9, 40))
    bad = _store_report(db, report([v - 0.2 for v in base], base), ["cand", "prod"])
    r = cli("deploy", "gate", "cand", "--report", bad, check=False)
    assert r.returncode == 1, r.stderr
    assert "gate FAILED: cand vs prod" in r.stdout and "95% CI" in r.stdout
    assert json.loads(cli("deploy", "gate", "cand", "--report", bad, "--json", check=False).stdout)["passed"] is False
    # and `deploy canary` refuses a version whose last gate failed
    c = cli("deploy", "canary", "cand", check=False)
    assert c.returncode == 2 and "did not pass the gate" in c.stderr
    good = _store_report(db, report(base, base), ["cand", "prod"])
    ok = cli("deploy", "gate", "cand", "--report", good)
    assert "gate PASSED" in ok.stdout
    missing = cli("deploy", "gate", "cand", "--report", "nope", check=False)
    assert missing.returncode == 2 and "error: unknown eval report" in missing.stderr


def _with_shift(rep, cand_nll, prod_nll):
    rep["summary"]["cand"]["production_nll"] = cand_nll
    rep["summary"]["prod"]["production_nll"] = prod_nll
    return rep


def test_shift_check_refuses_a_candidate_that_moved_too_far_from_production_answers():
    deploy = DeploySettings()
    same = [0.5] * 30
    near = judge_report(_with_shift(report(same, same), 1.9, 1.2), "cand", "prod", deploy)
    far = judge_report(_with_shift(report(same, same), 1.2 + deploy.gate_max_shift + 0.5, 1.2), "cand", "prod", deploy)
    shift = {r.passed: next(c for c in r.checks if c.name == "shift") for r in (near, far)}
    assert near.passed and shift[True].value == pytest.approx(0.7)
    assert not far.passed and shift[False].value == pytest.approx(deploy.gate_max_shift + 0.5)
    assert f"at most {deploy.gate_max_shift:.2f} allowed" in shift[False].detail
    assert "nats/token" in far.message() and "[FAIL] shift" in far.message()


def test_shift_check_is_skipped_without_logged_answers_and_unlimited_when_negative():
    same = [0.5] * 30
    skipped = next(
        c for c in judge_report(report(same, same), "cand", "prod", DeploySettings()).checks if c.name == "shift"
    )
    assert skipped.skipped and skipped.passed
    unlimited = DeploySettings(gate_max_shift=-1)
    r = judge_report(_with_shift(report(same, same), 50.0, 1.0), "cand", "prod", unlimited)
    assert r.passed and "no limit" in r.checks[-1].detail


def test_production_answers_are_the_latest_successful_chats_of_that_version(db):
    from tuneloop.deploy.gate import production_answers

    def log(i, version, status=200, response="fine"):
        with db.connect() as con:
            con.execute(
                "INSERT INTO requests (id, received_at, route, model_version, prompt, response, status) "
                "VALUES (?, ?, 'chat.completions', ?, ?, ?, ?)",
                [f"r{i}", utcnow(), version, dumps([{"role": "user", "content": f"q{i}"}]), response, status],
            )

    for i in range(5):
        log(i, "v1")
    log(5, "v1", status=500, response="")
    log(6, "v2")
    got = production_answers(db, "v1", 3)
    assert len(got) == 3
    assert all(g["messages"][-1] == {"role": "assistant", "content": "fine"} for g in got)
    assert {g["messages"][0]["content"] for g in production_answers(db, "v1", 10)} == {f"q{i}" for i in range(5)}
