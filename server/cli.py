"""CLI of the server area: ``tuneloop serve`` (and ``tuneloop keys`` from :mod:`tuneloop.server.cli_keys`).

Only light imports at module level (see tuneloop.cli); Litestar, uvicorn and vLLM load in the handler.
"""

from __future__ import annotations

import argparse
import logging
import threading
from typing import TYPE_CHECKING, Any

from tuneloop.server import cli_keys

if TYPE_CHECKING:  # pragma: no cover
    from tuneloop.cli import Context

SERVE_HELP = """\
Serve a model behind an OpenAI-compatible API (Litestar + in-process vLLM).

What is served (first match wins):
  --model NAME      a registered version (an adapter version serves its base with
                    the adapter loaded; a merged version serves its folder), a
                    model folder, a known base (smollm2-135m-instruct, converted
                    on first use) or a hub id org/name: from the model cache
                    (tuneloop models pull org/name), downloaded only when
                    HF_HUB_OFFLINE is not set
  (no --model)      the base of the version in production, else the default
                    base smollm2-135m-instruct

Clients pick per request with the OpenAI `model` field: the base's served name,
an adapter version name (loaded on first use), or the aliases `production` and
`canary` (deploy state, re-read every server.state_refresh_s).

A classifier (a registered task=classification version, or a folder of a
*ForSequenceClassification model) is served by vLLM's pooling runner at
/v1/classify instead of the chat routes; its `production` and `canary` aliases
resolve among classification versions (stages are held per task).

Endpoints: /v1/chat/completions, /v1/completions, /v1/responses, /v1/classify
(classifiers), /v1/models, /v1/feedback, /admin/* (admin key), /healthz,
/readyz, /metrics, /schema (OpenAPI).
Every request is logged to the DuckDB request log. SIGTERM drains in-flight
requests and the log, then exits. Docs: docs/serving.md

Admin API safety: while no API key exists, /admin/* answers loopback clients
only (403 admin_loopback_only otherwise), and serve refuses a non-loopback
--host (0.0.0.0, ::, a LAN address) unless a live admin key exists (tuneloop
keys create --scope admin) or auth.allow_open_admin is set. POST /admin/adapters
loads folders only from server.adapter_roots. Docs: docs/keys-logs-feedback.md
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="serve models behind an OpenAI-compatible API (vLLM engine, request log, metrics)",
        description=SERVE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", metavar="BASE_OR_VERSION", help="what to serve (see above; default: production's base)")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH_OR_VERSION",
        help="load an adapter at start-up: NAME=FOLDER, NAME=VERSION, or a version name (repeatable)",
    )
    p.add_argument(
        "--served-model-name", metavar="NAME", help="name the base answers to in `model` (default: its folder name)"
    )
    p.add_argument("--host", help="bind address (default: server.host = 127.0.0.1)")
    p.add_argument("--port", type=int, help="bind port (default: server.port = 8000)")
    p.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="server log level"
    )
    p.set_defaults(handler=cmd_serve)
    cli_keys.register(sub)


def cmd_serve(args: argparse.Namespace, ctx: Context) -> int:
    import logging

    from tuneloop.errors import UserError

    settings = ctx.settings
    s = settings.server
    if args.model:
        s.model = args.model
    if args.adapter:
        s.adapters = list(s.adapters) + list(args.adapter)
    if args.served_model_name:
        s.served_model_name = args.served_model_name
    if args.host:
        s.host = args.host
    if args.port is not None:
        s.port = args.port
    if not 0 < s.port < 65536:
        raise UserError(f"--port {s.port} is not a TCP port (1-65535)")
    # The admin API is never open to the network: checked before anything else (no model, no engine).
    open_admin = check_admin_exposure(s.host, settings.auth.allow_open_admin, ctx.db)
    # Cheap refusals first (milliseconds: the plan, the files, the port), then what needs torch and vLLM.
    from tuneloop.server import preflight
    from tuneloop.server.app import check_plan, check_port, plan_serving

    plan = plan_serving(settings, ctx.db)
    check_plan(plan, settings, ctx.db)
    preflight.check_model_config(plan.base, settings.engine)
    preflight.check_lora_rank(settings.engine)
    check_port(s.host, s.port)

    import os

    from tuneloop.runtime import configure_vllm_env, has_cuda

    user_kv = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    configure_vllm_env(settings.engine, settings.paths.home_path)  # imports torch (has_cuda)
    if not has_cuda():
        preflight.check_kv_cache(plan.base, settings.engine, user_kv)
    preflight.check_architecture(plan.base)  # imports vLLM's model registry

    import uvicorn

    from tuneloop.server.app import create_app

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if open_admin:
        logging.getLogger(__name__).warning(
            "auth.allow_open_admin is set: serving on non-loopback host %s without an admin key. The admin API "
            "still answers loopback clients only, but through a reverse proxy or tunnel on this machine anyone "
            "who reaches the port can load adapters and change what is served; create an admin key with "
            "`tuneloop keys create --scope admin` and unset auth.allow_open_admin",
            s.host,
        )
    print(
        f"serving {plan.base} as {plan.served_name!r} on http://{s.host}:{s.port} "
        f"(adapters: {', '.join(plan.adapters) or 'none'}; database {ctx.db})",
        flush=True,
    )
    app = create_app(settings, ctx.db, plan=plan)
    config = uvicorn.Config(
        app,
        host=s.host,
        port=s.port,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=60,
        lifespan="on",
    )
    server = _draining_server_class()(config, app, s.drain_s)
    # A failed start-up is reported once, below, as `error: ...`: keep uvicorn from logging the traceback that
    # Litestar hands it ("Application startup failed" and the exception's stack).
    quiet = _DropStartupFailure(app)
    uv_log = logging.getLogger("uvicorn.error")
    uv_log.addFilter(quiet)
    try:
        server.run()
    except SystemExit:  # uvicorn exits 3 when the lifespan fails its start-up
        if app.state.startup_error is None:
            raise
    finally:
        uv_log.removeFilter(quiet)
    err = app.state.startup_error
    if err is not None:
        raise UserError(_startup_failure(err, plan.base))
    if not server.started:
        raise UserError(f"the server did not start on {s.host}:{s.port} (see the log above)")
    return 0


def check_admin_exposure(host: str, allow_open_admin: bool, db: Any) -> bool:
    """Refuse (:class:`tuneloop.errors.UserError`) to bind a non-loopback ``host`` while no live admin key exists,
    unless ``allow_open_admin``; True when the server starts exposed that way (the caller warns), else False."""
    from tuneloop.errors import UserError
    from tuneloop.server.auth import has_admin_key, is_loopback_host

    if is_loopback_host(host) or has_admin_key(db):
        return False
    if allow_open_admin:
        return True
    raise UserError(
        f"refusing to serve on --host {host or '(all interfaces)'}: it is not a loopback address and no admin API "
        "key exists, and the admin API loads adapters from server paths and changes what is served. Create one "
        "first: `tuneloop keys create --scope admin --name ops` (once a key exists, /v1 needs keys too: "
        "`tuneloop keys create --scope inference`), or serve on --host 127.0.0.1. To start anyway, set "
        "auth.allow_open_admin=true (TUNELOOP_AUTH__ALLOW_OPEN_ADMIN=true; the admin API then answers "
        "loopback clients only)"
    )


def _draining_server_class() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, except that the first SIGTERM/SIGINT marks the app as draining (``/readyz`` answers
        503) and keeps serving for ``drain_s`` seconds before uvicorn's own graceful shutdown starts, so a load
        balancer's health check takes the replica out before it stops accepting connections. A second signal
        shuts down at once."""

        def __init__(self, config: Any, app: Any, drain_s: float) -> None:
            super().__init__(config)
            self.app, self.drain_s = app, drain_s
            self._timer: threading.Timer | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.drain_s > 0 and self._timer is None and self.started:
                self.app.state.draining = True
                logging.getLogger("tuneloop.server").info("draining for %.1f s before shutting down", self.drain_s)
                timer = threading.Timer(self.drain_s, super().handle_exit, (sig, frame))
                timer.daemon = True
                self._timer = timer
                timer.start()
                return
            super().handle_exit(sig, frame)

    return DrainingServer


class _DropStartupFailure(logging.Filter):
    """Drops uvicorn's error records once the app recorded why its start-up failed."""

    def __init__(self, app: Any):
        super().__init__()
        self.app = app

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and getattr(self.app.state, "startup_error", None) is not None)


def _startup_failure(err: BaseException, base: Any) -> str:
    """One paragraph for a start-up failure: vLLM's own message (first lines, no stack) and where to look."""
    from tuneloop.errors import UserError

    if isinstance(err, UserError):
        return str(err)
    text = " ".join(line.strip() for line in str(err).strip().splitlines()[:3] if line.strip())
    text = text[:600] or type(err).__name__
    return (
        f"the vLLM engine could not start on {base}: {type(err).__name__}: {text}. Check the model folder and the "
        "engine settings (engine.max_model_len, engine.max_lora_rank, engine.kv_cache_gib, engine.dtype: "
        "`tuneloop config show`; change one with --set engine.KEY=VALUE)"
    )
