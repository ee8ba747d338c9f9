"""Canary judge simulation: the sequential test against the old fixed-delta rule, 1,000 canaries per scenario.

Each simulated canary gets ``--share`` of the traffic; every request is rated with
probability ``--rated`` (thumbs-down with the arm's rate), fails with probability
``--error-rate`` and takes a log-normal latency, the same on both arms. Scenarios
differ in the canary's thumbs-down rate against production's ``--p0``:
clearly worse, equal, slightly better, clearly better.

* sequential: the product's own :func:`tuneloop.monitoring.canary.decide` with the
  default settings, called after every ``--look-every`` canary requests (as often as
  the live server would judge), until it decides.
* fixed-delta (the baseline, the judge tuneloop had before): once the canary has
  ``canary_min_requests`` requests, roll back if its thumbs-down share exceeds
  production's by more than 0.10, its error rate by more than 0.02 or its p50
  latency is over 1.5x; else promote.

It prints, per rule and scenario, the share promoted and rolled back and the median
canary requests to a decision, and checks the targets: a worse canary promoted in at
most 5% of runs, an equal-or-better one rolled back in at most 5%.

    python bench/canary_sim.py [--runs 1000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from typing import Any

import numpy as np

from tuneloop.monitoring.canary import ArmStats, decide
from tuneloop.settings import DeploySettings

SCENARIOS = {"clearly worse": +0.15, "equal": 0.0, "slightly better": -0.03, "clearly better": -0.15}
OLD = {"negative_delta": 0.10, "error_delta": 0.02, "latency_ratio": 1.5}


class Arm:
    """Running sufficient statistics of one arm over many simulated canaries at once."""

    def __init__(self, runs: int) -> None:
        self.n = np.zeros(runs, dtype=np.int64)
        self.errors = np.zeros(runs, dtype=np.int64)
        self.rated = np.zeros(runs, dtype=np.int64)
        self.negative = np.zeros(runs, dtype=np.int64)
        self.lat_n = np.zeros(runs, dtype=np.int64)
        self.lat_mean = np.zeros(runs)
        self.lat_m2 = np.zeros(runs)
        self.lat_p50 = np.zeros(runs)

    def add(self, rng: np.random.Generator, k: int, p_neg: float, rated: float, err: float, sd: float) -> None:
        runs = self.n.shape[0]
        errs = rng.binomial(k, err, runs)
        r = rng.binomial(k, rated, runs)
        self.n += k
        self.errors += errs
        self.rated += r
        self.negative += rng.binomial(r, p_neg)
        ok = k - errs
        # batch mean and M2 of log latency, merged with Chan's parallel update
        x = rng.normal(0.0, sd, (runs, k))
        mask = np.arange(k)[None, :] < ok[:, None]
        bn = ok.astype(float)
        bmean = np.where(bn > 0, (x * mask).sum(1) / np.maximum(bn, 1), 0.0)
        bm2 = (((x - bmean[:, None]) ** 2) * mask).sum(1)
        tot = self.lat_n + ok
        delta = bmean - self.lat_mean
        self.lat_mean = np.where(tot > 0, self.lat_mean + delta * bn / np.maximum(tot, 1), 0.0)
        self.lat_m2 = self.lat_m2 + bm2 + delta**2 * self.lat_n * bn / np.maximum(tot, 1)
        self.lat_n = tot
        self.lat_p50 = np.exp(self.lat_mean)  # median of a log-normal

    def stats(self, i: int, arm: str) -> ArmStats:
        n, ln = int(self.n[i]), int(self.lat_n[i])
        return ArmStats(
            arm,
            arm,
            requests=n,
            errors=int(self.errors[i]),
            error_rate=self.errors[i] / n if n else 0.0,
            ttft_p50_s=float(self.lat_p50[i]) if ln else None,
            rated=int(self.rated[i]),
            negative=int(self.negative[i]),
            negative_share=self.negative[i] / self.rated[i] if self.rated[i] else 0.0,
            ttft_n=ln,
            log_ttft_mean=float(self.lat_mean[i]),
            log_ttft_var=float(self.lat_m2[i] / ln) if ln else 0.0,
        )


def simulate(delta: float, args: argparse.Namespace, deploy: DeploySettings, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    runs, share, look = args.runs, args.share, args.look_every
    prod_per_look = max(1, round(look * (1 - share) / share))
    canary, prod = Arm(runs), Arm(runs)
    seq: list[tuple[str, int] | None] = [None] * runs
    old: list[tuple[str, int] | None] = [None] * runs
    while any(d is None for d in seq) or any(d is None for d in old):
        canary.add(rng, look, args.p0 + delta, args.rated, args.error_rate, args.latency_sd)
        prod.add(rng, prod_per_look, args.p0, args.rated, args.error_rate, args.latency_sd)
        for i in range(runs):
            if seq[i] is None or old[i] is None:
                arms = {"canary": canary.stats(i, "canary"), "production": prod.stats(i, "production")}
                if seq[i] is None:
                    d = decide("sim", arms, 0.0, deploy)
                    if d.action != "wait":
                        seq[i] = (d.action, int(canary.n[i]))
                if old[i] is None and canary.n[i] >= deploy.canary_min_requests:
                    old[i] = (_old_rule(arms), int(canary.n[i]))
    return {"sequential": _summary(seq), "fixed-delta": _summary(old)}


def _old_rule(arms: dict[str, ArmStats]) -> str:
    c, p = arms["canary"], arms["production"]
    bad = (
        c.error_rate - p.error_rate > OLD["error_delta"]
        or (c.ttft_p50_s and p.ttft_p50_s and c.ttft_p50_s / p.ttft_p50_s > OLD["latency_ratio"])
        or (c.rated and c.negative_share - p.negative_share > OLD["negative_delta"])
    )
    return "rollback" if bad else "promote"


def _summary(decisions: list[tuple[str, int] | None]) -> dict[str, Any]:
    done = [d for d in decisions if d is not None]
    n = len(done)
    return {
        "promoted": sum(a == "promote" for a, _ in done) / n,
        "rolled_back": sum(a == "rollback" for a, _ in done) / n,
        "median_canary_requests": float(np.median([k for _, k in done])),
        "p90_canary_requests": float(np.percentile([k for _, k in done], 90)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1000, help="simulated canaries per scenario")
    ap.add_argument("--share", type=float, default=0.1, help="canary share of traffic (deploy.canary_share)")
    ap.add_argument("--p0", type=float, default=0.3, help="production thumbs-down rate of rated requests")
    ap.add_argument("--rated", type=float, default=0.5, help="share of requests users rate")
    ap.add_argument("--error-rate", type=float, default=0.01, help="server error rate, both arms")
    ap.add_argument("--latency-sd", type=float, default=0.3, help="sd of log latency, both arms")
    ap.add_argument("--look-every", type=int, default=10, help="canary requests between two judgements")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    deploy = replace(DeploySettings(), canary_max_minutes=1e9)
    t0 = time.perf_counter()
    results = {name: simulate(delta, args, deploy, args.seed + k) for k, (name, delta) in enumerate(SCENARIOS.items())}
    wall = time.perf_counter() - t0
    print(
        f"{args.runs} canaries per scenario; production thumbs-down {args.p0:.0%}, canary share {args.share:.0%}, "
        f"{args.rated:.0%} rated; judged every {args.look_every} canary requests; defaults: "
        f"min {deploy.canary_min_requests}, budget {deploy.canary_max_requests} canary requests, "
        f"alpha {deploy.canary_alpha}, margin {deploy.canary_max_negative_feedback_delta:+.0%} ({wall:.0f} s)"
    )
    print(f"{'scenario':<16} {'rule':<12} {'promoted':>9} {'rolled back':>12} {'median req':>11} {'p90 req':>8}")
    for name, by_rule in results.items():
        for rule, r in by_rule.items():
            print(
                f"{name:<16} {rule:<12} {r['promoted']:>9.1%} {r['rolled_back']:>12.1%} "
                f"{r['median_canary_requests']:>11.0f} {r['p90_canary_requests']:>8.0f}"
            )
    seq = {k: v["sequential"] for k, v in results.items()}
    false_promote = seq["clearly worse"]["promoted"]
    false_rollback = max(seq[k]["rolled_back"] for k in ("equal", "slightly better", "clearly better"))
    ok = false_promote <= 0.05 and false_rollback <= 0.05
    print(
        f"sequential: false promotion of a worse canary {false_promote:.1%} (target <= 5%), "
        f"worst false rollback of an equal-or-better one {false_rollback:.1%} (target <= 5%): "
        + ("targets met" if ok else "TARGETS MISSED")
    )
    old = {k: v["fixed-delta"] for k, v in results.items()}
    print(
        f"fixed-delta: false promotion {old['clearly worse']['promoted']:.1%}, worst false rollback "
        f"{max(old[k]['rolled_back'] for k in ('equal', 'slightly better', 'clearly better')):.1%}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "targets_met": ok}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
