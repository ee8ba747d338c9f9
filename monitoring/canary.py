"""Canary deployments: start, judge from the request log, promote or roll back.

Contract
--------
Logic over the database (no HTTP, no engine), so the CLI, the loop or the
server can run it. The server routes traffic from the state written here:
a ``canaries`` row with status ``running`` (candidate, production, share) and
the candidate's stage ``canary``; it sends ``share`` of the requests for
``production`` to the candidate, sticky per user/key, and logs the arm in
``requests.arm``. The control SQL (canary rows, stages, deploy events) is
:mod:`tuneloop.store_deploy`'s, which makes every transition one transaction
that is race-free across replicas on PostgreSQL as on the DuckDB file; this
module adds the statistics and the decision.

* :func:`start` — :func:`tuneloop.store_deploy.start_canary`: refuse if a canary
  is running or there is no production version, set the candidate's stage to
  ``canary`` and insert the row, atomically (two concurrent starts: one wins).
* :func:`arm_stats` — per arm (``production``, ``canary``) from the canary's
  start to its decision (a decided canary's statistics stay what the judge saw,
  not the traffic after it): requests, server errors (status >= 500; client errors and aborts are
  not the model's fault), p50 time to first token (TTFT) of successful requests (of a
  classifier, which produces no tokens: its whole latency), judged requests and the share
  judged wrong — the newest feedback per request: a ``label`` (a classifier's correct class)
  is wrong when it differs from the predicted label, else a thumbs-down or 1-2 stars —, and
  the latest overall drift verdict per version. The
  statistics are DuckDB SQL on :meth:`Database.analytics` (``requests`` and
  ``feedback``): the file itself for DuckDB; for PostgreSQL only the rows since the
  canary started are copied (``where`` on ``received_at`` / ``created_at``).
* :func:`decide` — the pure decision from two arms' statistics (no database), by a
  sequential test that stays valid however often it is called
  (:mod:`tuneloop.monitoring.sequential`). For each metric — thumbs-down share of
  rated requests (the primary one, once both arms have 50 ratings), error rate, and
  log TTFT of successful requests (a geometric-mean ratio; time to first token, not
  total latency, because total latency grows with the answer's length, which is the
  model's behaviour, not its serving speed) — an always-valid
  confidence sequence for
  canary minus production (mixture SPRT, tuned to the metric's margin), at
  ``canary_alpha`` split over the metrics measured:
  - ``rollback`` at once when the canary is worse with confidence: its thumbs-down
    share is higher (interval above 0) or a guardrail is worse beyond its margin
    (interval above ``canary_max_error_rate_delta`` or
    ``log(canary_max_latency_ratio)``);
  - ``promote`` early, once the canary has ``canary_min_requests``, when it is
    better on the primary metric (interval below 0) and non-inferior on every
    guardrail (interval at or below the margin);
  - at the budget (``canary_max_requests`` canary requests or
    ``canary_max_minutes``): ``promote`` if non-inferior on every metric measured
    (the primary margin is ``canary_max_negative_feedback_delta``), else
    ``rollback`` naming the metric; no canary traffic at all is a rollback;
  - a canary that drifted where production did not is never promoted;
  - otherwise ``wait``, with the intervals so far.
* :func:`judge` — :func:`arm_stats` from the log, then :func:`decide`; writes nothing.
* :func:`apply` / :func:`promote` / :func:`rollback` —
  :func:`tuneloop.store_deploy.finish_canary`: one transaction whose first write is
  a compare-and-set on the canary's ``running`` status, then the stage changes and
  their ``deploy_events``, together or not at all. When several judges (replicas,
  a CLI, the loop) decide the same canary at once exactly one decision is recorded;
  the others raise :class:`CanaryDecided` (a :class:`CanaryError`) and change nothing.
* :func:`rollback_production` — with no canary running: restore the version
  that was in production before the current one (skipping versions that were
  themselves rolled back), atomically.
* :func:`watch` — poll :func:`judge` until it decides, then :func:`apply`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from tuneloop import store_deploy
from tuneloop.db import Database, utcnow
from tuneloop.monitoring.sequential import MIN_N, Interval, bernoulli, diff_cs
from tuneloop.ratings import negative_sql
from tuneloop.store_deploy import Canary, CanaryDecided, CanaryError
from tuneloop.store_monitoring import latest_overall_drift

if TYPE_CHECKING:
    from tuneloop.settings import DeploySettings

__all__ = [  # Canary and its errors live in the storage layer; re-exported here for callers of this module
    "ArmStats",
    "Canary",
    "CanaryDecided",
    "CanaryError",
    "Decision",
    "apply",
    "arm_stats",
    "decide",
    "get",
    "judge",
    "metric_intervals",
    "promote",
    "rollback",
    "rollback_production",
    "running",
    "start",
    "watch",
]


@dataclass
class ArmStats:
    arm: str
    model_version: str | None
    requests: int = 0
    errors: int = 0
    error_rate: float = 0.0
    ttft_p50_s: float | None = None
    rated: int = 0
    negative: int = 0
    negative_share: float = 0.0
    drifted: bool | None = None
    drift_score: float | None = None
    # log(ttft_s) of successful requests: count, mean, variance (the TTFT guardrail)
    ttft_n: int = 0
    log_ttft_mean: float = 0.0
    log_ttft_var: float = 0.0
    # "ttft" (time to first token, generations) or "latency" (whole request, classifications)
    latency_kind: str = "ttft"


@dataclass
class Decision:
    action: str  # wait | promote | rollback
    canary_id: str
    reasons: list[str]
    arms: dict[str, ArmStats]
    elapsed_s: float
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        c, p = self.arms["canary"], self.arms["production"]
        return (
            f"{self.action}: canary {c.model_version} {c.requests} req (errors {c.error_rate:.1%}, p50 {_fmt_s(c.ttft_p50_s)}, "
            f"thumbs-down {c.negative_share:.0%} of {c.rated}) vs production {p.model_version} {p.requests} req "
            f"(errors {p.error_rate:.1%}, p50 {_fmt_s(p.ttft_p50_s)}, thumbs-down {p.negative_share:.0%} of {p.rated})"
            + ("; " + "; ".join(self.reasons) if self.reasons else "")
        )


def _fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}s"


def get(db: Database, canary_id: str | None = None) -> Canary:
    """A canary by id (prefix ok), or the running one."""
    if canary_id:
        c = store_deploy.get_canary(db, canary_id)
        if c is None:
            raise CanaryError(f"unknown canary {canary_id!r}")
        return c
    run = running(db)
    if run is None:
        raise CanaryError("no canary is running (start one with `tuneloop deploy canary VERSION`)")
    return run


def running(db: Database, task: str | None = None) -> Canary | None:
    """The running canary (of ``task`` when given: one canary per task can run), or None."""
    return store_deploy.running_canary(db, task=task)


def start(db: Database, candidate: str, share: float, actor: str = "tuneloop", reason: str = "") -> Canary:
    """Start a canary for ``candidate`` taking ``share`` of its task's production traffic (see module doc). A
    classifier canary is served beside the production classifier by an extra engine of the classifier server
    (:mod:`tuneloop.server.engine_pool`)."""
    return store_deploy.start_canary(db, candidate, share, actor=actor, reason=reason)


_ARM_SQL = f"""
WITH r AS (
    SELECT id, route, arm, model_version, status, response,
           -- the latency guardrail: time to first token of generations, the whole latency of a classification
           coalesce(ttft_s, CASE WHEN route = 'classify' THEN latency_s END) AS lat_s
    FROM requests
    WHERE received_at >= ? AND received_at <= ? AND arm IN ('production', 'canary')
), fb AS (
    SELECT request_id,
           arg_max(rating, created_at) AS rating, arg_max(rating_kind, created_at) AS rating_kind,
           arg_max(label, created_at) AS label
    FROM feedback WHERE (rating IS NOT NULL OR label IS NOT NULL) AND request_id IN (SELECT id FROM r)
    GROUP BY request_id
)
SELECT r.arm,
       arg_max(r.model_version, r.id) AS model_version,
       count(*) AS requests,
       count(*) FILTER (WHERE r.status >= 500) AS errors,
       quantile_cont(r.lat_s, 0.5) FILTER (WHERE r.status < 400) AS ttft_p50_s,
       count(*) FILTER (WHERE r.status < 400 AND r.lat_s > 0) AS ttft_n,
       avg(ln(r.lat_s)) FILTER (WHERE r.status < 400 AND r.lat_s > 0) AS log_ttft_mean,
       var_pop(ln(r.lat_s)) FILTER (WHERE r.status < 400 AND r.lat_s > 0) AS log_ttft_var,
       count(*) FILTER (WHERE fb.rating IS NOT NULL OR fb.label IS NOT NULL) AS rated,
       -- a label (a classifier's correct class) decides: wrong when it differs from the prediction; else the rating
       count(*) FILTER (WHERE CASE WHEN fb.label IS NOT NULL THEN fb.label <> r.response
                                   ELSE coalesce({negative_sql("fb.rating", "fb.rating_kind")}, false) END) AS negative,
       count(*) FILTER (WHERE r.route = 'classify') AS classify_requests
FROM r LEFT JOIN fb ON fb.request_id = r.id
GROUP BY r.arm
"""


@contextlib.contextmanager
def _log_since(db: Database, since: datetime) -> Iterator[Any]:
    """A DuckDB connection with ``requests`` and ``feedback``: PostgreSQL copies only the rows since ``since``
    (feedback on a request is never older than the request)."""
    where = {"requests": ("received_at >= ?", [since]), "feedback": ("created_at >= ?", [since])}
    with db.analytics(["requests", "feedback"], where=where) as con:
        yield con


def arm_stats(db: Database, c: Canary) -> dict[str, ArmStats]:
    """Per-arm statistics from ``c``'s start to its decision (to now while it runs; see module doc)."""
    out = {"production": ArmStats("production", c.production), "canary": ArmStats("canary", c.candidate)}
    with _log_since(db, c.started_at) as con:
        cur = con.execute(_ARM_SQL, [c.started_at, c.decided_at or datetime.max])
        cols = [d[0] for d in cur.description]
        rows = [dict(zip(cols, r)) for r in cur.fetchall()]
    for r in rows:
        s = out[r["arm"]]
        s.model_version = r["model_version"] or s.model_version
        s.requests, s.errors, s.rated, s.negative = (
            int(r["requests"]),
            int(r["errors"]),
            int(r["rated"]),
            int(r["negative"]),
        )
        s.error_rate = s.errors / s.requests if s.requests else 0.0
        s.ttft_p50_s = float(r["ttft_p50_s"]) if r["ttft_p50_s"] is not None else None
        s.negative_share = s.negative / s.rated if s.rated else 0.0
        s.ttft_n = int(r["ttft_n"] or 0)
        s.log_ttft_mean = float(r["log_ttft_mean"] or 0.0)
        s.log_ttft_var = float(r["log_ttft_var"] or 0.0)
        if int(r["classify_requests"] or 0) * 2 > s.requests:
            s.latency_kind = "latency"
    for s in out.values():
        if not s.model_version:
            continue
        d = latest_overall_drift(db, s.model_version, since=c.started_at)
        if d:
            s.drift_score, s.drifted = d["value"], bool(d["drifted"])
    return out


def judge(db: Database, canary_id: str | None, deploy: DeploySettings, now: datetime | None = None) -> Decision:
    """Decide wait / promote / rollback for a running canary from the request log (see module doc); writes nothing."""
    c = get(db, canary_id)
    if c.status != "running":
        raise CanaryDecided(c.id, c.status)
    elapsed = ((now or utcnow()) - c.started_at).total_seconds()
    return decide(c.id, arm_stats(db, c), elapsed, deploy)


def metric_intervals(ca: ArmStats, pa: ArmStats, deploy: DeploySettings) -> dict[str, tuple[Interval, float]]:
    """Per measured metric: (confidence sequence of canary - production, its non-inferiority margin)."""
    Moments = tuple[float, float, int]
    metrics: dict[str, tuple[Moments, Moments, float]] = {}
    # the primary metric only once both arms have enough ratings (users who do not rate leave the decision to the
    # guardrails); the guardrails always (too few requests give an interval that shows nothing)
    if min(ca.rated, pa.rated) >= MIN_N:
        metrics["negative_feedback"] = (
            bernoulli(ca.negative, ca.rated),
            bernoulli(pa.negative, pa.rated),
            deploy.canary_max_negative_feedback_delta,
        )
    metrics["error_rate"] = (
        bernoulli(ca.errors, ca.requests),
        bernoulli(pa.errors, pa.requests),
        deploy.canary_max_error_rate_delta,
    )
    metrics["ttft"] = (
        (ca.log_ttft_mean, ca.log_ttft_var, ca.ttft_n),
        (pa.log_ttft_mean, pa.log_ttft_var, pa.ttft_n),
        math.log(deploy.canary_max_latency_ratio),
    )
    alpha = deploy.canary_alpha / len(metrics)
    return {name: (diff_cs(c, p, alpha, margin), margin) for name, (c, p, margin) in metrics.items()}


def _detail(name: str, ca: ArmStats, pa: ArmStats, iv: Interval, margin: float) -> str:
    if name == "negative_feedback":
        what = "judged wrong (label corrected or thumbs-down)" if ca.latency_kind == "latency" else "thumbs-down"
        return (
            f"{what} {ca.negative_share:.0%} of {ca.rated} vs {pa.negative_share:.0%} of {pa.rated} "
            f"(difference in {_pct(iv)}, margin {margin:+.0%})"
        )
    if name == "error_rate":
        return (
            f"error rate {ca.error_rate:.2%} vs {pa.error_rate:.2%} (difference in {_pct(iv, 2)}, margin {margin:+.2%})"
        )
    lo, hi = (math.exp(v) if math.isfinite(v) else (0.0 if v < 0 else math.inf) for v in (iv.lo, iv.hi))
    what = "latency" if ca.latency_kind == "latency" else "time to first token"
    return (
        f"p50 {what} {_fmt_s(ca.ttft_p50_s)} vs {_fmt_s(pa.ttft_p50_s)} "
        f"(geometric-mean ratio in [x{lo:.2f}, x{hi:.2f}], margin x{math.exp(margin):.2f})"
    )


def _pct(iv: Interval, digits: int = 0) -> str:
    return f"[{iv.lo:+.{digits}%}, {iv.hi:+.{digits}%}]"


def decide(canary_id: str, arms: dict[str, ArmStats], elapsed_s: float, deploy: DeploySettings) -> Decision:
    """The sequential decision from the two arms' statistics (see module doc); pure, so it can be simulated."""
    ca, pa = arms["canary"], arms["production"]
    timed_out = elapsed_s >= deploy.canary_max_minutes * 60
    at_budget = timed_out or (deploy.canary_max_requests > 0 and ca.requests >= deploy.canary_max_requests)
    if ca.requests == 0:
        if timed_out:
            return Decision(
                "rollback", canary_id, [f"no canary traffic after {elapsed_s / 60:.1f} min"], arms, elapsed_s
            )
        return Decision("wait", canary_id, ["no canary traffic yet"], arms, elapsed_s)
    ivs = metric_intervals(ca, pa, deploy)
    checks: dict[str, dict[str, Any]] = {}
    worse: list[str] = []
    noninferior: list[str] = []
    for name, (iv, margin) in ivs.items():
        bound = 0.0 if name == "negative_feedback" else margin
        is_worse = iv.lo > bound
        ok = iv.hi <= margin
        checks[name] = {
            "passed": not is_worse and ok,
            "worse": is_worse,
            "non_inferior": ok,
            "better": iv.hi < 0,
            "interval": [iv.lo, iv.hi],
            "threshold": margin,
            "detail": _detail(name, ca, pa, iv, margin),
        }
        if is_worse:
            worse.append(name)
        elif ok:
            noninferior.append(name)
    drifted = ca.drifted is not None and ca.drifted and not pa.drifted
    if ca.drifted is not None:
        checks["drift"] = {
            "passed": not drifted,
            "value": ca.drift_score,
            "threshold": None,
            "detail": f"canary drift {'drifted' if ca.drifted else 'ok'} (score {ca.drift_score}), production "
            f"{'drifted' if pa.drifted else ('ok' if pa.drifted is not None else 'not measured')}",
        }
    if worse:
        reasons = [f"worse with confidence: {checks[n]['detail']}" for n in worse]
        return Decision("rollback", canary_id, reasons, arms, elapsed_s, checks)
    all_ok = len(noninferior) == len(ivs)
    better = "negative_feedback" in ivs and checks["negative_feedback"]["better"]
    enough = ca.requests >= deploy.canary_min_requests
    if drifted and (at_budget or (enough and better and all_ok)):
        return Decision("rollback", canary_id, [checks["drift"]["detail"]], arms, elapsed_s, checks)
    if enough and better and all_ok:
        reasons = [
            f"better with confidence after {ca.requests} canary requests: {checks['negative_feedback']['detail']}"
        ]
        return Decision("promote", canary_id, reasons, arms, elapsed_s, checks)
    if at_budget:
        budget = f"{elapsed_s / 60:.1f} min" if timed_out else f"{ca.requests} canary requests"
        if all_ok:
            reasons = [f"non-inferior on every metric after {budget}"] + [checks[n]["detail"] for n in ivs]
            return Decision("promote", canary_id, reasons, arms, elapsed_s, checks)
        failed = [f"not shown non-inferior after {budget}: {checks[n]['detail']}" for n in ivs if n not in noninferior]
        return Decision("rollback", canary_id, failed, arms, elapsed_s, checks)
    wait = (
        f"canary has {ca.requests}/{deploy.canary_min_requests} requests (budget {deploy.canary_max_requests} "
        f"or {deploy.canary_max_minutes:g} min), {elapsed_s / 60:.1f} min in"
    )
    return Decision("wait", canary_id, [wait] + [checks[n]["detail"] for n in ivs], arms, elapsed_s, checks)


def apply(db: Database, decision: Decision, actor: str = "canary-judge") -> Canary:
    """Carry out a promote/rollback decision atomically; a ``wait`` changes nothing."""
    if decision.action == "promote":
        return promote(
            db, decision.canary_id, actor=actor, reason="; ".join(decision.reasons), decision=decision.to_dict()
        )
    if decision.action == "rollback":
        return rollback(
            db, decision.canary_id, actor=actor, reason="; ".join(decision.reasons), decision=decision.to_dict()
        )
    return get(db, decision.canary_id)


def promote(
    db: Database,
    canary_id: str | None = None,
    actor: str = "tuneloop",
    reason: str = "manual promote",
    decision: dict[str, Any] | None = None,
) -> Canary:
    """Running canary -> production (the old production retires), canary row 'promoted'; one transaction."""
    return _finish(db, canary_id, "promoted", actor, reason, decision)


def rollback(
    db: Database,
    canary_id: str | None = None,
    actor: str = "tuneloop",
    reason: str = "manual rollback",
    decision: dict[str, Any] | None = None,
) -> Canary:
    """Running canary -> retired, production untouched, canary row 'rolled_back'; one transaction."""
    return _finish(db, canary_id, "rolled_back", actor, reason, decision)


def _finish(
    db: Database, canary_id: str | None, status: str, actor: str, reason: str, decision: dict[str, Any] | None
) -> Canary:
    c = get(db, canary_id)
    if c.status != "running":
        raise CanaryDecided(c.id, c.status)
    return store_deploy.finish_canary(db, c.id, status, actor=actor, reason=reason, decision=decision)


def rollback_production(
    db: Database, actor: str = "tuneloop", reason: str = "manual rollback", to: str | None = None, task: str = "chat"
) -> tuple[str, str]:
    """No canary of ``task`` running: put its previous production version (or ``to``) back; returns (retired,
    restored)."""
    return store_deploy.rollback_production(db, actor=actor, reason=reason, to=to, task=task)


def watch(
    db: Database,
    canary_id: str | None,
    deploy: DeploySettings,
    poll_s: float = 5.0,
    timeout_s: float | None = None,
    on_tick: Callable[[Decision], None] | None = None,
    actor: str = "canary-judge",
    sleep: Callable[[float], None] = time.sleep,
) -> Decision:
    """Judge every ``poll_s`` until it decides, then apply; ``timeout_s`` bounds the wait (still running -> CanaryError).
    Decided elsewhere meanwhile (another replica's judge, a CLI) -> :class:`CanaryDecided`."""
    c = get(db, canary_id)
    t0 = time.monotonic()
    while True:
        d = judge(db, c.id, deploy)
        if on_tick:
            on_tick(d)
        if d.action != "wait":
            apply(db, d, actor=actor)
            return d
        if timeout_s is not None and time.monotonic() - t0 >= timeout_s:
            raise CanaryError(f"canary {c.id} undecided after {timeout_s:.0f} s: {d.reasons[0]}")
        sleep(poll_s)
