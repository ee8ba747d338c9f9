"""The Litestar application: OpenAI API + admin API + health + metrics over one in-process vLLM engine.

Contract
--------
:func:`create_app(settings, db, engine=None) <create_app>` returns a Litestar
app whose ``app.state`` holds ``settings``, ``db``, ``registry`` (a fresh
prometheus ``CollectorRegistry``), ``metrics``
(:class:`tuneloop.monitoring.metrics.ServingMetrics`), ``log_writer``
(:class:`tuneloop.monitoring.requestlog.RequestLogWriter`), ``engine``
(:class:`tuneloop.server.engine.Engine`), ``auth``
(:class:`tuneloop.server.auth.Auth`), ``router``
(:class:`tuneloop.server.routing.ModelRouter`) and ``serving``
(:class:`tuneloop.server.serving.OpenAIServing`). Route handlers reach every
component through ``app.state``; nothing is module-global, so two apps can
live in one process.

The lifespan starts the engine (unless the one passed in is already
running; an exception that fails the start-up is kept in
``app.state.startup_error`` for the caller to report), starts the log writer, reads deploy state and loads the start-up
adapters, then refreshes deploy state every ``server.state_refresh_s``. On
shutdown (uvicorn's SIGTERM handling: in-flight requests finish first) it
stops the refresher, shuts the engine down and drains the log writer
(``close()``), so every answered request is in the database.

Routes: ``/v1/*`` (:mod:`tuneloop.server.api_router`, inference scope, with
``/v1/classify`` from :mod:`tuneloop.server.classify_routes`, plus
``/v1/feedback`` from :mod:`tuneloop.server.feedback_routes`), ``/admin/*``
(:mod:`tuneloop.server.admin_routes`, admin scope), ``GET /healthz`` (process
alive), ``GET /readyz`` (engine ready: 200, else 503), ``GET /metrics``
(Prometheus text of ``app.state.registry``), ``/schema`` (OpenAPI: the routes'
declarations, with msgspec's own JSON Schema of the typed structs, see
:func:`document_api`). Bodies over ``server.max_body_bytes`` are a 413; a body
is checked strictly against its struct before Litestar's lenient conversion
(no ``"5"`` for an integer, no ``0`` for a boolean).
Every error is answered by one set of exception handlers
(:func:`tuneloop.server.errors.exception_handlers`); a refused inference
request is also logged (:func:`tuneloop.server.request_context.record_failure`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Litestar, Request, Response, Router, get
from litestar.exceptions import ValidationException
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Discriminator, OpenAPIFormat, OpenAPIType, Reference, Schema
from litestar.types import ASGIApp, Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from tuneloop import __version__
from tuneloop.db import Database, utcnow
from tuneloop.errors import UserError
from tuneloop.modelcache import DEFAULT_BASE
from tuneloop.monitoring.metrics import ServingMetrics
from tuneloop.monitoring.requestlog import RequestLogWriter
from tuneloop.registry import RegistryError, get_version, version_by_stage
from tuneloop.server.admin_routes import AdminController
from tuneloop.server.api_router import OpenAIController, TokenizerController
from tuneloop.server.auth import Auth, admin_guard, inference_guard
from tuneloop.server.background import start_background, stop_background
from tuneloop.server.classify_routes import ClassifyController
from tuneloop.server.console import attach, console_router, template_config
from tuneloop.server.engine import Engine
from tuneloop.server.engine_pool import EnginePool
from tuneloop.server.errors import exception_handlers
from tuneloop.server.feedback_routes import FeedbackController
from tuneloop.server.protocol import Health
from tuneloop.server.request_context import record_failure
from tuneloop.server.responses_routes import ResponsesController
from tuneloop.server.routing import ModelRouter
from tuneloop.server.serving import OpenAIServing

if TYPE_CHECKING:  # pragma: no cover
    from tuneloop.settings import Settings

log = logging.getLogger(__name__)


# -- what to serve ------------------------------------------------------------------


@dataclass
class ServePlan:
    """The base model folder, its served name, and the adapters to load at start-up (name -> version or path)."""

    base: Path
    served_name: str
    adapters: dict[str, str] = field(default_factory=dict)


def _base_folder(ref: str, models_dir: Path, what: str = "model") -> Path:
    """The checked folder of a model reference: :func:`tuneloop.modelcache.resolve_model` (folder, known base,
    hub id from the model cache; pulled when missing, a hub id only when HF_HUB_OFFLINE is not set)."""
    from tuneloop.modelcache import resolve_model

    return resolve_model(ref, models_dir, what=what, versions=True)


def plan_serving(settings: Settings, db: Database) -> ServePlan:
    """Decide what to serve from ``server.model`` / ``server.adapters`` and deploy state (see `tuneloop serve --help`)."""
    s = settings.server
    models_dir = settings.paths.models_path
    adapters: dict[str, str] = {}
    ref = s.model
    version = None
    if ref:
        try:
            version = get_version(db, ref)
        except RegistryError:
            version = None
    else:
        version = version_by_stage(db, "production")
    if version is not None:
        if version.kind == "adapter":
            base = _base_folder(version.base_model, models_dir, f"base model of version {version.name!r}")
            adapters[version.name] = version.name
        else:
            base = _base_folder(version.path, models_dir, f"model folder of version {version.name!r}")
    else:
        base = _base_folder(ref or DEFAULT_BASE, models_dir)
    for item in s.adapters:
        name, sep, target = item.partition("=")
        if not sep:
            name, target = item, item  # a registered version name
        name, target = name.strip(), target.strip()
        if not name or not target:
            raise UserError(f"--adapter {item!r}: use NAME=PATH or a registered version name")
        adapters[name] = target
    served = s.served_model_name or (version.name if version is not None and version.kind != "adapter" else base.name)
    return ServePlan(base=base, served_name=served, adapters=adapters)


def check_plan(plan: ServePlan, settings: Settings, db: Database) -> None:
    """Refuse, before the engine starts, start-up adapters that cannot load (UserError with the reason)."""
    probe = Engine(plan.base, settings.engine, plan.served_name)
    for name, target in plan.adapters.items():
        p = Path(target).expanduser()
        try:
            if p.is_dir():
                probe.validate_adapter(p)
                continue
            try:
                v = get_version(db, target)
            except RegistryError:
                raise UserError(f"{target!r} is neither an adapter folder nor a registered version") from None
            if v.kind != "adapter":
                raise UserError(
                    f"version {v.name!r} is a {v.kind} model, not an adapter; serve it with --model {v.name}"
                )
            probe.validate_adapter(v.path)
        except UserError as e:
            raise UserError(f"--adapter {name}: {e}") from None


def check_port(host: str, port: int) -> None:
    """UserError if ``host:port`` cannot be bound (before spending a minute starting the engine)."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e} (pick another --port)") from None


# -- plain endpoints ---------------------------------------------------------------


@get("/healthz", summary="Liveness: the process answers", tags=["ops"])
async def healthz() -> Health:
    return Health("ok")


@get(
    "/readyz",
    summary="Readiness: the engine is loaded and healthy (503 otherwise)",
    tags=["ops"],
    responses={503: ResponseSpec(Health, description="the engine is starting, stopping or unhealthy (`detail`)")},
)
async def readyz(request: Request) -> Response[Health]:
    engine: Engine = request.app.state.engine
    try:
        if request.app.state.draining:
            raise RuntimeError("draining: shutting down, finishing requests in flight")
        if not engine.ready:
            raise RuntimeError("engine starting" if not engine.closing else "shutting down")
        await engine.check_health()
    except Exception as e:
        return Response(Health("unavailable", str(e) or type(e).__name__), status_code=503)
    return Response(Health("ready"))


@get("/metrics", summary="Prometheus metrics (text exposition format)", tags=["ops"], media_type=CONTENT_TYPE_LATEST)
async def metrics(request: Request) -> Response[bytes]:
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def _strict_bodies() -> Callable[[Request], Awaitable[None]]:
    """A ``before_request`` hook: the JSON body of a route whose ``data`` is a msgspec struct is first checked
    strictly (msgspec ``strict=True``), numbers read as JSON Schema reads them (``2.0`` is the integer 2).
    Litestar converts bodies leniently (``"5"`` for an integer, ``0`` or ``"true"`` for a boolean), which neither
    OpenAI's API nor the OpenAPI document allows; a violation is Litestar's ValidationException in Litestar's own
    format, answered like any other (400 naming the field). A body that is not JSON is left to Litestar."""

    async def check(request: Request) -> None:
        data = request.route_handler.parsed_fn_signature.parameters.get("data")
        tp = data.annotation if data is not None else None
        if not (isinstance(tp, type) and issubclass(tp, msgspec.Struct)):
            return
        try:
            msgspec.convert(_integral_floats_as_ints(msgspec.json.decode(await request.body())), tp, strict=True)
        except msgspec.ValidationError as e:
            message, _, where = str(e).partition(" - at `$.")
            item = {"message": message, "key": where.removesuffix("`") or "data", "source": "body"}
            raise ValidationException(
                f"Validation failed for {request.method} {request.url.path}", extra=[item]
            ) from None
        except msgspec.DecodeError:
            return

    return check


def _integral_floats_as_ints(value: Any) -> Any:
    """``value`` (decoded JSON) with every float that has no fractional part as an int, at any depth."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral_floats_as_ints(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral_floats_as_ints(v) for k, v in value.items()}
    return value


def _timing_middleware(app: ASGIApp) -> ASGIApp:
    """Stamp every HTTP request with its receipt time (the origin of ttft_s and latency_s)."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            st = scope.setdefault("state", {})
            st["tuneloop_t0"] = time.perf_counter()
            st["tuneloop_received_at"] = utcnow()
        await app(scope, receive, send)

    return middleware


# -- the OpenAPI document -------------------------------------------------------------


def document_api(app: Litestar) -> None:
    """Make ``app``'s OpenAPI document (``/schema/openapi.json``) describe the bodies exactly as they are validated.

    Litestar derives its own schemas from the msgspec structs and loses part of what msgspec enforces: a bound
    of 0 (``Meta(gt=0)``, ``ge=0`` vanish), ``forbid_unknown_fields`` (no ``additionalProperties: false``), the
    ``type`` tag of tagged unions. So the document's component schemas are replaced by msgspec's own JSON Schema
    of the same structs (msgspec is what decodes and validates the bodies), each merged with the struct's
    ``json_schema_extra`` class attribute, if any: the rules the server checks after decoding (exactly one of
    ``version`` and ``path``, a tool message needs ``tool_call_id``, ...). In it, ``properties`` replace msgspec's
    schema of those fields, ``required`` adds to the struct's, any other key is set. Runs once, when the app is
    created; every ``$ref`` of the document must name one of these schemas (else ValueError)."""
    doc = app.openapi_schema  # built now, and cached: /schema serves this object
    structs = _api_structs(app)
    components = _struct_schemas(structs)
    assert doc.components is not None  # Litestar always sets it
    doc.components.schemas = {name: _spec_schema(schema) for name, schema in components.items()}
    missing = sorted(
        {ref for ref in _refs(doc.to_schema()) if ref.removeprefix("#/components/schemas/") not in components}
    )
    if missing:
        raise ValueError(f"the OpenAPI document refers to schemas msgspec did not generate: {', '.join(missing)}")


def _api_structs(app: Litestar) -> set[type[msgspec.Struct]]:
    """The msgspec structs of the routes' bodies: request (``data``), return annotation, ``responses=`` and the
    ``event_payloads`` of a streaming route's operation class (:func:`tuneloop.server.api_router.streaming_operation`)."""
    found: set[type[msgspec.Struct]] = set()

    def collect(tp: Any) -> None:
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            found.add(tp)
        for arg in typing.get_args(tp):
            collect(arg)

    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            sig = handler.parsed_fn_signature
            if (data := sig.parameters.get("data")) is not None:
                collect(data.annotation)
            collect(sig.return_type.annotation)
            for spec in (getattr(handler, "responses", None) or {}).values():
                collect(spec.data_container)
            for payload in getattr(handler.operation_class, "event_payloads", ()):  # streamed events' data
                collect(payload)
    return found


def _struct_schemas(structs: set[type[msgspec.Struct]]) -> dict[str, dict[str, Any]]:
    """msgspec's component schemas of ``structs`` (and the structs they hold), with their ``json_schema_extra``."""
    ordered = sorted(structs, key=lambda c: (c.__module__, c.__qualname__))
    _, components = msgspec.json.schema_components(ordered, ref_template="#/components/schemas/{name}")
    every = set(_nested_structs(ordered))
    for cls in every:
        extra: dict[str, Any] | None = getattr(cls, "json_schema_extra", None)
        if not extra:
            continue
        same_name = sum(c.__name__ == cls.__name__ for c in every) > 1
        schema = components[f"{cls.__module__}.{cls.__qualname__}" if same_name else cls.__name__]
        for key, value in extra.items():
            if key == "properties":
                schema["properties"] = {**schema.get("properties", {}), **value}
            elif key == "required":
                schema["required"] = sorted({*schema.get("required", []), *value})
            else:
                schema[key] = value
    return components


def _nested_structs(roots: list[type[msgspec.Struct]]) -> Iterator[type[msgspec.Struct]]:
    """``roots`` and every struct their fields hold (at any depth)."""
    seen: set[type] = set()
    todo: list[Any] = list(roots)
    while todo:
        tp = todo.pop()
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            if tp in seen:
                continue
            seen.add(tp)
            yield tp
            todo.extend(f.type for f in msgspec.structs.fields(tp))
        todo.extend(typing.get_args(tp))


#: JSON Schema keys whose value is a schema / a list of schemas / a map of schemas
_ONE_SCHEMA = {"items", "not", "if", "then", "else", "contains", "propertyNames", "additionalProperties"}
_SCHEMA_LIST = {"allOf", "anyOf", "oneOf", "prefixItems"}
_SCHEMA_MAP = {"properties", "patternProperties", "dependentSchemas"}
_SCHEMA_FIELDS = {
    f.metadata.get("alias") or f.name.split("_")[0] + "".join(w.title() for w in f.name.split("_")[1:]): f.name
    for f in dataclasses.fields(Schema)
}


def _spec_schema(d: Any) -> Any:
    """A JSON Schema (dict) as Litestar's OpenAPI spec objects (:class:`Schema`, :class:`Reference`)."""
    if not isinstance(d, dict):  # a boolean schema (`additionalProperties: false`)
        return d
    if "$ref" in d and set(d) <= {"$ref", "description"}:
        return Reference(ref=d["$ref"], description=d.get("description"))
    kw: dict[str, Any] = {}
    for key, value in d.items():
        if key == "$ref":  # next to other keywords: keep them, and the reference as an allOf
            kw["all_of"] = [Reference(ref=value), *kw.get("all_of", [])]
        elif key == "type":
            kw["type"] = [OpenAPIType(t) for t in value] if isinstance(value, list) else OpenAPIType(value)
        elif key == "format":
            kw["format"] = OpenAPIFormat(value)
        elif key == "discriminator":
            kw["discriminator"] = Discriminator(property_name=value["propertyName"], mapping=value.get("mapping"))
        elif key in _ONE_SCHEMA:
            kw[_SCHEMA_FIELDS[key]] = _spec_schema(value)
        elif key in _SCHEMA_LIST:
            kw[_SCHEMA_FIELDS[key]] = [*kw.get(_SCHEMA_FIELDS[key], []), *map(_spec_schema, value)]
        elif key in _SCHEMA_MAP:
            kw[_SCHEMA_FIELDS[key]] = {k: _spec_schema(v) for k, v in value.items()}
        elif key in _SCHEMA_FIELDS:
            kw[_SCHEMA_FIELDS[key]] = value
        else:
            raise ValueError(f"JSON Schema keyword {key!r} has no OpenAPI spec field")
    return Schema(**kw)


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


# -- the app -------------------------------------------------------------------------


def create_app(
    settings: Settings, db: Database, engine: Engine | None = None, plan: ServePlan | None = None
) -> Litestar:
    """Build the app (see module docstring). ``engine`` defaults to one over ``plan`` (default: :func:`plan_serving`)."""
    if engine is None:
        plan = plan or plan_serving(settings, db)
        engine = Engine(plan.base, settings.engine, plan.served_name)
    startup_adapters = dict(plan.adapters) if plan else {}
    registry = CollectorRegistry(auto_describe=True)
    serving_metrics = ServingMetrics(registry)
    writer = RequestLogWriter(db, settings.log, serving_metrics, replica=settings.server.replica_name)
    auth = Auth(db, settings.auth, refresh_s=settings.server.state_refresh_s)
    pool = EnginePool(engine, settings.engine, settings.server.classifier_engines, serving_metrics)
    router = ModelRouter(db, engine, settings.server.state_refresh_s, serving_metrics, pool=pool)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        owns_engine = not engine.ready
        if owns_engine:
            try:
                await engine.start()
            except Exception as e:  # vLLM refused the settings or the model: `tuneloop serve` reports it
                app.state.startup_error = e
                engine.shutdown()
                raise
        serving_metrics.set_model_info(engine.served_name, str(engine.model_path), "base")
        writer.start()
        refresher = None
        background = None
        try:
            await router.refresh()
            try:
                for name, target in startup_adapters.items():
                    await _load_startup_adapter(router, name, target)
            except Exception as e:
                app.state.startup_error = e
                raise
            refresher = asyncio.create_task(router.run(), name="tuneloop-deploy-state")
            background = start_background(settings, db, registry, router)
            log.info("serving %s as %r", engine.model_path, engine.served_name)
            yield
        finally:
            if background is not None:
                await stop_background(*background)
            if refresher is not None:
                refresher.cancel()
                await asyncio.gather(refresher, return_exceptions=True)
            pool.shutdown()  # the extra classifier engines
            if owns_engine:
                engine.shutdown()
            left = await asyncio.to_thread(writer.close, 30.0)
            log.info("request log drained (%d rows left unwritten)", left)
            await asyncio.to_thread(db.close)  # pooled PostgreSQL connections and the change listener

    app = Litestar(
        route_handlers=[
            Router(
                "/",
                route_handlers=[OpenAIController, TokenizerController, ResponsesController, ClassifyController],
                guards=[inference_guard],
            ),
            Router("/", route_handlers=[AdminController], guards=[admin_guard]),
            healthz,
            readyz,
            metrics,
            FeedbackController,
            *([console_router(settings, db)] if settings.ui.enabled else []),
        ],
        template_config=template_config(settings),
        lifespan=[lifespan],
        exception_handlers=exception_handlers(on_error=record_failure),
        middleware=[_timing_middleware],
        before_request=_strict_bodies(),
        request_max_body_size=settings.server.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="tuneloop",
            version=__version__,
            path="/schema",
            render_plugins=[SwaggerRenderPlugin()],
            description="OpenAI-compatible API over a vLLM engine, with per-request adapter routing, request logging "
            'and an admin API. Errors are OpenAI-style: {"error": {"message", "type", "code", "param"}}.',
        ),
        debug=False,
    )
    document_api(app)
    st = app.state
    st.startup_error = None  # what failed the start-up (set by the lifespan; `tuneloop serve` reports it)
    st.draining = False  # set on SIGTERM by `tuneloop serve` (server.drain_s): /readyz answers 503, serving goes on
    st.settings, st.db, st.registry, st.metrics = settings, db, registry, serving_metrics
    st.log_writer, st.engine, st.auth, st.router = writer, engine, auth, router
    st.serving = OpenAIServing(engine, router, settings.server.tool_parser)
    attach(app, settings)
    return app


async def _load_startup_adapter(router: ModelRouter, name: str, target: str) -> None:
    p = Path(target).expanduser()
    if p.is_dir():
        await router.load(path=str(p), name=name)
    else:
        await router.load(version=target)
