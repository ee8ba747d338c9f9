"""What the web console's pages read (the storage layer's read SQL for ``/ui``): plain functions over a
:class:`tuneloop.db.Database`, no HTTP.

Contract
--------
* Every function is blocking (the console calls them in a worker thread) and returns plain dicts, lists and
  dataclasses for the templates; SQL runs on both backends (DuckDB file, PostgreSQL) through ``db.query``.
* :class:`TrafficFilter` / :func:`traffic_page` — the request log, newest first, filtered by version, route,
  status class, time range, rating, user and free text (case-insensitive, prompt and response), in pages of
  ``limit`` rows by **keyset** (``before`` = the last row's ``received_at|id``), so page N costs what page 1 does
  on a million-row log; the total is counted separately (:func:`traffic_count`).
* :func:`request_detail` — one request with its feedback, lineage (the datasets its rows entered, the versions
  trained on them) and review assignment.
* The other readers (:func:`overview`, :func:`datasets`, :func:`dataset_rows`, :func:`runs`, :func:`run_detail`,
  :func:`versions`, :func:`version_detail`, :func:`compare_eval`, :func:`drift_history`, :func:`last_cycle`,
  :func:`recent_canaries`, :func:`recent_prompts`) each serve one page; see their docstrings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tuneloop.db import Database
from tuneloop.dbapi import loads
from tuneloop.ratings import negative_sql

STATUS_CLASSES = {"ok": "r.status < 400", "client_error": "r.status BETWEEN 400 AND 499", "error": "r.status >= 500"}
RATINGS = ("up", "down", "rated", "unrated", "corrected")


@dataclass
class TrafficFilter:
    """The traffic page's filters (all optional; empty strings mean "any")."""

    version: str = ""
    route: str = ""
    status: str = ""  # ok | client_error | error | a number
    since: datetime | None = None
    until: datetime | None = None
    rating: str = ""  # up | down | rated | unrated | corrected
    user: str = ""
    q: str = ""

    def where(self) -> tuple[str, list[Any]]:
        """The SQL condition over ``requests r`` and its parameters."""
        parts = ["coalesce(r.arm, '') <> 'synthetic'"]
        params: list[Any] = []
        if self.version:
            parts.append("r.model_version = ?")
            params.append(self.version)
        if self.route:
            parts.append("r.route = ?")
            params.append(self.route)
        if self.status in STATUS_CLASSES:
            parts.append(STATUS_CLASSES[self.status])
        elif self.status.isdigit():
            parts.append("r.status = ?")
            params.append(int(self.status))
        if self.since is not None:
            parts.append("r.received_at >= ?")
            params.append(self.since)
        if self.until is not None:
            parts.append("r.received_at < ?")
            params.append(self.until)
        if self.user:
            parts.append("r.user_id = ?")
            params.append(self.user)
        if self.q:
            parts.append("(lower(r.response) LIKE ? OR lower(CAST(r.prompt AS VARCHAR)) LIKE ?)")
            needle = "%" + self.q.lower().replace("\\", "").replace("%", "").replace("_", "") + "%"
            params += [needle, needle]
        fb = "SELECT 1 FROM feedback f WHERE f.request_id = r.id"
        neg = negative_sql("f.rating", "f.rating_kind")
        if self.rating == "down":
            parts.append(f"EXISTS ({fb} AND {neg})")
        elif self.rating == "up":
            parts.append(f"EXISTS ({fb} AND f.rating IS NOT NULL AND NOT {neg})")
        elif self.rating == "rated":
            parts.append(f"EXISTS ({fb} AND f.rating IS NOT NULL)")
        elif self.rating == "unrated":
            parts.append(f"NOT EXISTS ({fb})")
        elif self.rating == "corrected":
            parts.append(f"EXISTS ({fb} AND f.correction IS NOT NULL)")
        return " AND ".join(parts), params


_LIST_COLS = """r.id, r.received_at, r.route, r.model_version, r.arm, r.status, r.finish_reason, r.prompt_tokens,
    r.completion_tokens, r.ttft_s, r.latency_s, r.user_id, substr(r.response, 1, 160) AS response_head,
    substr(CAST(r.prompt AS VARCHAR), 1, 400) AS prompt_head"""


def parse_cursor(text: str) -> tuple[datetime, str] | None:
    """``received_at|id`` (as :func:`traffic_page` hands out) -> its parts; None for anything else."""
    at, sep, rid = (text or "").partition("|")
    if not sep or not rid:
        return None
    try:
        return datetime.fromisoformat(at), rid
    except ValueError:
        return None


def traffic_page(
    db: Database, flt: TrafficFilter, limit: int, before: tuple[datetime, str] | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of requests (newest first) after the keyset ``before``, and the cursor of the next page (None at
    the end). Each row's ``prompt_head`` is reduced to the last user message's text."""
    where, params = flt.where()
    if before is not None:
        where += " AND (r.received_at < ? OR (r.received_at = ? AND r.id < ?))"
        params += [before[0], before[0], before[1]]
    rows = db.query(
        f"SELECT {_LIST_COLS} FROM requests r WHERE {where} ORDER BY r.received_at DESC, r.id DESC LIMIT ?",
        [*params, limit + 1],
    )
    more = len(rows) > limit
    rows = rows[:limit]
    for r in rows:
        r["prompt_head"] = _head_text(r["prompt_head"])
    nxt = f"{rows[-1]['received_at'].isoformat()}|{rows[-1]['id']}" if more and rows else None
    return rows, nxt


def traffic_count(db: Database, flt: TrafficFilter) -> int:
    where, params = flt.where()
    return int(db.query(f"SELECT count(*) AS n FROM requests r WHERE {where}", params)[0]["n"])


def traffic_choices(db: Database) -> dict[str, list[str]]:
    """The versions and routes the log has, for the filter menus."""
    return {
        "versions": [
            r["v"]
            for r in db.query("SELECT name AS v FROM model_versions UNION SELECT DISTINCT model_version FROM requests")
            if r["v"]
        ],
        "routes": [r["route"] for r in db.query("SELECT DISTINCT route FROM requests ORDER BY route")],
    }


def _head_text(prompt_head: str | None) -> str:
    """The last user turn of a (possibly cut) JSON prompt, for one line of the list."""
    if not prompt_head:
        return ""
    try:
        value = json.loads(prompt_head)
    except ValueError:
        marker = '"content": "' if '"content": "' in prompt_head else '"content":"'
        tail = prompt_head.rsplit(marker, 1)[-1]
        return tail[:160]
    if isinstance(value, str):
        return value[:160]
    if isinstance(value, list):
        users = [m for m in value if isinstance(m, dict) and m.get("role") == "user"]
        last = (users or value)[-1] if (users or value) else {}
        content = last.get("content") if isinstance(last, dict) else last
        return str(content or "")[:160]
    return str(value)[:160]


def request_detail(db: Database, request_id: str) -> dict[str, Any] | None:
    """The request row (``prompt``, ``params``, ``tool_calls`` and ``scores`` decoded), its ``feedback`` (every
    source), ``datasets`` (its rows' datasets and splits), ``trained`` (versions trained on those) and
    ``assignment`` (the review queue's row, if any); None for an unknown id."""
    from tuneloop.lineage import lineage

    rows = db.query("SELECT * FROM requests WHERE id = ?", [request_id])
    if not rows:
        return None
    r = rows[0]
    for k in ("prompt", "params", "tool_calls", "scores"):
        r[k] = loads(r.get(k))
    lin = lineage(db, request_id)
    fb = db.query(
        """SELECT source, rating, rating_kind, correction, comment, label, created_at FROM feedback
           WHERE request_id = ? ORDER BY created_at""",
        [request_id],
    )
    assignment = db.query("SELECT * FROM review_assignments WHERE request_id = ?", [request_id])
    return {
        "request": r,
        "messages": r["prompt"] if isinstance(r["prompt"], list) else None,
        "feedback": fb,
        "datasets": lin["used_in_datasets"],
        "trained": lin["trained_versions"],
        "served_by": lin["served_by"],
        "assignment": assignment[0] if assignment else None,
    }


# -- overview --------------------------------------------------------------------------------------------


def last_cycle(db: Database) -> dict[str, Any] | None:
    """The newest loop cycle: ``id``, ``steps`` (step -> status, details, error) and ``decision`` (the decide
    step's outcome and reason), or None when the loop never ran."""
    rows = db.query("SELECT id FROM loop_runs ORDER BY started_at DESC LIMIT 1")
    if not rows:
        return None
    from tuneloop.store_deploy import steps_of

    cid = rows[0]["id"]
    steps = steps_of(db, cid)
    decide = steps.get("decide", {})
    return {
        "id": cid,
        "steps": steps,
        "decision": decide.get("details", {}),
        "started_at": min(s["started_at"] for s in steps.values()),
    }


def overview(db: Database) -> dict[str, Any]:
    """Versions in production and canary per task, the running canary, each live version's latest overall drift,
    the last loop cycle, and the log's size."""
    from tuneloop.registry import list_versions
    from tuneloop.store_deploy import running_canary
    from tuneloop.store_monitoring import latest_overall_drift

    live = [v for v in list_versions(db) if v.stage in ("production", "canary")]
    drift = {v.name: latest_overall_drift(db, v.name) for v in live}
    counts = db.query(
        """SELECT (SELECT count(*) FROM requests) AS requests, (SELECT count(*) FROM feedback) AS feedback,
                  (SELECT count(*) FROM datasets) AS datasets, (SELECT count(*) FROM model_versions) AS versions"""
    )[0]
    return {
        "live": live,
        "canary": running_canary(db),
        "drift": drift,
        "cycle": last_cycle(db),
        "counts": counts,
    }


# -- datasets, runs, versions -------------------------------------------------------------------------------


def datasets(db: Database) -> list[dict[str, Any]]:
    """Every dataset, newest first, with its rows' origins (``origin`` -> count)."""
    rows = db.query(
        """SELECT id, name, kind, rows_train, rows_validation, rows_test, parent_ids, created_at
           FROM datasets ORDER BY created_at DESC"""
    )
    origins: dict[str, dict[str, int]] = {}
    for o in db.query(
        "SELECT dataset_id, coalesce(origin, 'file') AS origin, count(*) AS n FROM dataset_rows GROUP BY 1, 2"
    ):
        origins.setdefault(o["dataset_id"], {})[o["origin"]] = int(o["n"])
    for r in rows:
        r["parent_ids"] = loads(r["parent_ids"]) or []
        r["origins"] = origins.get(r["id"], {})
    return rows


def dataset_rows(db: Database, dataset_id: str, split: str, offset: int, limit: int) -> tuple[list[dict], int]:
    """Rows ``offset .. offset+limit`` of one split of a saved dataset (from its files) and the split's size."""
    from tuneloop.dataset_store import load_splits

    dd = load_splits(db, dataset_id)
    if split not in dd:
        return [], 0
    part = dd[split]
    n = len(part)
    return [dict(part[i]) for i in range(offset, min(offset + limit, n))], n


def runs(db: Database) -> list[dict[str, Any]]:
    """Every training run, newest first (config and metrics decoded) with the version it produced."""
    rows = db.query(
        """SELECT r.id, r.method, r.base_model, r.dataset_id, r.status, r.started_at, r.duration_s, r.metrics,
                  r.output_path, r.error, (SELECT min(v.name) FROM model_versions v WHERE v.run_id = r.id) AS version
           FROM runs r ORDER BY r.started_at DESC"""
    )
    for r in rows:
        r["metrics"] = loads(r["metrics"]) or {}
    return rows


def run_detail(db: Database, run_id: str) -> dict[str, Any] | None:
    """One run: its record, config, metrics and loss history (``loss.json`` in its output folder, [] if none)."""
    rows = db.query("SELECT * FROM runs WHERE id = ?", [run_id])
    if not rows:
        return None
    r = rows[0]
    for k in ("config", "metrics", "tracking"):
        r[k] = loads(r.get(k)) or {}
    history: list[dict[str, Any]] = []
    if r.get("output_path"):
        p = Path(r["output_path"]) / "loss.json"
        if p.is_file():
            try:
                history = [h for h in json.loads(p.read_text()) if h.get("loss") is not None]
            except ValueError:
                history = []
    r["history"] = history
    return r


def versions(db: Database) -> list[dict[str, Any]]:
    """Every model version, newest first, with its last gate verdict (``gate``: passed / failed / None)."""
    rows = db.query(
        """SELECT v.name, v.kind, v.task, v.stage, v.parent_version, v.dataset_id, v.run_id, v.created_at,
                  v.stage_changed_at,
                  (SELECT e.reason FROM deploy_events e WHERE e.model_version = v.name AND e.reason LIKE 'gate %'
                   ORDER BY e.occurred_at DESC LIMIT 1) AS gate
           FROM model_versions v ORDER BY v.created_at DESC"""
    )
    return rows


def version_detail(db: Database, name: str) -> dict[str, Any] | None:
    """One version: record, gate details, stage history (deploy events), lineage chain and its eval reports."""
    from tuneloop.lineage import lineage
    from tuneloop.registry import find_version
    from tuneloop.store_deploy import last_gate_details, recent_events

    v = find_version(db, name)
    if v is None:
        return None
    reports = db.query(
        """SELECT id, dataset_id, models, created_at FROM eval_reports
           WHERE CAST(models AS VARCHAR) LIKE ? ORDER BY created_at DESC""",
        ['%"' + name.replace("%", "").replace("_", "\\_") + '"%'],
    )
    for r in reports:
        r["models"] = loads(r["models"]) or []
    return {
        "version": v,
        "gate": last_gate_details(db, name),
        "events": recent_events(db, version=name),
        "chain": lineage(db, name)["chain"],
        "reports": reports,
    }


def compare_eval(db: Database, report_id: str, a: str, b: str, metric: str | None = None) -> dict[str, Any] | None:
    """Per-example comparison of models ``a`` and ``b`` in one eval report: for ``metric`` (default: the first
    per-example metric both have), as ``examples``: each example's two values, the difference and the verdict (``win`` for ``a``,
    ``loss``, ``tie``), the counts, and the sample predictions the report kept. None when the report or a model
    is missing."""
    rows = db.query("SELECT report FROM eval_reports WHERE id = ?", [report_id])
    if not rows:
        return None
    rep = loads(rows[0]["report"]) or {}
    per = rep.get("per_example", {})
    if a not in per or b not in per:
        return None
    metrics = [m for m in per[a] if m in per[b] and isinstance(per[a][m], list)]
    if not metrics:
        return None
    metric = metric if metric is not None and metric in metrics else metrics[0]
    ids = rep.get("example_ids") or list(range(len(per[a][metric])))
    samples = {s.get("id"): s for s in rep.get("samples", [])}
    lower_better = metric.endswith(("loss", "nll", "perplexity"))
    items = []
    for i, (x, y) in enumerate(zip(per[a][metric], per[b][metric], strict=False)):
        d = (x or 0.0) - (y or 0.0)
        if lower_better:
            d = -d
        verdict = "win" if d > 1e-9 else ("loss" if d < -1e-9 else "tie")
        ex = ids[i] if i < len(ids) else i
        items.append({"id": ex, "a": x, "b": y, "delta": d, "verdict": verdict, "sample": samples.get(ex)})
    items.sort(key=lambda it: it["delta"])
    counts = {k: sum(1 for it in items if it["verdict"] == k) for k in ("win", "loss", "tie")}
    return {
        "report_id": report_id,
        "a": a,
        "b": b,
        "metric": metric,
        "metrics": metrics,
        "examples": items,
        "counts": counts,
        "summary": {m: rep.get("summary", {}).get(m) for m in (a, b)},
        "lower_better": lower_better,
    }


# -- drift ------------------------------------------------------------------------------------------------------


@dataclass
class DriftSeries:
    """One drift statistic of one version over time."""

    feature: str
    statistic: str
    threshold: float | None
    points: list[dict[str, Any]] = field(default_factory=list)  # {"at", "value", "drifted"}


def drift_history(db: Database, version: str, limit: int = 500) -> tuple[list[DriftSeries], dict[str, Any] | None]:
    """Every statistic of ``version`` over its last ``limit`` computations (oldest first), and the newest
    ``overall`` row's details (``new_words`` ...)."""
    rows = db.query(
        """SELECT feature, statistic, value, threshold, drifted, created_at FROM drift_reports
           WHERE model_version = ? AND id IN (SELECT id FROM drift_reports WHERE model_version = ?
                                              GROUP BY id ORDER BY max(created_at) DESC LIMIT ?)
           ORDER BY created_at""",
        [version, version, limit],
    )
    series: dict[str, DriftSeries] = {}
    for r in rows:
        s = series.setdefault(r["feature"], DriftSeries(r["feature"], r["statistic"], r["threshold"]))
        s.threshold = r["threshold"]
        if r["value"] is not None:
            s.points.append({"at": r["created_at"].isoformat(), "value": r["value"], "drifted": bool(r["drifted"])})
    latest = db.query(
        """SELECT details, window_start, window_end, n_requests, created_at FROM drift_reports
           WHERE model_version = ? AND feature = 'overall' ORDER BY created_at DESC LIMIT 1""",
        [version],
    )
    last = None
    if latest:
        last = {**latest[0], "details": loads(latest[0]["details"]) or {}}
    order = sorted(series.values(), key=lambda s: (s.feature != "overall", s.feature))
    return order, last


def drift_versions(db: Database) -> list[str]:
    return [r["model_version"] for r in db.query("SELECT DISTINCT model_version FROM drift_reports ORDER BY 1")]


def recent_prompts(db: Database, version: str, limit: int) -> list[Any]:
    """The newest ``limit`` logged prompts of ``version`` (decoded JSON: message lists or strings), for the drift
    page's clusters."""
    rows = db.query(
        "SELECT prompt FROM requests WHERE model_version = ? AND prompt IS NOT NULL ORDER BY received_at DESC LIMIT ?",
        [version, limit],
    )
    return [loads(r["prompt"]) for r in rows]


def recent_canaries(db: Database, limit: int = 10) -> list[dict[str, Any]]:
    """The newest ``limit`` canaries (running or decided), newest first."""
    return db.query(
        "SELECT id, candidate, production, share, status, started_at, decided_at FROM canaries "
        "ORDER BY started_at DESC LIMIT ?",
        [limit],
    )
