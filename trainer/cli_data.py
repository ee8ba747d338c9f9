"""``tuneloop data prepare|list|show|corpus``: the data-preparation commands.

Only argparse at module level; the work (datasets, transformers) is imported in handlers.
Their SQL (``data show``'s rows per split and origin) is portable: the same on a DuckDB file
and on PostgreSQL (``database.url``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from tuneloop.cli import add_group
from tuneloop.errors import UserError

if TYPE_CHECKING:
    from tuneloop.cli import Context
    from tuneloop.registry import DatasetRecord

PREPARE_HELP = """\
Clean raw examples into a versioned training dataset and register it.

Inputs: JSONL/JSON with chat rows {"messages": [...]}, prompt/completion rows,
Alpaca rows (instruction/input/output), preference rows (prompt/chosen/rejected
-> a DPO dataset) or classification rows {"text", "label"} (-> a classification
dataset, split stratified by label, labels and counts in the card); CSV with the
same columns; or a Hugging Face datasets folder
(save_to_disk). The shape is detected from the fields unless --format names it.

Steps, each counted in the data card (card.json beside the data, and printed):
normalise whitespace, drop empty/invalid rows, scrub PII (emails, phones,
Luhn-valid card numbers, IPs), drop exact and near duplicates, filter by token
length (chat-template-rendered with the base model's tokenizer), split
deterministically (default 80/10/10). The result is content-hashed: the same
input and options give the same id (<name>@<hash12>).

examples:
  tuneloop data prepare chats.jsonl --name support
  tuneloop data prepare faq.csv --field-map question=prompt --field-map answer=completion
  tuneloop data prepare --from chatterbot-corpus --name chatterbot
  tuneloop data prepare tickets.csv --name tickets          # text,label columns
  tuneloop data prepare --from chatterbot-topics --topics ai,coding,emotion   # questions labelled by topic
"""


def register(sub: argparse._SubParsersAction) -> None:
    g = add_group(sub, "data", "prepare, list and inspect versioned training datasets")
    p = g.add_parser(
        "prepare",
        help="clean raw examples into a registered, versioned dataset",
        description=PREPARE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="JSONL/JSON/CSV files or a datasets folder")
    p.add_argument(
        "--from",
        dest="corpus",
        metavar="CORPUS",
        help="prepare a bundled corpus instead of files: chatterbot-corpus (chat rows, stratified by topic) or "
        "chatterbot-topics (questions labelled by topic: a classification set); PyPI package chatterbot-corpus",
    )
    p.add_argument(
        "--topics",
        metavar="T1,T2",
        help="with --from chatterbot-topics: only these topic files (e.g. ai,coding,emotion; default all 21)",
    )
    p.add_argument("--name", default="", help="dataset name (default: stem of the first input, or the corpus name)")
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "chat", "prompt_completion", "alpaca", "preference", "classification"],
        help="record shape (default: detected from the fields)",
    )
    p.add_argument(
        "--base",
        default=None,
        metavar="MODEL",
        help="base model folder or known name whose tokenizer/chat template measure lengths (default smollm2-135m-instruct)",
    )
    p.add_argument("--min-tokens", type=int, default=1, help="drop conversations shorter than this (default 1)")
    p.add_argument("--max-tokens", type=int, default=2048, help="drop conversations longer than this (default 2048)")
    p.add_argument(
        "--split",
        default="80/10/10",
        metavar="T/V/T",
        help="train/validation/test percentages or fractions (default 80/10/10)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the deterministic split (default 0)")
    p.add_argument(
        "--stratify",
        metavar="FIELD",
        help="keep the split proportions within each value of this input field (classification rows: label, "
        "unless another field is named)",
    )
    p.add_argument("--no-scrub", dest="scrub", action="store_false", help="keep PII (emails, phones, cards, IPs) as is")
    p.add_argument(
        "--no-near-dedup",
        dest="near_dedup",
        action="store_false",
        help="drop only exact duplicates, not near duplicates (case/punctuation/spacing)",
    )
    p.add_argument(
        "--skip-invalid", action="store_true", help="skip and count malformed JSONL lines instead of failing"
    )
    p.add_argument(
        "--field-map",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="rename an input field before detection, e.g. question=prompt (repeatable)",
    )
    p.add_argument("--system", help="system prompt added to conversations that have none")
    p.add_argument("--json", action="store_true", help="print the registered dataset (with its card) as JSON")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(handler=cmd_prepare)

    p = g.add_parser("list", help="list registered datasets")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_list)

    p = g.add_parser("show", help="show one dataset: card (counts per cleaning step), source, lineage, sample rows")
    p.add_argument("ref", help="dataset id (name@hash), name (newest) or hash prefix")
    p.add_argument("--rows", type=int, default=3, help="sample rows to print from the train split (default 3)")
    p.set_defaults(handler=cmd_show)

    p = g.add_parser(
        "corpus",
        help="write a bundled corpus (chatterbot-corpus, chatterbot-topics, chitchat-dataset) as JSONL",
        description="Write a corpus from an installed PyPI package as JSONL: chatterbot-corpus gives chat rows "
        'with a topic field, chatterbot-topics gives {"text", "label"} rows (each question labelled by its topic), '
        'chitchat-dataset gives {"prompt": ...} rows (production-like prompts). '
        "Example: tuneloop data corpus chatterbot-corpus -o chatterbot.jsonl",
    )
    p.add_argument("corpus", choices=["chatterbot-corpus", "chatterbot-topics", "chitchat-dataset"])
    p.add_argument("-o", "--output", required=True, help="JSONL file to write")
    p.add_argument("--limit", type=int, help="at most this many rows")
    p.set_defaults(handler=cmd_corpus)


def parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = [float(x) for x in text.replace(",", "/").split("/")]
    except ValueError:
        parts = []
    if len(parts) != 3 or any(x < 0 for x in parts) or sum(parts) <= 0:
        raise UserError(f"--split wants three non-negative numbers like 80/10/10, got {text!r}")
    total = sum(parts)
    return (parts[0] / total, parts[1] / total, parts[2] / total)


def parse_field_map(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items:
        old, sep, new = it.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise UserError(f"--field-map wants OLD=NEW, got {it!r}")
        out[old.strip()] = new.strip()
    return out


def cmd_prepare(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.trainer.bootstrap import DEFAULT_BASE
    from tuneloop.trainer.prepare import PrepareConfig, prepare, summary_lines

    if args.topics and not args.corpus:
        raise UserError("--topics selects topics of --from chatterbot-topics")
    if args.corpus and args.inputs:
        raise UserError("give either input files or --from CORPUS, not both")
    if not args.corpus and not args.inputs:
        raise UserError("no input: name JSONL/CSV files or a datasets folder, or use --from chatterbot-corpus")
    opts = dict(
        format=args.format,
        base=args.base or DEFAULT_BASE,
        min_tokens=args.min_tokens,
        max_tokens=args.max_tokens,
        split=parse_split(args.split),
        seed=args.seed,
        scrub=args.scrub,
        near_dedup=args.near_dedup,
        skip_invalid=args.skip_invalid,
        field_map=parse_field_map(args.field_map),
        system=args.system,
    )
    if args.corpus:
        from tuneloop.trainer.corpora import corpus_name, prepare_corpus

        name = corpus_name(args.corpus)
        opts.pop("base")
        if args.stratify:
            opts["stratify"] = args.stratify
        if args.topics:
            if name != "chatterbot-topics":
                raise UserError("--topics selects topics of --from chatterbot-topics")
            opts["topics"] = [t.strip() for t in args.topics.split(",") if t.strip()]
        rec = prepare_corpus(
            ctx.db,
            ctx.settings,
            name,
            name=args.name or name,
            base=args.base or DEFAULT_BASE,
            progress=args.progress,
            **opts,
        )
    else:
        cfg = PrepareConfig(inputs=list(args.inputs), name=args.name, stratify=args.stratify, **opts)
        rec = prepare(ctx.db, ctx.settings, cfg, progress=args.progress)
    if args.json:
        print(json.dumps(_record_dict(rec), indent=2, default=str))
    else:
        print("\n".join(summary_lines(rec)))
    return 0


def _record_dict(rec: DatasetRecord) -> dict[str, Any]:
    return {
        "id": rec.id,
        "name": rec.name,
        "kind": rec.kind,
        "path": rec.path,
        "content_hash": rec.content_hash,
        "rows": {"train": rec.rows_train, "validation": rec.rows_validation, "test": rec.rows_test},
        "created_at": str(rec.created_at),
        "source": rec.source,
        "parent_ids": rec.parent_ids,
        "card": rec.card,
    }


def cmd_list(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.registry import list_datasets
    from tuneloop.table import print_table

    rows = list_datasets(ctx.db)
    if args.json:
        print(
            json.dumps([{k: v for k, v in _record_dict(r).items() if k != "card"} for r in rows], indent=2, default=str)
        )
        return 0
    if not rows:
        print("no datasets registered yet (create one with `tuneloop data prepare`)")
        return 0
    print_table(
        ["id", "kind", "train", "validation", "test", "parents", "created_at"],
        [
            [
                r.id,
                r.kind,
                r.rows_train,
                r.rows_validation,
                r.rows_test,
                ",".join(r.parent_ids) or "-",
                str(r.created_at)[:19],
            ]
            for r in rows
        ],
    )
    return 0


def cmd_show(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.dataset_store import load_splits, row_origins
    from tuneloop.registry import get_dataset

    rec = get_dataset(ctx.db, args.ref)
    out = _record_dict(rec)
    out["origins"] = row_origins(ctx.db, rec.id)
    if args.rows > 0:
        try:
            train = load_splits(ctx.db, rec.id)["train"]
            out["sample"] = [train[i] for i in range(min(args.rows, train.num_rows))]
        except FileNotFoundError:
            print(f"warning: the data folder {rec.path} is missing", file=sys.stderr)
    print(json.dumps(out, indent=2, default=str, ensure_ascii=False))
    return 0


def cmd_corpus(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.trainer.corpora import corpus_rows, write_jsonl

    rows = corpus_rows(args.corpus)
    if args.limit is not None:
        rows = rows[: max(args.limit, 0)]
    n = write_jsonl(rows, args.output)
    print(f"wrote {n} rows to {args.output}")
    return 0
