"""Admin API (admin scope): adapters in the engine, deploy state as the server sees it, the request log.

Contract
--------
* ``GET /admin/adapters``: what the engine holds (name, path, rank, requests in flight).
* ``POST /admin/adapters`` ``{"version": NAME}`` or ``{"path": DIR, "name": NAME}``:
  validate (``adapter_config.json``: LoRA, rank <= ``engine.max_lora_rank``,
  trained on this base) and test-load into the engine; 201 with the adapter,
  200 if it was already loaded, a 4xx with an OpenAI-style body otherwise
  (never a silent 200). Refusals are the router's
  :class:`tuneloop.server.errors.APIError` (``RoutingError``) or the engine's
  adapter errors, answered by the app's exception handlers. Requests in flight are unaffected.
* ``DELETE /admin/adapters/{name}``: new requests stop using it at once;
  requests already running on it finish, then it is evicted (200 with what
  was removed). A version in production or canary is refused (409).
* ``GET /admin/state`` / ``POST /admin/state/refresh``: deploy state (aliases,
  canary split) as last read from the database / re-read now.
* ``GET /admin/log`` / ``POST /admin/log/flush``: request-log writer counters /
  write every queued row now.
"""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Controller, Request, Response, delete, get, post

from tuneloop.server.engine import AdapterInfo
from tuneloop.server.protocol import AdapterList, AdapterOut, LoadAdapterRequest, RoutingStateOut
from tuneloop.server.routing import ModelRouter


def _out(router: ModelRouter, a: AdapterInfo) -> AdapterOut:
    return AdapterOut(
        name=a.name,
        path=a.path,
        rank=a.rank,
        in_flight=a.in_flight,
        loaded_at=a.loaded_at,
        version=router.version_of(a.name),
    )


def _state(request: Request) -> RoutingStateOut:
    router = request.app.state.router
    st = router.state
    eng = request.app.state.engine
    return RoutingStateOut(
        served_name=eng.served_name,
        base_model=str(eng.model_path),
        production=st.production.name if st.production else None,
        canary=st.canary.name if st.canary else None,
        canary_share=st.canary_share,
        canary_production=st.canary_production,
        refreshed_at=st.refreshed_at,
        adapters=[a.name for a in eng.adapters()],
    )


class AdminController(Controller):
    """Runtime control of the serving engine (admin scope)."""

    path = "/admin"
    tags = ["admin"]

    @get("/adapters", summary="List adapters loaded in the engine")
    async def list_adapters(self, request: Request) -> AdapterList:
        eng = request.app.state.engine
        router = request.app.state.router
        return AdapterList(
            base_model=str(eng.model_path),
            served_name=eng.served_name,
            adapters=[_out(router, a) for a in eng.adapters()],
            max_loras=eng.settings.max_loras,
            max_lora_rank=eng.settings.max_lora_rank,
        )

    @post("/adapters", summary="Load an adapter (registered version or folder) into the engine", status_code=201)
    async def load_adapter(self, request: Request, data: LoadAdapterRequest) -> Response[AdapterOut]:
        router = request.app.state.router
        name = data.version or data.name
        existed = bool(name) and request.app.state.engine.has_adapter(name)
        info, _ = await router.load(version=data.version, path=data.path, name=data.name)
        return Response(_out(router, info), status_code=200 if existed else 201)

    @delete("/adapters/{name:str}", summary="Unload an adapter after its running requests finish", status_code=200)
    async def unload_adapter(self, request: Request, name: str) -> AdapterOut:
        router = request.app.state.router
        version = router.version_of(name)
        info = await router.unload(name)
        out = _out(router, info)
        out.version = version
        return out

    @get("/state", summary="Deploy state (aliases, canary) as this server uses it")
    async def state(self, request: Request) -> RoutingStateOut:
        return _state(request)

    @post("/state/refresh", summary="Re-read deploy state from the database now", status_code=200)
    async def refresh(self, request: Request) -> RoutingStateOut:
        await request.app.state.router.refresh()
        return _state(request)

    @get("/log", summary="Request-log writer counters")
    async def log_stats(self, request: Request) -> dict[str, Any]:
        return request.app.state.log_writer.stats()

    @post("/log/flush", summary="Write every queued request-log row now", status_code=200)
    async def log_flush(self, request: Request) -> dict[str, Any]:
        writer = request.app.state.log_writer
        written = await asyncio.to_thread(writer.flush)
        return {"written": written, **writer.stats()}
