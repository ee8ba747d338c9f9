"""CLI: ``tuneloop tune`` (registered by trainer/cli.py): hyperparameter search over ``train`` runs.

Only argparse and config dataclasses are imported at module level; Optuna/torch load in the handler.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from tuneloop.errors import UserError

if TYPE_CHECKING:
    from tuneloop.cli import Context
    from tuneloop.trainer.tune import TuneResult


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="hyperparameter search (Optuna TPE + median pruning) over train runs; registers the best",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Search TrainConfig keys with Optuna: each trial is a real `tuneloop train` run (recorded in "
        "runs, not registered) minimising the validation loss (eval_loss on the dataset's validation split). "
        "The study lives in <home>/tune/<study>.db (run the same --study again to resume it); plots go to "
        "<home>/tune/<study>/; the best trial's model is registered as a version. Base settings come from "
        "--config YAML and key=value overrides, as for `tuneloop train`.",
        epilog="search space YAML (lists are choices, {low, high[, log, step]} ranges):\n"
        "  learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}\n"
        "  lora.r: [4, 8, 16]\n"
        "  lora.dropout: {low: 0.0, high: 0.2}\n"
        "  batch_size: [2, 4]\n\n"
        "examples:\n"
        "  tuneloop tune --space space.yaml --study sup dataset=support max_steps=50 eval_steps=10 --trials 20\n"
        "  tuneloop tune --space space.yaml --study sup dataset=support max_steps=50 eval_steps=10 --trials 30  # resume",
    )
    p.add_argument(
        "train_overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="base config overrides, e.g. dataset=support max_steps=50",
    )
    p.add_argument(
        "--config", "--train-config", "-c", dest="train_config", metavar="FILE", help="base TrainConfig YAML file"
    )
    p.add_argument("--space", required=True, metavar="FILE", help="search space YAML (TrainConfig keys)")
    p.add_argument("--study", help="study name (default: the space file's stem); the same name resumes it")
    p.add_argument(
        "--trials", type=int, default=10, help="trials in the study in all, earlier ones included (default 10)"
    )
    p.add_argument("--timeout", metavar="DURATION", help="start no new trial after this long (90s, 30m, 2h)")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="trials run at once, as threads in this process (default 1; CPU cores are split)",
    )
    p.add_argument("--seed", type=int, default=42, help="TPE sampler seed (default 42)")
    p.add_argument("--name", default="", help="version name of the best trial's model (default <study>-best)")
    p.add_argument("--no-prune", action="store_true", help="never prune (default: MedianPruner on eval_loss)")
    p.add_argument("--prune-startup", type=int, default=3, help="trials that complete before any is pruned (default 3)")
    p.add_argument("--prune-warmup", type=int, default=0, help="steps of a trial before it may be pruned (default 0)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_tune, fresh=False)


def cmd_tune(args: argparse.Namespace, ctx: Context) -> int:
    from pathlib import Path

    from tuneloop.timeparse import duration_s
    from tuneloop.trainer.cli_train import build_config
    from tuneloop.trainer.tune import TuneOptions, load_space, tune

    space = load_space(args.space)
    base = build_config(args)
    if args.prune_startup < 0 or args.prune_warmup < 0:
        raise UserError("--prune-startup and --prune-warmup must be >= 0")
    opts = TuneOptions(
        study=args.study or Path(args.space).stem,
        trials=args.trials,
        timeout_s=duration_s(args.timeout) if args.timeout else None,
        jobs=args.jobs,
        seed=args.seed,
        name=args.name,
        prune=not args.no_prune,
        prune_startup=args.prune_startup,
        prune_warmup=args.prune_warmup,
    )
    res = tune(base, space, ctx.db, ctx.settings, opts)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2, default=str))
    else:
        print_result(res)
    return 130 if res.interrupted else 0


def print_result(res: TuneResult) -> None:
    from tuneloop.table import print_table

    print_table(
        ["trial", "state", "eval_loss", "run", "params"],
        [
            [
                t.number,
                t.state,
                t.value,
                t.run_id or "",
                " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items()),
            ]
            for t in res.trials
        ],
        title=f"study {res.study} ({len(res.trials)} trials, {res.ran} run now): {res.storage}",
    )
    if res.best is not None:
        print(f"best: trial {res.best.number} eval_loss {res.best.value:.4f}, registered as {res.version}")
    for p in res.plots:
        print(f"plot: {p}")
    for n in res.notes:
        print(f"note: {n}", file=sys.stderr)
