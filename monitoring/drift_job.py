"""The drift job: drift of every served version, stored in ``drift_reports`` and exported as gauges.

Contract
--------
* ``DriftJob(db, settings: DriftSettings, registry: CollectorRegistry | None,
  source=None)`` registers ``tuneloop_drift_score{feature,model_version}`` (the
  statistic's value; feature ``overall`` = share of statistics that drifted) and
  ``tuneloop_drifted{feature,model_version}`` (1 when over its threshold) on the
  given registry (none = no gauges).
* :meth:`DriftJob.run_once` computes drift for every version with traffic in
  the window (or the named one): the version's reference profile from
  ``reference_profiles`` (computed on demand from its training data when
  missing), the window's aggregates (DuckDB SQL), embeddings of a sample of
  production prompts (all-MiniLM-L6-v2) when enabled, and writes one
  ``drift_reports`` row per statistic plus an ``overall`` row, all sharing one
  id. The window's ``requests``/``feedback`` are read through ``source`` (a
  :class:`monitoring.sources.LogSource`; default: ``db`` itself), so a
  source over Parquet exports of many replicas (``--from-parquet``) gives the
  same statistics as one database holding all their rows; profiles, datasets
  and ``drift_reports`` always live in ``db``. Windows with fewer than
  ``min_requests`` requests, and versions without a training dataset, are returned with ``skipped`` set and write nothing.
* Both backends: the statistics are DuckDB SQL on the source's DuckDB
  connection. On PostgreSQL the versions with traffic and a request-count
  window's first request are asked of the server (portable SQL), then only
  that version's window (its requests and their feedback) is copied into
  DuckDB as Arrow, and the statistics equal those over a DuckDB file holding
  the same rows. Profiles are read and ``drift_reports`` written through
  ``db.connect()`` with portable SQL (one transaction per pass), never on the
  analytics connection.
* Classifier versions (a registered version whose training dataset's card
  has ``labels``, i.e. a ``classification`` dataset, or whose ``task`` is
  ``classification``): :meth:`DriftJob.compute` takes the classifier path
  instead of the profile: the window's ``classify`` rows
  (:func:`monitoring.drift.classify_stats`), the confidence reference window
  (the version's first :data:`~monitoring.drift.CONFIDENCE_REFERENCE_REQUESTS`
  classified inputs before the window, found with portable SQL and copied
  like the window) and :func:`monitoring.drift.compare_classify`. The result
  is a :class:`~monitoring.drift.DriftResult` like chat's, so it is stored,
  exported as gauges (features ``label_distribution``, ``confidence_psi``,
  ``confidence_ks``, ``overall``), reported and shown by ``tuneloop drift``
  the same way.
* :meth:`DriftJob.run_forever` ``(stop_event)`` repeats it every
  ``interval_s`` in a worker thread, logging (never raising) failures, so the
  server starts it with one line in its lifespan::

      task = asyncio.create_task(DriftJob(db, settings.drift, registry).run_forever(stop))
* :func:`run_once` ``(db, settings, version=None, window=None) -> dict`` is the
  one-call form for scripts (the demo): the result of ``version`` as a dict
  (``features`` -> {value, threshold, drifted, ...}), or ``{"versions": ...}``.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any

from tuneloop.db import Database, dumps, utcnow
from tuneloop.errors import UserError
from tuneloop.ids import new_id
from tuneloop.monitoring.drift import (
    CONFIDENCE_REFERENCE_REQUESTS,
    REFERENCE_SPAN_SQL,
    WINDOW_START_SQL,
    DriftResult,
    Window,
    classify_stats,
    compare,
    compare_classify,
    confidences,
    parse_window,
    production_stats,
)
from tuneloop.monitoring.profile import Profile, compute_profile, load_profile
from tuneloop.monitoring.sources import LogSource, log_source
from tuneloop.store_monitoring import save_drift_reports

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Gauge

    from tuneloop.monitoring.embeddings import Embedder
    from tuneloop.settings import DriftSettings, Settings

log = logging.getLogger(__name__)


class DriftJob:
    """See module doc."""

    def __init__(
        self,
        db: Database | None,
        settings: DriftSettings,
        registry: CollectorRegistry | None = None,
        embedder: Embedder | None = None,
        source: LogSource | None = None,
    ):
        self.db, self.settings = db, settings
        self.source = source if source is not None else (log_source(db) if db is not None else None)
        self._embedder = embedder
        self._unprofiled: dict[str, str] = {}  # version -> why it has no profile (logged once)
        self.score: Gauge | None = None
        self.drifted: Gauge | None = None
        if registry is not None:
            from prometheus_client import Gauge

            self.score = Gauge(
                "tuneloop_drift_score",
                "Drift statistic of a model version's production window vs its "
                "training data (feature 'overall' = share of statistics that drifted)",
                ["feature", "model_version"],
                registry=registry,
            )
            self.drifted = Gauge(
                "tuneloop_drifted",
                "1 when the drift statistic is over its threshold, else 0",
                ["feature", "model_version"],
                registry=registry,
            )

    # -- helpers -------------------------------------------------------------------------------
    def _database(self) -> Database:
        """The database of profiles and drift reports (a job built without one only exports gauges)."""
        if self.db is None:
            raise UserError("this drift job has no database to read profiles from or write drift reports to")
        return self.db

    def _logs(self) -> LogSource:
        """Where the window's requests and feedback are read from."""
        if self.source is None:
            raise UserError("this drift job has no database and no --from-parquet folder to read logs from")
        return self.source

    def embedder(self) -> Embedder:
        if self._embedder is None:
            from tuneloop.monitoring.embeddings import Embedder

            self._embedder = Embedder()
        return self._embedder

    def versions_with_traffic(self, window: Window, now: datetime) -> list[str]:
        if window.requests:
            sql, params = (
                "SELECT DISTINCT model_version FROM requests WHERE model_version IS NOT NULL AND received_at <= ?",
                [now],
            )
        else:
            sql = "SELECT DISTINCT model_version FROM requests WHERE model_version IS NOT NULL AND received_at BETWEEN ? AND ?"
            params = [now - window.duration(), now]
        # portable SQL: on PostgreSQL the server answers it, no rows are copied
        return sorted(r["model_version"] for r in self._logs().query(sql, params, portable=True))

    def window_span(self, version: str, window: Window, now: datetime) -> tuple[datetime | None, datetime]:
        """(start, end) of ``version``'s window, found where the rows are (portable SQL), so a source that copies
        rows (PostgreSQL) copies only the window. ``start`` is None when a request-count window is empty."""
        if not window.requests:
            return now - window.duration(), now
        rows = self._logs().query(WINDOW_START_SQL, [version, now, window.requests], portable=True)
        return (rows[0]["start"] if rows else None), now

    def profile(self, version: str) -> Profile:
        p = load_profile(self._database(), version)
        if p is None:
            try:
                p = compute_profile(
                    self._database(),
                    version,
                    self.settings,
                    embedder=self.embedder() if self.settings.embeddings else None,
                )
            except UserError as e:
                # said once per version and reason, not at every pass of the background job
                if self._unprofiled.get(version) != str(e):
                    log.info("no drift check for %s: %s", version, e)
                    self._unprofiled[version] = str(e)
                raise
            self._unprofiled.pop(version, None)
            log.info("reference profile of %s computed from its training data", version)
        return p

    # -- classifiers ---------------------------------------------------------------------------
    def reference_labels(self, version: str) -> dict[str, int] | None:
        """``{label: training count}`` of a classifier version (its dataset card's ``labels``), ``{}`` for a
        classifier without them, None for any other version (see module doc)."""
        from tuneloop.registry import RegistryError, find_version, get_dataset

        v = find_version(self._database(), version)
        if v is None:
            return None
        card: dict[str, Any] = {}
        if v.dataset_id:
            try:
                ds = get_dataset(self._database(), v.dataset_id)
            except RegistryError:
                ds = None
            if ds is not None:
                card = dict(ds.card or {})
                if ds.kind != "classification" and not isinstance(card.get("labels"), dict):
                    card = {}
        labels = card.get("labels")
        if isinstance(labels, dict) and labels:
            return {str(k): int(n) for k, n in labels.items()}
        return {} if getattr(v, "task", None) == "classification" else None

    def compute_classify(self, version: str, labels: dict[str, int], window: Window, now: datetime) -> DriftResult:
        """Drift of a classifier version's window: predicted labels vs ``labels``, confidence vs its reference."""
        rid = new_id()
        logs = self._logs()
        start, end = self.window_span(version, window, now)
        prod = classify_stats(None, version, None, end)  # an empty request-count window: nothing to read
        if start is not None:
            with logs.connect(since=start, until=end, model_version=version) as con:
                prod = classify_stats(con, version, start, end)
            rows = logs.query(REFERENCE_SPAN_SQL, [version, start, CONFIDENCE_REFERENCE_REQUESTS], portable=True)
            ref = rows[0] if rows else {}
            if ref.get("n") and ref.get("start") is not None:
                with logs.connect(since=ref["start"], until=ref["end"], model_version=version) as con:
                    prod.reference_confidence = confidences(con, version, ref["start"], ref["end"])
                prod.reference_start, prod.reference_end = ref["start"], ref["end"]
        skipped = None
        if prod.n_requests < self.settings.min_requests:
            skipped = (
                f"{prod.n_requests} classified inputs in the window, fewer than "
                f"drift.min_requests={self.settings.min_requests}"
            )
        elif not labels:
            skipped = f"classifier {version!r} has no training label counts (its dataset card has no 'labels')"
        if skipped:
            return DriftResult(
                rid,
                version,
                str(window),
                prod.window_start,
                prod.window_end,
                prod.n_requests,
                [],
                0.0,
                self.settings.overall_threshold,
                False,
                skipped=skipped,
            )
        return compare_classify(labels, prod, self.settings, rid, str(window))

    # -- one pass ------------------------------------------------------------------------------
    def compute(self, version: str, window: Window, now: datetime) -> DriftResult:
        """Drift of one version (nothing written); a classifier version takes :meth:`compute_classify`."""
        labels = self.reference_labels(version) if self.db is not None else None
        if labels is not None:
            return self.compute_classify(version, labels, window, now)
        rid = new_id()
        try:
            prof = self.profile(version)
        except UserError as e:
            return DriftResult(
                rid, version, str(window), None, now, 0, [], 0.0, self.settings.overall_threshold, False, skipped=str(e)
            )
        want_emb = bool(self.settings.embeddings and prof.embeddings is not None)
        logs = self._logs()
        start, end = self.window_span(version, window, now) if logs.copies else (None, None)
        if logs.copies and start is None:  # no served request of this version at all: nothing to copy
            start = end
        with logs.connect(since=start, until=end, model_version=version) as con:
            prod = production_stats(
                con,
                version,
                window,
                prof.profile["vocab"],
                now,
                text_sample=self.settings.embedding_sample if want_emb else 0,
                word_sample=self.settings.word_sample,
            )
        if prod.n_requests < self.settings.min_requests:
            return DriftResult(
                rid,
                version,
                str(window),
                prod.window_start,
                prod.window_end,
                prod.n_requests,
                [],
                0.0,
                self.settings.overall_threshold,
                False,
                skipped=f"{prod.n_requests} requests in the window, fewer than drift.min_requests={self.settings.min_requests}",
            )
        emb = self.embedder()(prod.texts) if want_emb and len(prod.texts) >= 2 else None
        return compare(
            prof.profile, prod, self.settings, rid, str(window), prof.embeddings if emb is not None else None, emb
        )

    def write(self, res: DriftResult) -> None:
        now = utcnow()
        rows = [
            [
                res.id,
                res.model_version,
                res.window_start,
                res.window_end,
                res.n_requests,
                f.feature,
                f.statistic,
                f.value,
                f.threshold,
                f.drifted,
                dumps(f.details),
                now,
            ]
            for f in res.features
        ]
        rows.append(
            [
                res.id,
                res.model_version,
                res.window_start,
                res.window_end,
                res.n_requests,
                "overall",
                "score",
                res.score,
                res.threshold,
                res.drifted,
                dumps(
                    {
                        "window": res.window,
                        "drifted_features": [f.feature for f in res.features if f.drifted],
                        "new_words": res.new_words,
                        "histograms": res.histograms,
                    }
                ),
                now,
            ]
        )
        save_drift_reports(self._database(), rows)

    def export(self, res: DriftResult) -> None:
        score, drifted_gauge = self.score, self.drifted
        if score is None or drifted_gauge is None:
            return
        for name, value, drifted in [(f.feature, f.value, f.drifted) for f in res.features] + [
            ("overall", res.score, res.drifted)
        ]:
            if value is not None:
                score.labels(name, res.model_version).set(value)
            drifted_gauge.labels(name, res.model_version).set(1.0 if drifted else 0.0)

    def run_once(
        self,
        version: str | None = None,
        window: str | Window | None = None,
        now: datetime | None = None,
        write: bool = True,
    ) -> list[DriftResult]:
        """Drift of ``version`` (or every version with traffic in the window); stored and exported unless skipped."""
        now = now or utcnow()
        w = window if isinstance(window, Window) else parse_window(window or self.settings.window)
        versions = [version] if version else self.versions_with_traffic(w, now)
        out = []
        for v in versions:
            res = self.compute(v, w, now)
            if res.skipped is None:
                if write:
                    self.write(res)
                self.export(res)
            out.append(res)
        return out

    async def run_forever(self, stop_event: asyncio.Event) -> None:
        """Run :meth:`run_once` every ``interval_s`` (in a thread) until ``stop_event`` is set."""
        if self.settings.interval_s <= 0:
            return
        while not stop_event.is_set():
            try:
                await asyncio.to_thread(self.run_once)
            except Exception:  # a failed pass must not kill the server; the next one retries
                log.exception("drift pass failed")
            try:
                await asyncio.wait_for(stop_event.wait(), timeout=self.settings.interval_s)
            except TimeoutError:
                pass


def run_once(
    db: Database, settings: Settings | DriftSettings, version: str | None = None, window: str | None = None
) -> dict[str, Any]:
    """One drift pass without gauges; ``settings`` is a Settings or DriftSettings (see module doc)."""
    from tuneloop.settings import Settings

    ds = settings.drift if isinstance(settings, Settings) else settings
    results = DriftJob(db, ds, None).run_once(version, window)
    if version:
        return results[0].as_dict()
    return {"versions": {r.model_version: r.as_dict() for r in results}}
