"""Data-parallel training: N processes train one model from one resolved config file.

Contract
--------
* The **resolved config file** (YAML) is the whole input of a distributed run:
  ``settings`` (the effective platform settings, paths made absolute: home,
  database, model cache), ``train`` (the :class:`TrainConfig` with the
  version name pinned and ``resume: false``) and ``output`` (``progress``,
  ``json``: what rank 0 prints). :func:`resolve_train_config` checks the
  configuration and pins what all ranks must share (the version name, which
  must be free, with a UTC-time default); bad input is a
  :class:`~tuneloop.errors.UserError` before any file is written or process
  started. :func:`write_config` writes the file, :func:`read_config` reads it.
* ``python -m tuneloop.trainer.distributed --config FILE`` is the per-process
  entry point (:func:`main`) under torchrun or ``accelerate launch``: it
  builds settings and the database from the file and runs
  :func:`tuneloop.trainer.train.train`. HF ``Trainer`` does distributed data
  parallel (gloo on CPU, NCCL on GPUs), each process taking ``batch_size``
  examples per step, so the effective batch is ``batch_size x
  gradient_accumulation_steps x processes``. It reads nothing from the
  command line besides ``--config`` and writes no environment variables.
* :func:`launch` (``tuneloop train --nproc N``) writes the file into a
  scratch folder under ``<home>/tmp`` and starts N local processes through
  ``python -m torch.distributed.run --standalone --nproc_per_node N``, or
  through ``accelerate launch --config_file F`` when
  ``$TUNELOOP_ACCELERATE_CONFIG`` names an accelerate config (FSDP /
  DeepSpeed, see deploy/accelerate/). On several nodes, write the file once
  with ``tuneloop train --write-config FILE`` and start torchrun with
  ``-m tuneloop.trainer.distributed --config FILE`` on each node.
* **Only rank 0 writes to the database and the registry.** Ranks > 0 train
  on a snapshot of the database copied under the database lock (their run
  record and version registration land in that snapshot and are discarded),
  write into a scratch run folder and print nothing on stdout. Under
  :func:`launch` the snapshot and scratch folder are shared by the local
  ranks and removed afterwards; a rank started without them
  (multi-node: torchrun started by hand on each node) takes no copy: it reads
  the database read-only for its look-ups (base, dataset, adapter), records
  nothing, writes into its own scratch folder under ``<home>/tmp`` and removes
  it when it ends. Rank 0 records one run and registers one version, exactly
  like a single-process run.
* A distributed run starts fresh (``resume=false``): resuming needs every
  rank to load the same checkpoint, which the scratch folders of ranks > 0
  do not hold. Checkpoints are still written by rank 0.
* If any process fails, torchrun stops the others and :func:`launch` returns
  its non-zero exit code; nothing is registered.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.errors import UserError
from tuneloop.trainer.config import TrainConfig

if TYPE_CHECKING:
    from tuneloop.db import Database
    from tuneloop.settings import Settings

ENV_SNAPSHOT = "TUNELOOP_DIST_DB_SNAPSHOT"
ENV_SCRATCH = "TUNELOOP_DIST_SCRATCH"
ENV_ACCELERATE_CONFIG = "TUNELOOP_ACCELERATE_CONFIG"
CONFIG_NAME = "train_config.yaml"


@dataclass
class LaunchConfig:
    """The content of a resolved config file."""

    settings: Settings
    train: TrainConfig
    progress: bool = True
    json: bool = False


def resolve_train_config(cfg: TrainConfig, db: Database) -> TrainConfig:
    """Validate ``cfg`` and pin what all ranks must share: a free version name and ``resume=false``."""
    from tuneloop.registry import RegistryError, get_version
    from tuneloop.trainer.train import default_name

    cfg.validate()
    name = cfg.name or default_name(cfg)
    try:
        get_version(db, name)
        raise UserError(f"model version {name!r} already exists; pick another name=")
    except RegistryError:
        pass
    cfg.name, cfg.resume = name, False
    return cfg


def write_config(path: str | os.PathLike[str], lc: LaunchConfig) -> Path:
    """Write ``lc`` as a resolved config file (settings paths made absolute); returns the path."""
    import yaml

    from tuneloop.config import to_dict

    settings = to_dict(lc.settings)
    paths = lc.settings.paths
    settings["paths"].update(home=str(paths.home_path), db=str(paths.db_path), models=str(paths.models_path))
    doc = {
        "settings": settings,
        "train": to_dict(lc.train),
        "output": {"progress": lc.progress, "json": lc.json},
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(
        "# resolved by `tuneloop train`; run with: python -m tuneloop.trainer.distributed --config "
        f"{p.name} (under torchrun or accelerate launch)\n" + yaml.safe_dump(doc, sort_keys=False)
    )
    return p


def read_config(path: str | os.PathLike[str]) -> LaunchConfig:
    """A resolved config file back as settings, TrainConfig and output options."""
    from tuneloop.config import ConfigError, from_dict, load_yaml
    from tuneloop.settings import Settings

    doc = load_yaml(path)
    unknown = sorted(set(doc) - {"settings", "train", "output"})
    if unknown or "train" not in doc:
        raise ConfigError(f"{path}: not a resolved train config (write one with `tuneloop train --write-config FILE`)")
    out: dict[str, Any] = doc.get("output") or {}
    return LaunchConfig(
        settings=from_dict(Settings, doc.get("settings") or {}, "settings"),
        train=from_dict(TrainConfig, doc["train"], "train"),
        progress=bool(out.get("progress", True)),
        json=bool(out.get("json", False)),
    )


def snapshot_db(db_path: Path, dest: Path) -> Path:
    """Copy the database file while holding it (no other process writes meanwhile), WAL checkpointed."""
    from tuneloop.db import DuckDatabase

    db = DuckDatabase(db_path)
    with db.connect(transaction=False) as con:
        con.execute("CHECKPOINT")
        shutil.copyfile(db.path, dest)
    return dest


def launcher_command(nproc: int, config_file: Path) -> list[str]:
    """The torchrun (or accelerate launch) command that runs the worker on ``config_file`` N times."""
    worker = ["-m", "tuneloop.trainer.distributed", "--config", str(config_file)]
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
            *worker,
        ]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *worker]


def check_nproc(nproc: int) -> None:
    """UserError unless ``nproc`` local processes can run here: with GPUs, one per visible GPU at most; on a
    machine without (gloo on CPU) any number >= 1 is allowed (they share the cores)."""
    if nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {nproc}")
    from tuneloop.runtime import has_cuda

    if not has_cuda():
        return
    import torch

    n = int(torch.cuda.device_count())
    if nproc > n:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise UserError(
            f"--nproc {nproc} is more than the {n} GPU(s) this machine shows{where}: use --nproc {n} or fewer "
            "(one process per GPU); for more GPUs than one machine has, write the config with --write-config FILE "
            "and start torchrun on each node"
        )


def launch(nproc: int, lc: LaunchConfig, db: Database) -> int:
    """Train ``lc.train`` in ``nproc`` local processes; returns the launcher's exit code."""
    check_nproc(nproc)
    resolve_train_config(lc.train, db)
    paths = lc.settings.paths
    work = Path(tempfile.mkdtemp(prefix="tuneloop-dist-", dir=paths.sub("tmp")))
    try:
        config_file = write_config(work / CONFIG_NAME, lc)
        env = dict(os.environ, **{ENV_SCRATCH: str(work)})
        if not lc.settings.database.url:  # the DuckDB file has one writer: ranks > 0 read a snapshot
            snapshot_db(paths.db_path, work / "snapshot.duckdb")
            env[ENV_SNAPSHOT] = str(work / "snapshot.duckdb")
        # one OpenMP thread pool per process, sharing the cores (torchrun's default is 1 thread)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        print(f"launching {nproc} training processes (data parallel)", file=sys.stderr, flush=True)
        return subprocess.run(launcher_command(nproc, config_file), env=env).returncode
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_worker(lc: LaunchConfig, rank: int) -> int:
    """Train as process ``rank``: rank 0 for real, others on a DB snapshot in a scratch folder, quietly."""
    from tuneloop.db import open_database
    from tuneloop.trainer.train import result_text, train

    settings, cfg = lc.settings, lc.train
    own: Path | None = None
    db = settings.database.open(settings.paths)
    record = True
    if rank != 0:
        snap, scratch = os.environ.get(ENV_SNAPSHOT), os.environ.get(ENV_SCRATCH)
        if snap and scratch:  # started by `tuneloop train --nproc`: the launcher's shared snapshot
            db = open_database(snap)
        else:
            # Started by torchrun directly (several nodes): every rank > 0 of every node gets here. Copying the
            # database per rank would take its lock once per rank, one copy at a time, while rank 0 needs it
            # too (a large database times out on the later ranks, and each copy costs its size on disk), so
            # read it instead (look-ups only, short read-only opens) and record nothing.
            own = Path(tempfile.mkdtemp(prefix=f"tuneloop-dist-rank{rank}-", dir=settings.paths.sub("tmp")))
            scratch = str(own)
            db = db.with_options(lock_timeout_s=600.0, read_only=True)
            record = False
        cfg.output_dir = str(Path(scratch) / f"rank{rank}")
        sys.stdout = open(os.devnull, "w")  # one process reports; errors still reach stderr  # noqa: SIM115
    try:
        res = train(cfg, db, settings, progress=lc.progress and rank == 0, record=record)
        print(result_text(res, lc.json), flush=True)
        return 0
    finally:
        if own is not None:
            shutil.rmtree(own, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Per-process entry point under torchrun / accelerate launch (needs ``RANK`` from the launcher)."""
    p = argparse.ArgumentParser(
        prog="python -m tuneloop.trainer.distributed",
        description="One training process of a distributed run (started by torchrun or accelerate launch).",
    )
    p.add_argument(
        "--config", required=True, metavar="FILE", help="resolved config file (`tuneloop train --write-config FILE`)"
    )
    args = p.parse_args(argv)
    try:
        return run_worker(read_config(args.config), int(os.environ.get("RANK", "0")))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
