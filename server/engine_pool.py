"""Extra engines of a classifier server: one vLLM pooling engine per other classifier version it serves.

Contract
--------
A generative server serves every version of its base through one engine (LoRA
adapters are hot-swapped). A classifier cannot: each classifier version is a full
``*ForSequenceClassification`` folder (LoRA is merged into it), and vLLM's pooling
runner serves one folder per engine. So a classifier server keeps, beside its
main :class:`~tuneloop.server.engine.Engine`, an :class:`EnginePool` of extra
engines — one per other classifier folder a request (or the deploy state) names
— which is what lets a classifier canary get its share of ``production`` traffic
on the same server as the production classifier.

* :meth:`EnginePool.use` is an async context manager yielding the engine of a
  folder: the main engine for its own folder, else the pooled one, started on
  first use (tens of seconds on CPU; concurrent first uses share one start;
  starts run one at a time, so each engine's guard process adopts only its own
  children). A folder whose engine failed to start is a 503 ``engine_unavailable``
  naming the error; the next use tries again.
* At most ``capacity`` extra engines (``server.classifier_engines``) run at once.
  Starting another evicts the least recently used engine that is neither pinned
  (:meth:`pin`: the router pins the production and canary folders at every
  deploy-state refresh) nor serving a request; when every slot is pinned or busy
  the request is a 503 ``engine_pool_full`` with ``Retry-After``. ``capacity`` 0
  turns the pool off: other classifier versions are then the router's 400
  ``model_not_servable``.
* :meth:`prestart` schedules a start without waiting (the router calls it for a
  canary's folder, so the first canary request does not wait for the engine);
  :meth:`ready` says whether a folder's engine is up.
* :meth:`shutdown` stops every extra engine (the app's lifespan calls it); the
  main engine is the app's to stop.

No module-level state: one pool per app, on its :class:`~tuneloop.server.routing.ModelRouter`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tuneloop.server.errors import APIError

if TYPE_CHECKING:  # pragma: no cover
    from tuneloop.monitoring.metrics import ServingMetrics
    from tuneloop.server.engine import Engine
    from tuneloop.settings import EngineSettings

log = logging.getLogger(__name__)


@dataclass
class PooledEngine:
    name: str  # the version it serves (its engine's served name)
    folder: str
    engine: Engine
    last_used: float
    in_flight: int = 0


class EnginePool:
    """Extra classifier engines beside a server's main engine; see module docstring."""

    def __init__(
        self, main: Engine, settings: EngineSettings, capacity: int, metrics: ServingMetrics | None = None
    ) -> None:
        self.main = main
        self.settings = settings
        self.capacity = capacity
        self.metrics = metrics
        self._engines: dict[str, PooledEngine] = {}
        self._starting: dict[str, asyncio.Task[PooledEngine]] = {}
        self._start_lock = asyncio.Lock()
        self._pinned: set[str] = set()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    @staticmethod
    def key(folder: str | Path) -> str:
        return str(Path(folder).expanduser().resolve())

    def is_main(self, folder: str | Path) -> bool:
        return self.key(folder) == str(self.main.model_path)

    def ready(self, folder: str | Path) -> bool:
        """Whether ``folder`` can be served now without starting an engine."""
        if self.is_main(folder):
            return self.main.ready
        p = self._engines.get(self.key(folder))
        return p is not None and p.engine.ready

    def pin(self, folders: set[str]) -> None:
        """The folders never evicted (production and canary); replaces the previous set."""
        self._pinned = {self.key(f) for f in folders}

    def engines(self) -> list[PooledEngine]:
        return list(self._engines.values())

    def states(self) -> dict[str, str]:
        """Version name -> ``ready`` (running) or ``starting``, for every extra engine."""
        out = {p.name: "ready" if p.engine.ready else "stopped" for p in self._engines.values()}
        for task in self._starting.values():
            name = getattr(task, "tuneloop_name", None)
            if name and name not in out:
                out[name] = "starting"
        return out

    def prestart(self, folder: str, name: str) -> None:
        """Start ``folder``'s engine in the background if it is neither running nor starting."""
        k = self.key(folder)
        if self.enabled and not self.is_main(k) and k not in self._engines and k not in self._starting:
            self._start_task(k, name).add_done_callback(_log_failure)

    @contextlib.asynccontextmanager
    async def use(self, folder: str, name: str) -> AsyncIterator[Engine]:
        """The engine serving ``folder`` (started on first use) for the duration of one request."""
        if self.is_main(folder):
            yield self.main
            return
        k = self.key(folder)
        p = self._engines.get(k)
        if p is None or not p.engine.ready:
            p = await self._get(k, name)
        p.in_flight += 1
        p.last_used = time.monotonic()
        try:
            yield p.engine
        finally:
            p.in_flight -= 1
            p.last_used = time.monotonic()

    async def _get(self, k: str, name: str) -> PooledEngine:
        if not self.enabled:
            raise APIError(
                400,
                f"model version {name!r} is another classifier folder and server.classifier_engines is 0 on this "
                f"server: start a server on it (tuneloop serve --model {name})",
                "model_not_servable",
                "model",
            )
        task = self._starting.get(k) or self._start_task(k, name)
        try:
            return await asyncio.shield(task)
        except APIError:
            raise
        except Exception as e:
            raise APIError(
                503, f"the engine for {name!r} could not start: {type(e).__name__}: {e}", "engine_unavailable"
            ) from e

    def _start_task(self, k: str, name: str) -> asyncio.Task[PooledEngine]:
        task = self._starting[k] = asyncio.ensure_future(self._start(k, name))
        task.tuneloop_name = name  # type: ignore[attr-defined]  # what states() shows while it starts
        task.add_done_callback(lambda _: self._starting.pop(k, None))
        return task

    async def _start(self, k: str, name: str) -> PooledEngine:
        from tuneloop.server.engine import Engine

        async with self._start_lock:  # one start at a time (see module doc)
            old = self._engines.get(k)
            if old is not None and old.engine.ready:
                return old
            if old is not None:  # died: replace it
                self._engines.pop(k, None)
                await asyncio.to_thread(old.engine.shutdown)
            await self._make_room()
            log.info("starting an extra engine for %s (%s)", name, k)
            engine = Engine(k, self.settings, served_name=name)
            try:
                await engine.start()
            except BaseException:
                engine.shutdown()
                raise
            p = self._engines[k] = PooledEngine(name, k, engine, time.monotonic())
            if self.metrics is not None:
                self.metrics.set_model_info(name, k, "merged")
            return p

    async def _make_room(self) -> None:
        while len(self._engines) >= self.capacity:
            idle = [p for p in self._engines.values() if p.folder not in self._pinned and p.in_flight == 0]
            if not idle:
                raise APIError(
                    503,
                    f"all {self.capacity} extra classifier engines of this server serve production, a canary or "
                    "requests in flight; retry shortly (or raise server.classifier_engines)",
                    "engine_pool_full",
                    headers={"Retry-After": "5"},
                )
            victim = min(idle, key=lambda p: p.last_used)
            log.info("stopping the extra engine of %s (least recently used) to make room", victim.name)
            self._engines.pop(victim.folder, None)
            if self.metrics is not None:
                self.metrics.clear_model_info(victim.name)
            await asyncio.to_thread(victim.engine.shutdown)

    def shutdown(self) -> None:
        for t in self._starting.values():
            t.cancel()
        for p in self._engines.values():
            p.engine.shutdown()
        self._engines.clear()


def _log_failure(task: asyncio.Task[PooledEngine]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("an extra engine failed to start: %s", task.exception())
