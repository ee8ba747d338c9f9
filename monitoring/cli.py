"""``tuneloop drift report|profile``: drift per model version against its training data.

Contract: :func:`register` adds the ``drift`` command group and the ``export``
commands of :mod:`monitoring.cli_export`. Heavy imports happen inside handlers.
Both backends (``database.url``): the commands print the same for the same rows
on the DuckDB file and on PostgreSQL. Statistics are DuckDB SQL over the
window's rows (:mod:`monitoring.drift_job`); profiles, ``drift_reports`` and the
report's history are read and written on the database with portable SQL.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING

from tuneloop.cli import add_group
from tuneloop.monitoring import cli_export

if TYPE_CHECKING:
    from datetime import datetime
    from pathlib import Path

    from tuneloop.cli import Context
    from tuneloop.settings import DriftSettings

_REPORT_HELP = """Compute drift now for one version (or every version with traffic in the window), store it in
drift_reports, print a table and optionally write a self-contained HTML report.

examples:
  tuneloop drift report
  tuneloop drift report --version chat-v1 --window 500r --out drift.html
  tuneloop drift report --from-parquet /mnt/logs   # every replica's `tuneloop export logs` output
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = add_group(sub, "drift", "drift of production traffic against each version's training data")
    p = g.add_parser(
        "report",
        help="compute drift now; table + optional HTML report",
        description=_REPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", help="model version (default: every version with traffic in the window)")
    p.add_argument(
        "--window", help="production window: duration (30m, 1h, 2d) or request count (500r); default drift.window"
    )
    p.add_argument("--out", metavar="FILE.html", help="write an HTML report (histograms, drift over time, new words)")
    p.add_argument("--no-embeddings", action="store_true", help="skip embedding drift (no MiniLM load)")
    p.add_argument(
        "--from-parquet",
        metavar="DIR",
        help="read requests and feedback from Parquet exports of many replicas (`tuneloop export logs "
        "--out DIR`, a folder or s3:// URL) instead of this database; versions, profiles and "
        "drift_reports stay in the database",
    )
    p.set_defaults(handler=_cmd_report)
    p = g.add_parser(
        "profile",
        help="(re)compute the reference profile of a version from its training data",
        description="Profile VERSION's training dataset with its serving tokenizer (prompt/response token "
        "lengths, vocabulary, embeddings sample) and store it. Example: tuneloop drift profile chat-v1",
    )
    p.add_argument("version")
    p.add_argument("--no-embeddings", action="store_true", help="store no embedding sample")
    p.set_defaults(handler=_cmd_profile)
    cli_export.register(sub)


def _drift_settings(args: argparse.Namespace, ctx: Context) -> DriftSettings:
    ds = ctx.settings.drift
    return dataclasses.replace(ds, embeddings=False) if args.no_embeddings else ds


def _cmd_report(args: argparse.Namespace, ctx: Context) -> int:
    from pathlib import Path

    from tuneloop.monitoring.drift import parse_window
    from tuneloop.monitoring.drift_job import DriftJob
    from tuneloop.monitoring.report import render_html
    from tuneloop.monitoring.sources import log_source
    from tuneloop.table import print_table

    ds = _drift_settings(args, ctx)
    window = parse_window(args.window or ds.window)  # bad input fails before any work
    if args.out:  # an unwritable --out fails before anything is computed or stored
        _check_out_file(Path(args.out))
    source = log_source(ctx.db, args.from_parquet)  # a missing folder fails before any work
    results = DriftJob(ctx.db, ds, None, source=source).run_once(args.version, window)
    if not results:
        print(f"no model version had traffic in the last {args.window or ds.window}")
    for r in results:
        title = f"{r.model_version}: {r.n_requests} requests, window {args.window or ds.window}"
        if r.skipped:
            print(f"{title}: skipped ({r.skipped})")
            continue
        rows = [[f.feature, f.statistic, f.value, f.threshold, "DRIFTED" if f.drifted else "ok"] for f in r.features]
        rows.append(["overall", "score", r.score, r.threshold, "DRIFTED" if r.drifted else "ok"])
        print_table(["feature", "statistic", "value", "threshold", "status"], rows, title=title)
        if r.new_words:
            print("top new words: " + ", ".join(f"{w} ({c})" for w, c in r.new_words[:10]))
    if args.out:
        hist: dict[str, list[tuple[datetime, float]]] = {}
        from tuneloop.store_monitoring import overall_drift_history

        for row in overall_drift_history(ctx.db):
            hist.setdefault(row["model_version"], []).append((row["created_at"], row["value"]))
        Path(args.out).write_text(render_html(results, hist))
        print(f"report: {args.out}")
    return 0


def _check_out_file(out: Path) -> None:
    import os

    from tuneloop.errors import UserError

    parent = out.expanduser().absolute().parent
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; name the HTML file to write, e.g. --out {out / 'drift.html'}")
    if not parent.is_dir():
        raise UserError(f"--out {out}: folder {parent} does not exist; create it first (mkdir -p {parent})")
    if not os.access(parent, os.W_OK):
        raise UserError(f"--out {out}: folder {parent} is not writable")


def _cmd_profile(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.monitoring.profile import compute_profile

    p = compute_profile(ctx.db, args.version, _drift_settings(args, ctx), progress=True)
    pr = p.profile
    print(
        f"profiled {args.version} from {p.dataset_id}: {pr['n_rows']} rows, {len(pr['vocab'])} words, "
        f"expected out-of-vocabulary share {pr['oov_expected']:.3f}, embeddings "
        f"{0 if p.embeddings is None else len(p.embeddings)}"
    )
    return 0
