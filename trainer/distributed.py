"""Data-parallel training: ``tuneloop train --nproc N`` runs N processes of the same training entry point.

Contract
--------
* :func:`launch` ``(nproc, argv) -> exit code`` takes the ``tuneloop`` arguments
  of a ``tuneloop train`` command (global options included, ``--nproc``
  removed) and runs ``tuneloop train`` in ``nproc`` processes through
  ``python -m torch.distributed.run --standalone --nproc_per_node N -m
  trainer.distributed ...`` (torchrun), or through ``accelerate launch
  --config_file F`` when ``$TUNELOOP_ACCELERATE_CONFIG`` names an accelerate
  config (FSDP / DeepSpeed, see deploy/accelerate/). Each process runs
  :func:`trainer.train.train` unchanged: HF ``Trainer`` does distributed data
  parallel (gloo on CPU, NCCL on GPUs), each process taking ``batch_size``
  examples per step, so the effective batch is ``batch_size x
  gradient_accumulation_steps x nproc``.
* **Only rank 0 writes to the database and the registry.** Before starting
  the workers the launcher checks the configuration and resolves everything
  that must agree across ranks (the version name, which must be free, with a
  UTC-time default); bad input is a :class:`~tuneloop.errors.UserError` before
  any process starts. Ranks > 0 read a snapshot of the database taken under
  the database lock (their run record and version registration land in that
  snapshot and are discarded), write into a scratch run folder, print
  nothing on stdout, and the launcher deletes both afterwards. Rank 0 records
  one run and registers one version, exactly like a single-process run.
* A distributed run starts fresh (``resume=false``): resuming needs every
  rank to load the same checkpoint, which the scratch folders of ranks > 0
  do not hold. Checkpoints are still written by rank 0.
* If any process fails, torchrun stops the others and :func:`launch` returns
  its non-zero exit code; nothing is registered.
* ``python -m trainer.distributed ARGS`` is the per-process entry point (it
  needs ``RANK`` from the launcher).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tuneloop.errors import UserError

ENV_SNAPSHOT = "TUNELOOP_DIST_DB_SNAPSHOT"
ENV_SCRATCH = "TUNELOOP_DIST_SCRATCH"
ENV_ACCELERATE_CONFIG = "TUNELOOP_ACCELERATE_CONFIG"


def prepare(argv: list[str]) -> tuple[list[str], object, object]:
    """Validate a ``tuneloop ... train ...`` command line and pin what all ranks must share.

    Returns (argv with ``name=`` and ``resume=false`` appended, settings, TrainConfig).
    """
    from tuneloop.cli import Context, build_parser
    from tuneloop.trainer.cli_train import build_config
    from tuneloop.trainer.train import _default_name

    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) != "train":
        raise UserError(f"distributed launch runs `tuneloop train`, got: {' '.join(argv)}")
    if args.home:
        os.environ["TUNELOOP_HOME"] = args.home
    if getattr(args, "resume", False):
        raise UserError("--resume is not supported with --nproc > 1 (a distributed run starts fresh)")
    ctx = Context(args.config, args.overrides)
    cfg = build_config(args)
    cfg.validate()
    from tuneloop.registry import RegistryError, get_version

    name = cfg.name or _default_name(cfg)
    try:
        get_version(ctx.db, name)
        raise UserError(f"model version {name!r} already exists; pick another name=")
    except RegistryError:
        pass
    return [*argv, f"name={name}", "resume=false"], ctx.settings, cfg


def snapshot_db(db_path: Path, dest: Path) -> Path:
    """Copy the database file while holding it (no other process writes meanwhile), WAL checkpointed."""
    from tuneloop.db import Database

    db = Database(db_path)
    with db.connect(transaction=False) as con:
        con.execute("CHECKPOINT")
        shutil.copyfile(db.path, dest)
    return dest


def launcher_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun (or accelerate launch) command that runs ``python -m trainer.distributed argv`` N times."""
    acc = os.environ.get(ENV_ACCELERATE_CONFIG)
    if acc:
        if not Path(acc).is_file():
            raise UserError(f"${ENV_ACCELERATE_CONFIG}={acc} is not a file (see deploy/accelerate/)")
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            acc,
            "--num_processes",
            str(nproc),
            "-m",
            "tuneloop.trainer.distributed",
            *argv,
        ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "tuneloop.trainer.distributed",
        *argv,
    ]


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``tuneloop train`` (``argv`` = its tuneloop arguments without ``--nproc``) in ``nproc`` processes."""
    if nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {nproc}")
    argv, settings, _cfg = prepare(list(argv))
    work = Path(tempfile.mkdtemp(prefix="tuneloop-dist-", dir=settings.paths.sub("tmp")))
    try:
        snapshot_db(settings.paths.db_path, work / "snapshot.duckdb")
        env = dict(os.environ, **{ENV_SNAPSHOT: str(work / "snapshot.duckdb"), ENV_SCRATCH: str(work)})
        # one OpenMP thread pool per process, sharing the cores (torchrun's default is 1 thread)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        if "TUNELOOP_HOME" in os.environ:
            env["TUNELOOP_HOME"] = os.environ["TUNELOOP_HOME"]
        print(f"launching {nproc} training processes (data parallel)", file=sys.stderr, flush=True)
        return subprocess.run(launcher_command(nproc, argv), env=env).returncode
    finally:
        shutil.rmtree(work, ignore_errors=True)


def worker_argv(argv: list[str], rank: int) -> list[str]:
    """Rank 0 runs ``argv`` as given; other ranks use the DB snapshot and a scratch run folder, quietly."""
    if rank == 0:
        return argv
    snap, scratch = os.environ.get(ENV_SNAPSHOT), os.environ.get(ENV_SCRATCH)
    if not snap or not scratch:
        raise UserError("trainer.distributed is started by `tuneloop train --nproc N`, not directly")
    i = argv.index("train")
    return [*argv[:i], "--set", f"paths.db={snap}", *argv[i:], f"output_dir={Path(scratch) / f'rank{rank}'}", "--quiet"]


def main(argv: list[str] | None = None) -> int:
    """Per-process entry point under torchrun / accelerate launch."""
    from tuneloop.cli import main as tuneloop_main

    argv = list(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))
    argv = worker_argv(argv, rank)
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # one process reports; errors still reach stderr  # noqa: SIM115
    return tuneloop_main(argv)


if __name__ == "__main__":
    sys.exit(main())
