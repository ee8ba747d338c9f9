"""The annotation queue's rules: which requests a reviewer is given next (the SQL is :mod:`tuneloop.store_review`).

Contract
--------
:class:`ReviewQueue` (on ``app.state.console_queue``) tops a reviewer's open items up to ``ui.queue_batch`` by
:meth:`ReviewQueue.fill`, taking candidates rule by rule in ``ui.queue_rules`` order:

* ``thumbs_down`` — a negative rating that no reviewer has reviewed yet; newest first;
* ``truncated`` — answers cut at the token limit (``finish_reason = length``);
* ``drifted`` — requests nobody rated whose prompt is least like the serving version's training prompts
  (:func:`tuneloop.monitoring.likeness.unlikeness` >= ``ui.queue_drift_min``), least alike first;
* ``unreviewed`` — a ``ui.queue_sample_share`` sample of requests nobody rated, chosen by a hash of the request
  id (the same requests on every replica and every fill).

Only requests logged within ``ui.queue_window`` count. A request is held by one reviewer at a time
(:func:`tuneloop.store_review.assign`); the rule that picked it is recorded as the item's ``reason``. A version's
training prompts are read once per process and kept (keyed by version: versions are immutable).
"""

from __future__ import annotations

import hashlib
from typing import Any

from tuneloop import store_review
from tuneloop.db import Database, utcnow
from tuneloop.dbapi import loads
from tuneloop.monitoring.likeness import training_prompts, unlikeness, user_text
from tuneloop.settings import UISettings
from tuneloop.timeparse import parse_duration

_POOL = 500  # unrated requests scanned per fill by the drifted / unreviewed rules


def sampled(request_id: str, share: float) -> bool:
    """Whether the ``unreviewed`` rule's sample holds ``request_id`` (a stable hash, uniform in [0, 1))."""
    h = int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big") / 2**64
    return h < share


class ReviewQueue:
    """See module docstring."""

    def __init__(self, db: Database, settings: UISettings):
        self.db = db
        self.settings = settings
        self._reference: dict[str, list[str]] = {}

    def reference(self, version: str | None) -> list[str]:
        """``version``'s training prompts (read once per process and kept)."""
        key = version or ""
        if key not in self._reference:
            self._reference[key] = training_prompts(self.db, version or None)
        return self._reference[key]

    def _unlike(self, rows: list[dict[str, Any]]) -> list[tuple[float, dict[str, Any]]]:
        by_version: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by_version.setdefault(r["model_version"] or "", []).append(r)
        scored = []
        for version, items in by_version.items():
            found = unlikeness(self.reference(version), [user_text(loads(r["prompt"])) for r in items])
            if found is None:
                continue
            scored += [(s, r) for s, r in zip(found, items, strict=True) if s >= self.settings.queue_drift_min]
        scored.sort(key=lambda x: -x[0])
        return scored

    def candidates(self, rule: str, need: int, exclude: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
        """Up to ``need`` requests ``rule`` picks now (unassigned, in the window, not in ``exclude``)."""
        since = utcnow() - parse_duration(self.settings.queue_window)
        if rule in ("thumbs_down", "truncated"):
            rows = store_review.rule_candidates(self.db, rule, since, need + len(exclude))
            return [r for r in rows if r["id"] not in exclude][:need]
        pool = [r for r in store_review.rule_candidates(self.db, rule, since, _POOL) if r["id"] not in exclude]
        if rule == "unreviewed":
            return [r for r in pool if sampled(r["id"], self.settings.queue_sample_share)][:need]
        if rule == "drifted":
            return [r for _, r in self._unlike(pool)][:need]
        raise ValueError(f"unknown queue rule {rule!r} (known: {', '.join(store_review.RULES)})")

    def fill(self, reviewer: str) -> int:
        """Top ``reviewer``'s open items up to ``ui.queue_batch``; how many were assigned now."""
        need = self.settings.queue_batch - store_review.progress(self.db, reviewer)["open"]
        if need <= 0:
            return 0
        picked: list[tuple[str, str]] = []
        seen: set[str] = set()
        for rule in self.settings.queue_rules:
            if len(picked) >= need:
                break
            for r in self.candidates(rule, need - len(picked), frozenset(seen)):
                seen.add(r["id"])
                picked.append((r["id"], rule))
        return store_review.assign(self.db, reviewer, picked[:need]) if picked else 0
