"""Per-request model routing: the ``model`` field -> (served version, engine adapter, canary arm).

Contract
--------
:class:`ModelRouter` (one per app, ``app.state.router``) resolves a request's
``model`` with :meth:`ModelRouter.resolve`:

* the base model's served name -> the base, arm ``direct``;
* an adapter already loaded in the engine (by name) -> that adapter, ``direct``;
* a registered model version -> ``direct``: an adapter of this server's base
  is loaded into the engine on first use; a merged/base version is servable
  only when its folder is the base this engine runs (otherwise a 400 that
  says to start a server on it) — except on a classifier server, where another
  classifier version is served by its own extra engine of the server's
  :class:`tuneloop.server.engine_pool.EnginePool` (``Route.folder`` names it;
  :meth:`ModelRouter.engine_for` hands out the engine for a route);
* ``production`` -> the version of this server's task whose stage is
  ``production`` (the base model when none is). The task is the engine's:
  ``classification`` when it runs a classifier, else ``chat``; stages are held
  per task (:mod:`tuneloop.registry`), so a chat server never routes to a
  production classifier and the reverse. While a canary runs (``canaries`` row with status
  ``running``: candidate, production, share), a share ``share`` of
  ``production`` traffic goes to the candidate, arm ``canary``; the split is
  sticky per user / API key (hash of the canary id and that key; requests
  with neither are split at random); the rest is arm ``production``. A
  classifier canary whose extra engine is still starting gets no traffic
  until it is up (its share goes to production meanwhile): the refresh starts it
  as soon as the canary appears, so that is the first tens of seconds only;
* ``canary`` -> the version whose stage is ``canary``, arm ``canary``;
* anything else -> :class:`RoutingError` 404 ``model_not_found``.

Deploy state is re-read from the database every ``server.state_refresh_s``
seconds by :meth:`run` (the CLI, the loop and other replicas change stages and
canaries directly in the database, never through this server), and adapters of
aliased versions are loaded into the engine then, before any request needs them
(on a classifier server: the extra engines of the production and canary
classifiers are started then, and pinned so the pool never evicts them).
The read is :func:`tuneloop.store_deploy.read_deploy_state` (versions and the
running canary in one statement) behind :class:`tuneloop.db.CachedRead`: it
runs again only when :meth:`Database.data_version` moved — a ``stat`` of the
DuckDB file, or a ``NOTIFY`` from any writer on a shared PostgreSQL, so a
promotion made anywhere reaches every replica at its next refresh — or after
30 s. A busy or unreachable database keeps the last known state. Reads happen
in worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tuneloop.db import CachedRead, Database, DatabaseBusy
from tuneloop.registry import ModelVersion, find_version, unservable_reason
from tuneloop.server.engine import AdapterError, AdapterInfo, _same_model
from tuneloop.server.errors import APIError
from tuneloop.store_deploy import DeploySnapshot, read_deploy_state

if TYPE_CHECKING:  # pragma: no cover
    from tuneloop.monitoring.metrics import ServingMetrics
    from tuneloop.server.engine import Engine
    from tuneloop.server.engine_pool import EnginePool

log = logging.getLogger(__name__)

ALIASES = ("production", "canary")


class RoutingError(APIError):
    """The ``model`` of a request cannot be served: an :class:`APIError` whose code defaults to
    ``model_not_found`` and whose ``param`` is ``model``."""

    def __init__(self, status_code: int, message: str, code: str = "model_not_found", param: str | None = "model"):
        super().__init__(status_code, message, code, param)


@dataclass(frozen=True)
class Route:
    version: str  # the served model version (the base's served name for the base)
    adapter: str | None  # engine adapter name, None for the base
    arm: str  # production | canary | direct
    folder: str | None = None  # a classifier version served by an extra engine of the pool (see module doc)


@dataclass
class DeployState:
    production: ModelVersion | None = None
    canary: ModelVersion | None = None
    canary_id: str | None = None  # running canary row
    canary_candidate: str | None = None
    canary_production: str | None = None
    canary_share: float = 0.0
    refreshed_at: float | None = None


class ModelRouter:
    """Resolves ``model`` names per request and keeps aliased adapters loaded; see module docstring."""

    def __init__(
        self,
        db: Database,
        engine: Engine,
        refresh_s: float = 2.0,
        metrics: ServingMetrics | None = None,
        pool: EnginePool | None = None,
    ):
        # our own handle with a short lock timeout: a busy database must not stall routing
        self.db = db.with_options(lock_timeout_s=2.0)
        self.engine = engine
        self.pool = pool
        self.refresh_s = refresh_s
        self.metrics = metrics
        self.state = DeployState()
        self._versions: dict[str, ModelVersion] = {}
        self._missing: set[str] = set()
        self._adapter_version: dict[str, str] = {}  # engine adapter name -> version name (None for raw paths)
        self._loading: dict[str, asyncio.Task[AdapterInfo]] = {}
        # re-read only when the database changed (any writer, any replica)
        self._state_read = CachedRead(self.db, read_deploy_state)

    @property
    def task(self) -> str:
        """The task of the versions this server routes aliases to: its engine's (see module doc)."""
        return "classification" if getattr(self.engine, "is_classifier", False) else "chat"

    # -- deploy state ---------------------------------------------------------------
    async def refresh(self, force: bool = False) -> DeployState:
        """Re-read versions, stages and the running canary (when the database changed, or always with ``force``);
        load adapters of aliased versions."""
        try:
            snap: DeploySnapshot = await asyncio.to_thread(self._state_read.get, force)
            versions, canary = snap.versions, snap.canary_for(self.task)
        except DatabaseBusy as e:
            log.warning("deploy state not refreshed (database busy): %s", e)
            return self.state
        st = DeployState(refreshed_at=time.time())
        prod = [v for v in versions.values() if v.stage == "production" and v.task == self.task]
        can = [v for v in versions.values() if v.stage == "canary" and v.task == self.task]
        key = lambda v: v.stage_changed_at or v.created_at  # noqa: E731
        st.production = max(prod, key=key) if prod else None
        st.canary = max(can, key=key) if can else None
        if canary and canary.candidate in versions:
            st.canary_id, st.canary_candidate = canary.id, canary.candidate
            st.canary_production = canary.production or (st.production.name if st.production else None)
            st.canary_share = float(canary.share or 0.0)
        self._versions, self._missing = (
            dict(versions),
            set(),
        )  # a copy: version() adds to it, the cached read stays as read
        self.state = st
        if self.pool is not None:
            self.pool.pin(
                {
                    versions[n].path
                    for n in (st.production and st.production.name, st.canary and st.canary.name, st.canary_candidate)
                    if n and n in versions and self._pooled(versions[n])
                }
            )
        for name in {
            n
            for n in (
                st.production and st.production.name,
                st.canary and st.canary.name,
                st.canary_candidate,
                st.canary_production,
            )
            if n
        }:
            v = versions.get(name)
            if v is not None and self._pooled(v):
                self.pool.prestart(v.path, v.name)  # type: ignore[union-attr]  # _pooled checked it
            elif v is not None and v.kind == "adapter" and not self.engine.has_adapter(v.name):
                try:
                    await self.ensure_loaded(v)
                except (AdapterError, RoutingError) as e:
                    log.error("aliased version %s cannot be served: %s", name, getattr(e, "message", e))
        return st

    async def run(self) -> None:
        """Refresh forever, every ``refresh_s`` (cancel the task to stop)."""
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("deploy state refresh failed")

    # -- resolution ----------------------------------------------------------------
    async def version(self, name: str) -> ModelVersion | None:
        v = self._versions.get(name)
        if v is None and name not in self._missing:
            v = await asyncio.to_thread(find_version, self.db, name)
            if v is not None:
                self._versions[name] = v
            else:
                self._missing.add(name)
        return v

    async def resolve(self, model: str, sticky: str | None = None) -> Route:
        eng = self.engine
        if model == eng.served_name:
            return Route(eng.served_name, None, "direct")
        if model == "production":
            st = self.state
            if st.canary_candidate and st.canary_share > 0 and _bucket(st.canary_id or "", sticky) < st.canary_share:
                try:
                    route = await self._route_version(st.canary_candidate, "canary")
                    if route.folder is None or self.pool is None or self.pool.ready(route.folder):
                        return route
                    self.pool.prestart(route.folder, route.version)  # still starting: production serves meanwhile
                except (RoutingError, AdapterError) as e:
                    log.error(
                        "canary %s unavailable, sending to production: %s",
                        st.canary_candidate,
                        getattr(e, "message", e),
                    )
            target = st.canary_production if st.canary_candidate else (st.production.name if st.production else None)
            if target is None:
                return Route(eng.served_name, None, "production")
            return await self._route_version(target, "production")
        if model == "canary":
            name = self.state.canary.name if self.state.canary else self.state.canary_candidate
            if name is None:
                raise RoutingError(
                    404, "no model version is in the canary stage (start one with `tuneloop deploy canary`)"
                )
            return await self._route_version(name, "canary")
        if eng.has_adapter(model):
            return Route(self._adapter_version.get(model) or model, model, "direct")
        return await self._route_version(model, "direct")

    async def _route_version(self, name: str, arm: str) -> Route:
        v = await self.version(name)
        if v is None:
            raise RoutingError(
                404,
                f"the model {name!r} does not exist on this server: use one of "
                f"{', '.join(self.model_names()) or self.engine.served_name} (GET /v1/models)",
            )
        if v.kind == "adapter":
            await self.ensure_loaded(v)
            return Route(v.name, v.name, arm)
        if self._is_base(v.path):
            return Route(v.name, None, arm)
        if self._pooled(v):
            return Route(v.name, None, arm, folder=v.path)
        raise RoutingError(
            400,
            f"model version {v.name!r} is a {v.kind} model at {v.path}; this server serves "
            f"{self.engine.model_path}. Start a server on it: tuneloop serve --model {v.name}",
            "model_not_servable",
        )

    def _pooled(self, v: ModelVersion) -> bool:
        """Whether ``v`` is served by an extra engine of the pool: another classifier on a classifier server."""
        return (
            self.pool is not None
            and self.pool.enabled
            and self.task == "classification"
            and v.task == "classification"
            and v.kind != "adapter"
            and not self._is_base(v.path)
        )

    def engine_for(self, route: Route) -> AbstractAsyncContextManager[Engine]:
        """The engine that serves ``route``, for one request: the main engine, or the pool's for its folder."""
        if route.folder is None or self.pool is None:
            return nullcontext(self.engine)
        return self.pool.use(route.folder, route.version)

    def _is_base(self, path: str) -> bool:
        p = Path(path).expanduser().resolve()
        return p == self.engine.model_path or _same_model(p, self.engine.model_path)

    async def ensure_loaded(self, v: ModelVersion) -> AdapterInfo:
        """Load adapter version ``v`` into the engine once (concurrent first uses share one load)."""
        if self.engine.has_adapter(v.name):
            return next(a for a in self.engine.adapters() if a.name == v.name)
        if v.kind != "adapter":
            raise RoutingError(
                400, f"model version {v.name!r} is a {v.kind} model, not an adapter", "model_not_servable"
            )
        if not self._is_base(v.base_model):
            raise RoutingError(
                400,
                f"adapter version {v.name!r} was trained on {v.base_model}; this server serves "
                f"{self.engine.model_path}. Start a server on that base: tuneloop serve --model {v.name}",
                "model_not_servable",
            )
        task = self._loading.get(v.name)
        if task is None:
            task = self._loading[v.name] = asyncio.ensure_future(self.engine.add_adapter(v.name, v.path))
            name = v.name

            def forget(_: asyncio.Task[AdapterInfo]) -> None:
                self._loading.pop(name, None)

            task.add_done_callback(forget)
        info = await asyncio.shield(task)
        self._adapter_version[v.name] = v.name
        if self.metrics is not None:
            self.metrics.set_model_info(v.name, v.base_model, "adapter")
        return info

    async def load(
        self, version: str | None = None, path: str | None = None, name: str | None = None
    ) -> tuple[AdapterInfo, str | None]:
        """Admin load: a registered adapter ``version``, or a folder ``path`` served as ``name``."""
        if bool(version) == bool(path):
            raise RoutingError(
                400,
                "give exactly one of 'version' (a registered adapter version) or 'path' (a PEFT adapter folder)",
                "invalid_request",
            )
        if version:
            v = await self.version(version)
            if v is None:
                raise RoutingError(404, f"unknown model version {version!r} (see `tuneloop models list`)")
            if name and name != v.name:
                raise RoutingError(
                    400, "a registered version is served under its own name; leave 'name' out", "invalid_request"
                )
            return await self.ensure_loaded(v), v.name
        assert path  # exactly one of version / path, checked above
        name = name or Path(path).expanduser().name
        if name in ALIASES or name == self.engine.served_name or (await self.version(name)) is not None:
            raise RoutingError(
                409,
                f"the name {name!r} is taken by the base model, an alias or a registered version; pick another 'name'",
                "name_conflict",
            )
        info = await self.engine.add_adapter(name, path)
        self._adapter_version.pop(name, None)
        if self.metrics is not None:
            self.metrics.set_model_info(name, str(self.engine.model_path), "adapter")
        return info, None

    async def unload(self, name: str) -> AdapterInfo:
        st = self.state
        pinned = {
            n
            for n in (
                st.production and st.production.name,
                st.canary and st.canary.name,
                st.canary_candidate,
                st.canary_production,
            )
            if n
        }
        if name in pinned:
            raise RoutingError(
                409, f"{name!r} is in production or canary; change its stage before unloading it", "adapter_in_use"
            )
        if not self.engine.has_adapter(name):
            raise RoutingError(404, f"adapter {name!r} is not loaded", "adapter_not_found")
        info = await self.engine.remove_adapter(name)
        self._adapter_version.pop(name, None)
        if self.metrics is not None:
            self.metrics.clear_model_info(name)
        return info

    def version_of(self, adapter: str) -> str | None:
        return self._adapter_version.get(adapter)

    def model_names(self) -> list[str]:
        """Names a client may send as ``model`` right now (base, aliases, loaded and servable adapters)."""
        names = [self.engine.served_name, "production"]  # production falls back to the base model
        if self.state.canary is not None or self.state.canary_candidate:
            names.append("canary")
        names += [a.name for a in self.engine.adapters()]
        for v in self._versions.values():
            if v.kind == "adapter" and v.stage != "retired" and v.name not in names:
                if unservable_reason(v.kind, v.path):  # e.g. prompt tuning: never advertise what every request fails
                    continue
                try:
                    if self._is_base(v.base_model):
                        names.append(v.name)
                except OSError:
                    pass
        return names


def _bucket(salt: str, sticky: str | None) -> float:
    """A number in [0, 1): stable for (salt, sticky), random when there is no sticky key."""
    if not sticky:
        return random.random()
    h = hashlib.blake2b(f"{salt}\0{sticky}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64
