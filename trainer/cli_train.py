"""CLI: ``tuneloop train`` and ``tuneloop merge`` (registered by trainer/cli.py).

``tuneloop eval`` lives with the release lifecycle (tuneloop.deploy.cli): it generates on vLLM.
Only argparse and config dataclasses are imported at module level; torch/TRL load in handlers.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from tuneloop.errors import UserError
from tuneloop.trainer.config import TrainConfig

if TYPE_CHECKING:
    from tuneloop.cli import Context


def register(sub: argparse._SubParsersAction) -> None:
    from tuneloop.config import field_help

    keys = "\n".join(f"  {k}\n      {h}" for k, h in field_help(TrainConfig).items())
    p = sub.add_parser(
        "train",
        help="fine-tune a model (lora, qlora, full, dpo, kto, other PEFT methods; or a classifier) and register it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a base model on a prepared dataset with TRL + PEFT, record the run and register the "
        "result as a model version. Settings come from --config YAML (a TrainConfig file; platform settings go before the command: tuneloop --config tuneloop.yaml train ...), then key=value overrides.",
        epilog="examples:\n  tuneloop train dataset=chatterbot name=chat-v1 max_steps=20\n"
        "  tuneloop train --config train.yaml method=qlora lora.r=16\n"
        "  tuneloop train method=dora dataset=chatterbot      (merged into full weights after training)\n"
        "  tuneloop train datasets=support:0.7,billing:0.3    (a weighted multi-task mix)\n"
        "  tuneloop train task=classification method=feature_extraction dataset=topics\n"
        "\nmethods and how each is served: docs/training.md#methods\n\nconfig keys:\n" + keys,
    )
    p.add_argument(
        "train_overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. method=qlora lora.r=16"
    )
    p.add_argument(
        "--config",
        "--train-config",
        "-c",
        dest="train_config",
        metavar="FILE",
        help="TrainConfig YAML file (flat keys, lora: as a mapping); key=value overrides win",
    )
    p.add_argument(
        "--fresh", action="store_true", help="ignore checkpoints in the run folder (default: resume from the last one)"
    )
    p.add_argument("--resume", action="store_true", help="require a checkpoint to resume from (error if none)")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes for distributed data-parallel training (CPU: gloo; GPU: at most one per GPU)",
    )
    p.add_argument(
        "--write-config",
        metavar="FILE",
        help="write the resolved config (training keys with the version name pinned + effective settings) to FILE "
        "and exit without training; start it with `torchrun ... -m tuneloop.trainer.distributed --config FILE` "
        "(multi-node)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or loss table")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser(
        "merge",
        help="merge a LoRA/QLoRA adapter into full-precision base weights and register it",
        description="Merge an adapter version into its base (loaded in fp32) as a plain Hugging Face folder that vLLM "
        "serves, check logits parity against base+adapter, and register it as kind 'merged'.",
        epilog="example:\n  tuneloop merge chat-v1 --name chat-v1-merged",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("version", help="adapter version to merge")
    p.add_argument("--name", help="name of the merged version (default: <version>-merged)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="max |logit difference| allowed (default 1e-3)")
    p.set_defaults(handler=cmd_merge)


def build_config(args: argparse.Namespace) -> TrainConfig:
    from tuneloop.config import build, load_yaml

    overrides = list(args.train_overrides)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise UserError(f"arguments must be key=value, got {', '.join(bad)} (see `tuneloop train --help`)")
    cfg = build(TrainConfig, load_yaml(args.train_config), overrides)
    if args.fresh:
        cfg.resume = False
    return cfg


def cmd_train(args: argparse.Namespace, ctx: Context) -> int:
    if args.nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {args.nproc}")
    cfg = build_config(args)
    if args.nproc > 1 or args.write_config:
        from tuneloop.trainer.distributed import LaunchConfig, launch, resolve_train_config, write_config

        if args.resume:
            raise UserError(
                "--resume is not supported with --nproc > 1 or --write-config (a distributed run starts fresh)"
            )
        lc = LaunchConfig(ctx.settings, cfg, progress=not args.quiet, json=args.json)
        if not args.write_config:
            return launch(args.nproc, lc, ctx.db)
        resolve_train_config(cfg, ctx.db)
        path = write_config(args.write_config, lc)
        print(path)
        print(
            f"resolved config for version {cfg.name!r} written; start it on each node with\n"
            f"  torchrun --nnodes N --node_rank I --nproc_per_node {args.nproc} --rdzv_backend c10d --rdzv_endpoint HOST:29500 "
            f"-m tuneloop.trainer.distributed --config {path}",
            file=sys.stderr,
        )
        return 0
    if args.resume:
        from pathlib import Path

        from tuneloop.trainer.train import last_checkpoint

        out = Path(cfg.output_dir) if cfg.output_dir else ctx.settings.paths.home_path / "runs" / (cfg.name or "")
        if (not cfg.name and not cfg.output_dir) or last_checkpoint(out) is None:
            raise UserError(
                f"--resume: no checkpoint in {out} (give the same name= or output_dir= as the interrupted run)"
            )
    from tuneloop.trainer.train import result_text, train

    res = train(cfg, ctx.db, ctx.settings, progress=not args.quiet)
    print(result_text(res, args.json))
    return 0


def cmd_merge(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.trainer.merge import merge

    v, diff = merge(args.version, ctx.db, ctx.settings, name=args.name, tolerance=args.tolerance)
    print(
        f"registered {v.name} (merged, parent {v.parent_version}); max |logit diff| vs base+adapter {diff:.2e}\n  {v.path}"
    )
    return 0
