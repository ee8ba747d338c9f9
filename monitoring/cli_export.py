"""CLI: ``tuneloop export logs`` — this replica's request log and feedback as partitioned Parquet.

On a shared PostgreSQL database the command exports every replica's rows under one name (default
``pg-<database>``, :func:`monitoring.export.default_replica`); see :mod:`monitoring.export`.

``register(sub)`` is called by monitoring/cli.py. Only light modules are imported at module level;
times and durations follow :mod:`tuneloop.timeparse`.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from tuneloop.cli import add_group
from tuneloop.timeparse import duration_s, parse_time

if TYPE_CHECKING:
    from tuneloop.cli import Context


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:

    g = add_group(sub, "export", "export data for other tools and for many-replica deployments")
    p = g.add_parser(
        "logs",
        help="export closed windows of the request log and feedback as hive-partitioned Parquet",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Copy this replica's request log and feedback into OUT/requests/ and OUT/feedback/ as Parquet, "
            "partitioned by date and model_version, one file per partition and run, named after the replica. "
            "Only windows that have closed are exported, and each run continues where the last one for this "
            "replica stopped (state in OUT/_manifests/REPLICA.json), so running it from cron is safe. "
            "Many replicas can export into one folder; `tuneloop drift report --from-parquet OUT` and "
            "`tuneloop feedback sample --from-parquet OUT` then read all of them as one log. "
            "With a shared PostgreSQL database (database.url) every replica's rows are in it: export it once "
            "(one cron job), under one name (default pg-DBNAME); each row keeps the replica that served it."
        ),
        epilog=(
            "examples:\n"
            "  tuneloop export logs --out /mnt/logs\n"
            "  tuneloop export logs --out /mnt/logs --replica server-0 --since 2026-01-01 --window 5m\n"
            "  tuneloop export logs --out s3://bucket/tuneloop-logs   # DuckDB httpfs + AWS env credentials\n"
            "  duckdb -c \"SELECT model_version, count(*) FROM read_parquet('/mnt/logs/requests/**/*.parquet',"
            ' hive_partitioning=true) GROUP BY 1"'
        ),
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="destination folder (or s3://, gs://, az:// URL reachable by DuckDB httpfs)",
    )
    p.add_argument(
        "--replica",
        metavar="NAME",
        help="this replica's name, used in file names (default: $TUNELOOP_REPLICA or the host name; "
        "pg-DBNAME for a shared PostgreSQL database)",
    )
    p.add_argument(
        "--since",
        metavar="WHEN",
        help="do not export rows before this (ISO time, or a duration ago like 7d); default: where the last export stopped, else everything",
    )
    p.add_argument(
        "--until",
        metavar="WHEN",
        help="do not export rows at or after this (default: the end of the last closed window)",
    )
    p.add_argument(
        "--window",
        default="1h",
        metavar="DUR",
        help="export window length; a window is exported once it has closed (default 1h)",
    )
    p.add_argument(
        "--grace",
        default="60s",
        metavar="DUR",
        help="wait this long after a window ends before it counts as closed (default 60s, > log.flush_interval_s)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_export_logs)


def cmd_export_logs(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.monitoring.export import export_logs

    since = parse_time(args.since) if args.since else None
    until = parse_time(args.until) if args.until else None
    res = export_logs(
        ctx.db,
        args.out,
        args.replica,
        since=since,
        until=until,
        window_s=duration_s(args.window),
        grace_s=duration_s(args.grace),
    )
    if args.json:
        print(json.dumps(res.as_dict(), indent=2))
        return 0
    for t in res.tables:
        rng = f"[{t.start:%Y-%m-%d %H:%M:%S}, {t.end:%Y-%m-%d %H:%M:%S})" if t.start and t.end else ""
        what = f"{t.rows} rows" if t.skipped is None else f"nothing ({t.skipped})"
        print(f"{t.table:9s} {what} {rng}".rstrip())
    print(f"replica {res.replica}: {res.rows} rows exported to {res.out}")
    return 0
