"""Admin API (admin scope): adapters in the engine, deploy state as the server sees it, the request log.

Contract
--------
* ``GET /admin/adapters``: what the engine holds (name, path, rank, requests in flight).
* ``POST /admin/adapters`` ``{"version": NAME}`` or ``{"path": DIR, "name": NAME}``:
  validate (``adapter_config.json``: LoRA, rank <= ``engine.max_lora_rank``,
  trained on this base) and test-load into the engine; 201 with the adapter,
  200 if it was already loaded, a 4xx with an OpenAI-style body otherwise
  (never a silent 200). A ``path`` must lie, once symlinks and ``..`` are
  resolved, inside one of ``server.adapter_roots`` (:func:`adapter_roots`;
  default ``<home>/runs`` and ``<home>/models``), else 403
  ``adapter_path_not_allowed`` (``param`` ``path``) naming the setting, before
  anything else is read from it; the resolved path is what gets loaded. A
  ``version`` loads from its registry path whatever the roots, and so do the
  ``--adapter`` folders of ``tuneloop serve`` (operator configuration, not a
  request). Other refusals are the router's
  :class:`tuneloop.server.errors.APIError` (``RoutingError``) or the engine's
  adapter errors, answered by the app's exception handlers. Requests in flight are unaffected.
* ``DELETE /admin/adapters/{name}``: new requests stop using it at once;
  requests already running on it finish, then it is evicted (200 with what
  was removed). A version in production or canary is refused (409).
* ``GET /admin/state`` / ``POST /admin/state/refresh``: deploy state (aliases,
  canary split) as last read from the database / re-read now; on a classifier
  server also its extra engines (``engines``: version -> ``ready`` / ``starting``).
* ``GET /admin/log`` / ``POST /admin/log/flush``: request-log writer counters /
  write every queued row now.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

from litestar import Controller, HttpMethod, Request, Response, delete, get, post, route
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, JSONBody

from tuneloop.server.engine import AdapterInfo
from tuneloop.server.errors import APIError, error_responses
from tuneloop.server.protocol import AdapterList, AdapterOut, LoadAdapterRequest, RoutingStateOut
from tuneloop.server.routing import ModelRouter

if TYPE_CHECKING:  # pragma: no cover
    from tuneloop.settings import Settings


def adapter_roots(settings: Settings) -> list[Path]:
    """``server.adapter_roots`` as resolved folders (relative entries are under ``paths.home``; symlinks resolved)."""
    home = settings.paths.home_path
    roots = []
    for r in settings.server.adapter_roots:
        p = Path(r).expanduser()
        roots.append((p if p.is_absolute() else home / p).resolve())
    return roots


def confine_adapter_path(path: str, roots: list[Path]) -> Path:
    """``path`` resolved (symlinks, ``..``, ``~``) if it lies inside one of ``roots``, else :class:`APIError` 403
    ``adapter_path_not_allowed``. Relative paths are taken from the server's working directory, as the engine does."""
    try:
        resolved: Path | None = Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):  # an unknown ~user, a symlink loop, a NUL byte
        resolved = None
    if resolved is not None and any(resolved.is_relative_to(root) for root in roots):
        return resolved
    where = ", ".join(str(r) for r in roots) or "none configured"
    shown = f"{path!r} (resolved: {resolved})" if resolved is not None and str(resolved) != path else repr(path)
    raise APIError(
        403,
        f"adapter path {shown} is outside the folders the admin API may load from "
        f"(server.adapter_roots: {where}). Move it under one of those folders, or add its folder to "
        "server.adapter_roots (TUNELOOP_SERVER__ADAPTER_ROOTS) and restart the server; a registered version loads "
        "with {'version': NAME} wherever it is.",
        "adapter_path_not_allowed",
        "path",
    )


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
        engines=router.pool.states() if router.pool is not None else {},
    )


#: what every admin route may answer besides its success (the admin guard: 401 / 403; a busy database: 503)
_ADMIN_ERRORS = (401, 403, 503)


class AdminController(Controller):
    """Runtime control of the serving engine (admin scope)."""

    path = "/admin"
    tags = ["admin"]

    # Litestar answers OPTIONS itself with the methods of a path's route, but when a controller registers two
    # methods of one path, its answer stays that of the first (Allow: GET, OPTIONS here, without POST). So this
    # path answers OPTIONS itself; defined before the others, it is registered first (no automatic one is made).
    @route("/adapters", http_method=HttpMethod.OPTIONS, include_in_schema=False, status_code=204)
    async def adapters_options(self) -> Response[None]:
        return Response(None, status_code=204, headers={"Allow": "GET, OPTIONS, POST"})

    @get("/adapters", summary="List adapters loaded in the engine", responses=error_responses(*_ADMIN_ERRORS))
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

    @post(
        "/adapters",
        summary="Load an adapter (registered version or folder) into the engine",
        description='`{"version": NAME}` loads a registered adapter version (under its own name); '
        '`{"path": DIR, "name": NAME}` loads a PEFT folder, which must lie inside `server.adapter_roots`. '
        "201 with the adapter when it was loaded now, 200 when it was already loaded.",
        status_code=201,
        responses={
            200: ResponseSpec(AdapterOut, description="the adapter was already loaded", generate_examples=False),
            **error_responses(
                400,
                *_ADMIN_ERRORS,
                404,
                409,
                413,
                notes={
                    400: "invalid request: bad JSON or types, neither or both of `version` and `path`, a `name` "
                    "other than the version's own with a `version`, a folder that is not a LoRA adapter of this "
                    "base model or a name already loaded from another folder (`invalid_adapter`)",
                    403: "an `inference` key (`insufficient_scope`), an anonymous non-loopback client "
                    "(`admin_loopback_only`), or a `path` outside server.adapter_roots "
                    "(`adapter_path_not_allowed`, `param` `path`)",
                    404: "no registered version by that name (`model_not_found`)",
                    409: "the `name` is the base model's, an alias or a registered version's (`name_conflict`)",
                },
            ),
        },
    )
    async def load_adapter(self, request: Request, data: JSONBody[LoadAdapterRequest]) -> Response[AdapterOut]:
        router = request.app.state.router
        path = data.path
        load_name = data.name
        if path and not data.version:  # both given: the router refuses the request (400)
            roots = adapter_roots(request.app.state.settings)
            resolved = await asyncio.to_thread(confine_adapter_path, path, roots)
            load_name = load_name or Path(path).expanduser().name  # the name the caller's path implies
            path = str(resolved)
        name = data.version or load_name
        existed = bool(name) and request.app.state.engine.has_adapter(name)
        info, _ = await router.load(version=data.version, path=path, name=load_name)
        return Response(_out(router, info), status_code=200 if existed else 201)

    @delete(
        "/adapters/{name:str}",
        summary="Unload an adapter after its running requests finish",
        status_code=200,
        responses=error_responses(
            400,
            *_ADMIN_ERRORS,
            404,
            409,
            notes={
                404: "no adapter by that name is loaded (`adapter_not_found`)",
                409: "the adapter serves the production or canary stage (`adapter_in_use`)",
            },
        ),
    )
    async def unload_adapter(self, request: Request, name: FromPath[str]) -> AdapterOut:
        router = request.app.state.router
        version = router.version_of(name)
        info = await router.unload(name)
        out = _out(router, info)
        out.version = version
        return out

    @get(
        "/state",
        summary="Deploy state (aliases, canary) as this server uses it",
        responses=error_responses(*_ADMIN_ERRORS),
    )
    async def state(self, request: Request) -> RoutingStateOut:
        return _state(request)

    @post(
        "/state/refresh",
        summary="Re-read deploy state from the database now",
        status_code=200,
        responses=error_responses(*_ADMIN_ERRORS),
    )
    async def refresh(self, request: Request) -> RoutingStateOut:
        await request.app.state.router.refresh(force=True)
        return _state(request)

    @get("/log", summary="Request-log writer counters", responses=error_responses(*_ADMIN_ERRORS))
    async def log_stats(self, request: Request) -> dict[str, Any]:
        return request.app.state.log_writer.stats()

    @post(
        "/log/flush",
        summary="Write every queued request-log row now",
        status_code=200,
        responses=error_responses(*_ADMIN_ERRORS),
    )
    async def log_flush(self, request: Request) -> dict[str, Any]:
        writer = request.app.state.log_writer
        written = await asyncio.to_thread(writer.flush)
        return {"written": written, **writer.stats()}
