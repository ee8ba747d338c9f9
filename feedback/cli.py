"""CLI of the feedback area: ``tuneloop feedback sample|list``, ``tuneloop data synthesize`` and ``tuneloop lineage``.

Only light imports at module level, so ``tuneloop --help`` stays fast; the work
(:mod:`tuneloop.feedback.sample`, :mod:`tuneloop.lineage`) is imported in the handlers.
Every command works on either backend (``database.url``): ``feedback list`` is one portable
SELECT, ``feedback sample`` reads the log through its DuckDB analytics connection.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from tuneloop.cli import add_group

if TYPE_CHECKING:  # pragma: no cover
    from tuneloop.cli import Context
    from tuneloop.feedback.sample import SampleConfig

SAMPLE_EPILOG = """\
strategies (combinable; NAME=SHARE, shares are normalised):
  feedback     corrections first (they become SFT targets and DPO pairs), then thumbs-up responses
               (--task classification: feedback labels first, then thumbs-up predictions)
  low-confidence  --task classification only: the least confident predictions first (lowest top probability)
  drift        weighted towards requests far from the serving version's training data
  stratified   balanced over model version x length tercile x topic cluster (k-means)
  random       uniform

examples:
  tuneloop feedback sample --window 1h
  tuneloop feedback sample --name support-v2 --strategy feedback=0.5 --strategy drift=0.3 --strategy random=0.2 \\
      --limit 500 --replay-from chatterbot --replay-fraction 0.2
  tuneloop feedback sample --since 2026-11-01T00:00 --until 2026-11-02T00:00 --version chat-v1
  tuneloop feedback sample --from-parquet /mnt/logs   # every replica's `tuneloop export logs` output
  tuneloop feedback sample --task classification --name intents-v2 --strategy feedback --strategy low-confidence
"""


def register(sub: argparse._SubParsersAction) -> None:
    g = add_group(sub, "feedback", "turn production requests and feedback into new training sets")
    p = g.add_parser(
        "sample",
        help="sample logged requests + feedback into a registered SFT (and DPO) or classification dataset",
        description="Sample the request log (with its feedback) into a new registered dataset: filters "
        "(errors, aborts, truncated, thumbs-down), PII scrub, dedup (within and against "
        "earlier sets), strategies with quotas, replay against forgetting, a seeded split. "
        "Corrections become SFT targets and DPO pairs (written as '<name>-pref'). With --task classification "
        "the classify traffic becomes a classification dataset: the feedback label when given, the predicted "
        "label of a thumbs-up; thumbs-down without a label and unrated requests are left out.",
        epilog=SAMPLE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--name", default="production", help="dataset name (default: production)")
    p.add_argument(
        "--task",
        choices=("chat", "classification"),
        default="chat",
        help="chat: SFT/DPO/KTO sets from chat traffic (default); classification: a classification set from "
        "classify traffic",
    )
    p.add_argument(
        "--strategy",
        action="append",
        metavar="NAME[=SHARE]",
        help="feedback, low-confidence, drift, stratified, random (repeatable; default feedback=0.5 stratified=0.5)",
    )
    p.add_argument("--limit", type=int, default=1000, help="most production rows (default 1000)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--window", metavar="DURATION", help="only the last DURATION (30m, 1h, 2d)")
    w.add_argument("--since", metavar="TIME", help="only requests at/after TIME (ISO-8601 UTC, or -2h)")
    p.add_argument("--until", metavar="TIME", help="only requests before TIME (default now)")
    p.add_argument("--version", dest="model_version", metavar="VERSION", help="only requests served by this version")
    p.add_argument("--no-scrub", action="store_true", help="keep PII (emails, phones, cards, IPs) — not recommended")
    p.add_argument(
        "--dedup-against",
        action="append",
        metavar="DATASET",
        help="dedup against these datasets (repeatable; default: every registered dataset of the task's kind)",
    )
    p.add_argument("--no-dedup-against", action="store_true", help="do not dedup against earlier datasets")
    p.add_argument("--replay-from", metavar="DATASET", help="mix back train rows of this dataset against forgetting")
    p.add_argument(
        "--replay-fraction",
        type=float,
        default=0.0,
        help="share of the final train split from --replay-from (e.g. 0.2)",
    )
    p.add_argument("--validation-fraction", type=float, default=0.1, help="held-out validation share (default 0.1)")
    p.add_argument("--test-fraction", type=float, default=0.1, help="held-out test share (default 0.1)")
    p.add_argument("--topics", type=int, default=8, help="topic clusters for 'stratified' (default 8)")
    p.add_argument("--no-preference", action="store_true", help="do not write the DPO preference dataset")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument(
        "--from-parquet",
        metavar="DIR",
        help="read requests and feedback from Parquet exports of many replicas (`tuneloop export logs "
        "--out DIR`, a folder or s3:// URL) instead of this database; datasets are still registered "
        "in the database",
    )
    p.add_argument("--json", action="store_true", help="print the data card as JSON")
    p.set_defaults(handler=cmd_sample)
    _register_synthesize(sub)

    p = g.add_parser("list", help="list recent feedback with the rated request's version")
    p.add_argument("--limit", type=int, default=20, help="rows (default 20)")
    p.set_defaults(handler=cmd_list)

    p = sub.add_parser(
        "lineage",
        help="trace a request or a model version through datasets and versions",
        description="Given a request id: the version that served it, that version's dataset and the "
        "requests it was built from, parent versions; and the datasets/versions the request "
        "itself went into. Given a version: its chain back to the base model.",
    )
    p.add_argument("ref", metavar="REQUEST_ID|VERSION")
    p.add_argument("--json", action="store_true", help="full JSON (all source request ids)")
    p.set_defaults(handler=cmd_lineage)


def build_config(args: argparse.Namespace) -> SampleConfig:
    """The :class:`~tuneloop.feedback.sample.SampleConfig` of ``tuneloop feedback sample``'s arguments."""
    from tuneloop.feedback.sample import SampleConfig
    from tuneloop.feedback.strategies import parse_strategies
    from tuneloop.timeparse import parse_time

    return SampleConfig(
        name=args.name,
        task=args.task,
        strategies=parse_strategies(args.strategy),
        limit=args.limit,
        since=parse_time(args.since) if args.since else None,
        until=parse_time(args.until) if args.until else None,
        window=args.window,
        model_version=args.model_version,
        scrub_pii=not args.no_scrub,
        dedup_against=[] if args.no_dedup_against else args.dedup_against,
        replay_from=args.replay_from,
        replay_fraction=args.replay_fraction,
        validation_fraction=args.validation_fraction,
        test_fraction=args.test_fraction,
        topics=args.topics,
        preference=not args.no_preference,
        seed=args.seed,
        from_parquet=args.from_parquet,
    )


def cmd_sample(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.feedback.sample import sample

    cfg = build_config(args)
    res = sample(ctx.db, ctx.settings.paths.home_path, cfg, progress=not args.json)
    if args.json:
        print(
            json.dumps(
                {
                    "dataset": res.sft.id,
                    "preference_dataset": res.preference.id if res.preference else None,
                    "card": res.card,
                },
                indent=2,
                default=str,
            )
        )
        return 0
    c = res.card["counts"]
    if cfg.task == "classification":
        _print_classification(res.sft, res.card)
        return 0
    print(
        f"dataset {res.sft.id}: train {res.sft.rows_train}, validation {res.sft.rows_validation}, test {res.sft.rows_test}"
    )
    print(
        f"  from {c['requests_in_window']} requests: {c['after_filters']} passed filters "
        f"(errors {c['error']}, aborted {c['aborted']}, truncated {c['truncated']}, thumbs-down {c['negative_feedback']}), "
        f"{c['duplicates_within']} duplicates, {c['duplicates_of_earlier_sets']} seen in earlier sets, "
        f"{c['picked']} picked, {c['replay']} replayed"
    )
    print("  strategies: " + ", ".join(f"{k} {v['picked']}/{v['quota']}" for k, v in res.card["per_strategy"].items()))
    pii = {k[4:]: v for k, v in c.items() if k.startswith("pii_")}
    if pii:
        print("  PII scrubbed: " + ", ".join(f"{k} {v}" for k, v in pii.items()))
    if res.preference:
        print(
            f"preference dataset {res.preference.id}: {res.preference.rows_train + res.preference.rows_validation + res.preference.rows_test} pairs"
        )
    for n in res.card["notes"]:
        print(f"  note: {n}")
    return 0


def _print_classification(rec: Any, card: dict[str, Any]) -> None:
    c, fb = card["counts"], card["feedback"]
    print(f"dataset {rec.id}: train {rec.rows_train}, validation {rec.rows_validation}, test {rec.rows_test}")
    print(
        f"  from {c['requests_in_window']} classify requests: {c['after_filters']} passed filters "
        f"(errors {c['error']}, aborted {c['aborted']}, thumbs-down without label {c['negative_feedback']}, "
        f"unrated {c['unrated']}), {c['duplicates_within']} duplicates, {c['duplicates_of_earlier_sets']} seen in "
        f"earlier sets, {c['picked']} picked, {c['replay']} replayed"
    )
    print(
        f"  feedback: {fb['labels_given']} labels ({fb['labels_corrected']} corrected, {fb['labels_confirmed']} "
        f"confirmed), {fb['thumbs_up']} thumbs-up"
    )
    print("  labels (train): " + ", ".join(f"{k} {v}" for k, v in card["labels"].items()))
    print("  strategies: " + ", ".join(f"{k} {v['picked']}/{v['quota']}" for k, v in card["per_strategy"].items()))
    for n in card["notes"]:
        print(f"  note: {n}")


def cmd_list(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.store_feedback import recent_feedback
    from tuneloop.table import print_table

    rows = recent_feedback(ctx.db, args.limit)
    if not rows:
        print("no feedback yet (clients post it to /v1/feedback)")
        return 0
    print_table(
        ["created_at", "request_id", "version", "rating", "kind", "correction", "label", "comment"],
        [
            [
                str(r["created_at"])[:19],
                r["request_id"],
                r["model_version"],
                r["rating"],
                r["rating_kind"],
                r["correction"],
                r["label"] or "",
                (r["comment"] or "")[:40],
            ]
            for r in rows
        ],
    )
    return 0


def cmd_lineage(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.lineage import lineage

    info = lineage(ctx.db, args.ref)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    if "request" in info:
        r = info["request"]
        print(f"request {r['id']} ({r['received_at']}, status {r['status']}, arm {r['arm']})")
        print(f"  served by: {r['model_version'] or '-'}")
        _print_chain(info["served_by"], indent="  ")
        if info["used_in_datasets"]:
            print(
                "  used in datasets: "
                + ", ".join(f"{u['dataset_id']} ({u['split']}, {u['origin']})" for u in info["used_in_datasets"])
            )
        else:
            print("  used in datasets: none yet")
        if info["trained_versions"]:
            print("  trained into: " + ", ".join(f"{v['name']} ({v['stage']})" for v in info["trained_versions"]))
    else:
        print(f"version {info['version']}")
        _print_chain(info["chain"], indent="  ")
    return 0


def _print_chain(chain: list[dict[str, Any]], indent: str) -> None:
    for e in chain:
        if not e.get("registered", True):
            print(f"{indent}{e['version']} (not registered)")
            continue
        print(f"{indent}{e['version']} [{e['kind']}, {e['stage']}] base {e['base_model']}, run {e['run_id'] or '-'}")
        d = e.get("dataset")
        if d:
            _print_dataset(d, indent + "  ")


def _print_dataset(d: dict[str, Any], indent: str) -> None:
    origins = ", ".join(f"{k} {v}" for k, v in d["rows_by_origin"].items())
    print(f"{indent}dataset {d['id']} ({origins}); built from {len(d['source_requests'])} logged request(s)")
    for p in d["parents"]:
        _print_dataset(p, indent + "  ")


SYNTH_EPILOG = """\
modes:
  paraphrase     reword the last user message of --source rows; the answer is kept
  self-instruct  new request + answer pairs for --task, three --source rows as examples each time
  teacher        answer the window's thumbs-down prompts (no correction) with the generator (a stronger model,
                 or the served one with a better --system prompt)
  targeted       seeds from the drifted slice: the window's prompts farthest from the training data; each seed
                 answered, the rest of --count new requests on their topics; the card lists the new words

Every request carries X-Tuneloop-Origin: synthetic, so tuneloop's server never logs it as production.
Quality controls, each counted in the card: generation errors, unparseable JSON, a rule filter, PII scrub,
dedup (within, and against every earlier SFT set), the optional --judge. Rows are origin=synthetic with a
provenance column, and go to the train split only (never validation or test).

examples:
  tuneloop data synthesize --mode teacher --endpoint https://teacher.example/v1 --model big-model --api-key $KEY
  tuneloop data synthesize --mode targeted --window 24h --seeds 10 --count 40 --judge --name drifted-1
  tuneloop data synthesize --mode paraphrase --source support --count 100 --name support-para
  tuneloop data synthesize --mode self-instruct --source support --task "answer billing questions" --count 50
"""


def _register_synthesize(sub: argparse._SubParsersAction) -> None:
    from tuneloop.feedback.synthesize import MODES

    g = add_group(sub, "data", "prepare, inspect and generate datasets")
    p = g.add_parser(
        "synthesize",
        help="generate synthetic training rows through an OpenAI-compatible endpoint, aimed at what production lacks",
        description="Generate rows with a model behind an OpenAI-compatible endpoint (tuneloop serve by default, "
        "or any teacher), run them through the quality controls and save them as a registered SFT dataset "
        "whose rows are all synthetic, train split only. Feed it to training with "
        "`tuneloop train --dataset NAME` or mix it in (`--mix`).",
        epilog=SYNTH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--mode", required=True, choices=MODES, help="how rows are made (see below)")
    p.add_argument("--name", default="synthetic", help="dataset name (default: synthetic)")
    p.add_argument(
        "--endpoint",
        default=None,
        help="OpenAI-compatible base URL (default: this machine's tuneloop serve, http://HOST:PORT/v1 from settings)",
    )
    p.add_argument("--model", default="production", help="generator model at the endpoint (default: production)")
    p.add_argument("--api-key", default=None, help="the endpoint's API key (default: $OPENAI_API_KEY)")
    p.add_argument("--source", default=None, help="paraphrase / self-instruct: the dataset whose train rows seed it")
    p.add_argument("--task", default=None, help="self-instruct (required) / targeted: what the assistant is for")
    p.add_argument("--window", default="7d", help="teacher / targeted: production window, e.g. 24h (default 7d)")
    p.add_argument("--version", default=None, help="teacher / targeted: only this served version's requests")
    p.add_argument("--count", type=int, default=50, help="rows to generate before filtering (default 50)")
    p.add_argument("--seeds", type=int, default=10, help="targeted: the most drifted prompts used (default 10)")
    p.add_argument("--system", default=None, help="teacher / targeted / self-instruct: system prompt for the generator")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--max-tokens", type=int, default=256, help="token budget of one generation (default 256)")
    p.add_argument("--judge", action="store_true", help="rate each row 1-5 with the judge model and filter")
    p.add_argument("--judge-model", default=None, help="judge model at the endpoint (default: --model)")
    p.add_argument("--judge-threshold", type=int, default=3, help="lowest judge score kept, 1-5 (default 3)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random choices (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the dataset id and card as JSON")
    p.set_defaults(handler=cmd_synthesize)


def cmd_synthesize(args: argparse.Namespace, ctx: Context) -> int:
    import os

    from tuneloop.feedback.synthesize import SynthesizeConfig, synthesize

    cfg = SynthesizeConfig(
        mode=args.mode,
        name=args.name,
        endpoint=args.endpoint or ctx.settings.server.local_api_url,
        model=args.model,
        api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
        source=args.source,
        task=args.task,
        window=args.window,
        version=args.version,
        count=args.count,
        seeds=args.seeds,
        system=args.system,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        judge=args.judge,
        judge_model=args.judge_model,
        judge_threshold=args.judge_threshold,
        concurrency=args.concurrency,
        seed=args.seed,
    )
    quiet = args.json or args.no_progress
    res = synthesize(
        ctx.db, ctx.settings.paths.home_path, cfg, progress=not quiet, say=(lambda m: None) if args.json else print
    )
    if args.json:
        from tuneloop.dataset_store import load_card

        print(json.dumps({"dataset": res.record.id, "card": load_card(ctx.db, res.record.id)}, indent=2, default=str))
        return 0
    c = res.counts
    print(f"dataset {res.record.id}: {c['rows']} synthetic rows (train only)")
    print(
        f"  generated {c['generated']} of {c['generated'] + c['generation_errors'] + c['unparseable']}: "
        f"errors {c['generation_errors']}, unparseable {c['unparseable']}, rule filter {c['rule_rejected']}, "
        f"duplicates {c['duplicates_within']} within / {c['duplicates_earlier']} earlier, judge {c['judge_rejected']}"
    )
    for n in res.notes:
        print(f"  note: {n}")
    return 0
