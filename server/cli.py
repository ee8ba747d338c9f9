"""CLI of the server area: ``tuneloop serve`` (and ``tuneloop keys`` from :mod:`tuneloop.server.cli_keys`).

Only light imports at module level (see tuneloop.cli); Litestar, uvicorn and vLLM load in the handler.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from tuneloop.server import cli_keys

if TYPE_CHECKING:  # pragma: no cover
    from tuneloop.cli import Context

SERVE_HELP = """\
Serve a model behind an OpenAI-compatible API (Litestar + in-process vLLM).

What is served (first match wins):
  --model NAME      a registered version (an adapter version serves its base with
                    the adapter loaded; a merged version serves its folder), a
                    model folder, or a pulled base name (smollm2-135m-instruct)
  (no --model)      the base of the version in production, else the default
                    base smollm2-135m-instruct (pull it first: tuneloop models pull)

Clients pick per request with the OpenAI `model` field: the base's served name,
an adapter version name (loaded on first use), or the aliases `production` and
`canary` (deploy state, re-read every server.state_refresh_s).

Endpoints: /v1/chat/completions, /v1/completions, /v1/models, /v1/feedback,
/admin/* (admin key), /healthz, /readyz, /metrics, /schema (OpenAPI).
Every request is logged to the DuckDB request log. SIGTERM drains in-flight
requests and the log, then exits. Docs: docs/serving.md
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
    from tuneloop.runtime import configure_vllm_env

    configure_vllm_env(settings.engine, settings.paths.home_path)

    import uvicorn

    from tuneloop.server.app import check_plan, check_port, create_app, plan_serving

    if not 0 < s.port < 65536:
        from tuneloop.errors import UserError

        raise UserError(f"--port {s.port} is not a TCP port (1-65535)")
    plan = plan_serving(settings, ctx.db)
    check_plan(plan, settings, ctx.db)
    check_port(s.host, s.port)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    print(
        f"serving {plan.base} as {plan.served_name!r} on http://{s.host}:{s.port} "
        f"(adapters: {', '.join(plan.adapters) or 'none'}; database {ctx.db.path})",
        flush=True,
    )
    app = create_app(settings, ctx.db, plan=plan)
    uvicorn.run(
        app,
        host=s.host,
        port=s.port,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=60,
        lifespan="on",
    )
    return 0
