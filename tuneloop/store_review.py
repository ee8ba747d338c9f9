"""The annotation queue's SQL: which logged requests wait for review, and which reviewer holds each.

Contract
--------
* A reviewed item is an ordinary ``feedback`` row whose ``source`` is :func:`reviewer_source` (``review:<name>``),
  so ``feedback sample`` and the canary judge use it like any other feedback; this module only keeps the queue:
  ``review_assignments`` (one row per request: its reviewer, the rule that picked it, when it was assigned and
  reviewed).
* :func:`rule_candidates` — the newest logged requests in the window that a queue rule picks and nobody holds
  yet: ``thumbs_down`` (a negative rating from a source other than a reviewer), ``truncated``
  (``finish_reason = 'length'``), and for ``unreviewed`` / ``drifted`` the requests nobody rated at all (the caller
  samples or ranks those: :mod:`tuneloop.server.console_queue`). Only successful (status < 400) requests.
* :func:`assign` — gives requests to a reviewer; a request already held by anyone is skipped (the primary key
  decides, so two reviewers or two replicas never hold one request).
* :func:`mark_reviewed` — stamps the reviewer's item as reviewed (an item reviewed from the traffic page without
  being queued is recorded as assigned and reviewed at once, reason ``direct``).
* :func:`open_items` / :func:`progress` — a reviewer's open items (oldest assignment first) and their counts.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from tuneloop.db import Database, utcnow
from tuneloop.ratings import negative_sql

SOURCE_PREFIX = "review:"
RULES = ("thumbs_down", "truncated", "drifted", "unreviewed")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:/-]+")

_BASE = """FROM requests r
    WHERE r.received_at >= ? AND r.status < 400 AND coalesce(r.arm, '') <> 'synthetic'
      AND NOT EXISTS (SELECT 1 FROM review_assignments a WHERE a.request_id = r.id)"""
_COLS = "r.id, r.received_at, r.model_version, r.route, r.prompt"


def reviewer_source(reviewer: str) -> str:
    """The feedback ``source`` of a reviewer's reviews: ``review:<reviewer>`` with characters outside the API's
    source alphabet replaced by ``-`` (at most 64 characters in all)."""
    name = _UNSAFE.sub("-", reviewer).strip("-") or "anonymous"
    return (SOURCE_PREFIX + name)[:64]


def rule_candidates(db: Database, rule: str, since: datetime, limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` newest unassigned requests since ``since`` that ``rule`` picks (see module doc)."""
    if rule == "thumbs_down":
        where = (
            "AND EXISTS (SELECT 1 FROM feedback f WHERE f.request_id = r.id AND f.source NOT LIKE 'review:%' AND "
            + negative_sql("f.rating", "f.rating_kind")
            + ")"
        )
    elif rule == "truncated":
        where = "AND r.finish_reason = 'length'"
    elif rule in ("unreviewed", "drifted"):
        where = "AND NOT EXISTS (SELECT 1 FROM feedback f WHERE f.request_id = r.id)"
    else:
        raise ValueError(f"unknown queue rule {rule!r} (known: {', '.join(RULES)})")
    return db.query(f"SELECT {_COLS} {_BASE} {where} ORDER BY r.received_at DESC LIMIT ?", [since, limit])


def assign(db: Database, reviewer: str, items: list[tuple[str, str]]) -> int:
    """Assign ``(request_id, reason)`` pairs to ``reviewer``; requests already held are skipped. How many were new."""
    now = utcnow()
    n = 0
    with db.connect() as con:
        for request_id, reason in items:
            got = con.execute(
                "INSERT INTO review_assignments (request_id, reviewer, reason, assigned_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (request_id) DO NOTHING RETURNING request_id",
                [request_id, reviewer, reason, now],
            ).fetchall()
            n += len(got)
    return n


def mark_reviewed(db: Database, request_id: str, reviewer: str) -> None:
    """Stamp ``reviewer``'s item ``request_id`` reviewed (recorded as a ``direct`` item if it was not queued)."""
    now = utcnow()
    with db.connect() as con:
        con.execute(
            "INSERT INTO review_assignments (request_id, reviewer, reason, assigned_at, reviewed_at) "
            "VALUES (?, ?, 'direct', ?, ?) ON CONFLICT (request_id) DO NOTHING",
            [request_id, reviewer, now, now],
        )
        con.execute(
            "UPDATE review_assignments SET reviewed_at = ? WHERE request_id = ? AND reviewer = ? AND reviewed_at IS NULL",
            [now, request_id, reviewer],
        )


def open_items(db: Database, reviewer: str, limit: int = 200) -> list[dict[str, Any]]:
    """``reviewer``'s assigned, unreviewed items with their requests, oldest assignment first."""
    return db.query(
        """SELECT a.request_id, a.reason, a.assigned_at, r.received_at, r.model_version, r.route, r.prompt,
                  r.response, r.finish_reason
           FROM review_assignments a JOIN requests r ON r.id = a.request_id
           WHERE a.reviewer = ? AND a.reviewed_at IS NULL ORDER BY a.assigned_at, a.request_id LIMIT ?""",
        [reviewer, limit],
    )


def progress(db: Database, reviewer: str) -> dict[str, int]:
    """``reviewer``'s counts: ``done`` (reviewed), ``open`` (assigned, not reviewed), and ``others_open``: items
    other reviewers hold unreviewed."""
    rows = db.query(
        """SELECT count(*) FILTER (WHERE reviewer = ? AND reviewed_at IS NOT NULL) AS done,
                  count(*) FILTER (WHERE reviewer = ? AND reviewed_at IS NULL) AS open,
                  count(*) FILTER (WHERE reviewer <> ? AND reviewed_at IS NULL) AS others_open
           FROM review_assignments""",
        [reviewer, reviewer, reviewer],
    )
    return {k: int(v or 0) for k, v in rows[0].items()}
