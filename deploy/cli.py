"""CLI of the deploy area: ``tuneloop eval``, ``tuneloop deploy gate|canary|promote|rollback|status``, ``tuneloop loop``, ``tuneloop demo``.

Only light imports at module level (see tuneloop.cli); work happens in handlers.
Exit codes: 0 success, 1 a gate refused the candidate / a canary was rolled back,
2 a usage error (``error: ...``). Deploy state is read and changed through the
storage layer (:mod:`tuneloop.store_deploy`, :mod:`tuneloop.registry`), so every
command works the same on the DuckDB file and on a shared PostgreSQL, and a
promote, canary or rollback racing a server replica's judge is decided once.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
from typing import TYPE_CHECKING, Any

from tuneloop.cli import add_group
from tuneloop.deploy import cli_export

if TYPE_CHECKING:
    from tuneloop.cli import Context
    from tuneloop.db import Database
    from tuneloop.settings import DeploySettings


def _actor() -> str:
    try:
        return os.environ.get("TUNELOOP_ACTOR") or getpass.getuser()
    except Exception:
        return "tuneloop"


def register(sub: argparse._SubParsersAction) -> None:
    _register_eval(sub)
    g = add_group(sub, "deploy", "eval gate, canary, promote, rollback and the deploy state")

    p = g.add_parser(
        "gate",
        help="evaluate a candidate against production (or its base) and pass/refuse it",
        description="Evaluate VERSION and the production version (the base model if none) on the held-out "
        "split of VERSION's dataset (and golden prompts / a general set when given); pass when the "
        "lower bound of the paired-bootstrap 95% CI of the per-example metric "
        "(deploy.gate_metric) is >= -deploy.gate_min_delta, general-set perplexity rose by at most "
        "deploy.gate_max_forgetting, and golden prompts pass. With --per-task (deploy.gate_per_task), a candidate "
        "trained on a multi-task mix (train datasets=) must also not regress on any input dataset's test split "
        "(margin deploy.gate_task_min_delta). Exit 1 when refused.",
        epilog="examples:\n  tuneloop deploy gate chat-v2\n  tuneloop deploy gate chat-v2 --golden golden.jsonl --limit 200\n"
        "  tuneloop deploy gate mixed-v1 --per-task   (no regression on each task of its mix)\n"
        "  tuneloop deploy gate chat-v2 --report 01a2...   (judge an existing eval report)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("version", help="candidate version")
    p.add_argument("--dataset", help="dataset whose test split is used (default: the candidate's own dataset)")
    p.add_argument("--golden", metavar="FILE", help="golden prompts file (JSONL)")
    p.add_argument("--general", metavar="FILE", help="general text/chat set to measure forgetting")
    p.add_argument("--limit", type=int, help="evaluate at most this many examples")
    p.add_argument("--report", metavar="EVAL_REPORT_ID", help="judge a stored eval report instead of evaluating again")
    p.add_argument(
        "--per-task",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="for a candidate trained on a mix (train datasets=), also require no regression on each input dataset's "
        "test split (default: deploy.gate_per_task)",
    )
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    p.set_defaults(handler=cmd_gate)

    p = g.add_parser(
        "canary",
        help="start a canary (a share of production traffic) and optionally watch and decide",
        description="Start a canary: VERSION takes --share of the requests for 'production' (sticky per user "
        "or key; the server re-reads this within server.state_refresh_s). With --watch, judge "
        "the arms from the request log and feedback every --poll seconds with a sequential test and "
        "promote or roll back by itself: at once when the canary is worse with confidence, early when it "
        "is better (after deploy.canary_min_requests requests), else at the budget "
        "(deploy.canary_max_requests or deploy.canary_max_minutes) by non-inferiority. "
        "Without VERSION, --watch watches the canary already running.",
        epilog="examples:\n  tuneloop deploy canary chat-v2 --share 0.1\n  tuneloop deploy canary chat-v2 --watch\n"
        "  tuneloop deploy canary --watch --timeout 1800",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("version", nargs="?", help="candidate version (must have passed the gate)")
    p.add_argument("--share", type=float, help="share of production traffic (default deploy.canary_share)")
    p.add_argument("--watch", action="store_true", help="poll, judge and promote/roll back by itself")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between judgements with --watch (default 5)")
    p.add_argument("--timeout", type=float, help="give up watching after this many seconds (the canary keeps running)")
    p.add_argument("--force", action="store_true", help="skip the passed-gate requirement")
    p.add_argument("--reason", default="", help="why (recorded in the deploy history)")
    p.set_defaults(handler=cmd_canary)

    p = g.add_parser(
        "promote",
        help="promote the running canary, or a gated version directly, to production",
        description="Without VERSION (or with the canary's version): promote the running canary. With "
        "another VERSION and no canary: put it in production directly (it must have passed the "
        "gate). The previous production version is retired in the same transaction.",
    )
    p.add_argument("version", nargs="?", help="version to promote (default: the running canary)")
    p.add_argument("--force", action="store_true", help="skip the passed-gate requirement")
    p.add_argument("--reason", default="manual promote", help="why (recorded in the deploy history)")
    p.set_defaults(handler=cmd_promote)

    p = g.add_parser(
        "rollback",
        help="roll back the running canary, or restore the previous production version",
        description="With a canary running: retire it (production keeps serving). Otherwise: put the "
        "version that was in production before the current one back (or --to VERSION), "
        "atomically.",
    )
    p.add_argument("--to", metavar="VERSION", help="restore this version instead of the previous one")
    p.add_argument(
        "--task",
        choices=("chat", "classification"),
        default="chat",
        help="whose canary or production to roll back: stages are held per task (default chat; with --to, the "
        "task of that version)",
    )
    p.add_argument("--reason", default="manual rollback", help="why (recorded in the deploy history)")
    p.set_defaults(handler=cmd_rollback)

    p = g.add_parser("status", help="production and canary versions, live canary numbers, recent deploy events")
    p.add_argument("--events", type=int, default=10, help="recent events to show (default 10)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_status)

    _register_loop(sub)
    _register_demo(sub)
    cli_export.register(sub)


# ---- gate -------------------------------------------------------------------------------


def cmd_gate(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.deploy.gate import GateError, judge_report, record_verdict, run_gate
    from tuneloop.registry import find_eval_report, get_version

    db = ctx.db
    get_version(db, args.version)
    if args.report and args.per_task:
        raise GateError("--per-task evaluates each task's test split, so it cannot judge a stored --report")
    if args.report:
        found = find_eval_report(db, args.report)
        if found is None:
            raise GateError(f"unknown eval report {args.report!r}")
        rep = found["report"]
        rep.setdefault("id", found["id"])
        models = list(rep.get("models") or [])
        if args.version not in models or len(models) < 2:
            raise GateError(f"eval report {found['id']} compares {models}, not {args.version} against a baseline")
        baseline = next(m for m in models if m != args.version)
        result = judge_report(rep, args.version, baseline, ctx.settings.deploy)
        record_verdict(db, args.version, result, actor=_actor())
    else:
        result = run_gate(
            db,
            ctx.settings,
            args.version,
            dataset=args.dataset,
            golden=args.golden,
            general=args.general,
            limit=args.limit,
            actor=_actor(),
            per_task=args.per_task,
        )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print(result.message())
    return 0 if result.passed else 1


# ---- canary / promote / rollback -----------------------------------------------------------


def cmd_canary(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.monitoring import canary

    db, deploy = ctx.db, ctx.settings.deploy
    if args.version:
        if not args.force:
            from tuneloop.deploy.gate import require_passed

            require_passed(db, args.version)
        c = canary.start(
            db,
            args.version,
            args.share if args.share is not None else deploy.canary_share,
            actor=_actor(),
            reason=args.reason,
        )
        print(f"canary {c.id}: {c.candidate} takes {c.share:.0%} of production traffic (production: {c.production})")
    elif not args.watch:
        raise canary.CanaryError("name the VERSION to start a canary, or pass --watch to watch the running one")
    if not args.watch:
        return 0
    c = canary.get(db, None)
    print(
        f"watching canary {c.id} ({c.candidate} vs {c.production}); sequential test at alpha {deploy.canary_alpha:g}, "
        f"promotion from {deploy.canary_min_requests} canary requests, budget {deploy.canary_max_requests} "
        f"requests or {deploy.canary_max_minutes:g} min"
    )
    d = canary.watch(
        db,
        c.id,
        deploy,
        poll_s=args.poll,
        timeout_s=args.timeout,
        on_tick=lambda d: print(d.summary(), flush=True),
        actor=_actor(),
    )
    print(f"{'promoted' if d.action == 'promote' else 'rolled back'} {c.candidate}: {'; '.join(d.reasons)}")
    return 0 if d.action == "promote" else 1


def cmd_promote(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.monitoring import canary
    from tuneloop.registry import get_version
    from tuneloop.store_deploy import promote_version

    db = ctx.db
    run = canary.running(db)
    if run is not None and (args.version in (None, run.candidate)):
        c = canary.promote(db, run.id, actor=_actor(), reason=args.reason)
        print(f"promoted canary {c.candidate} to production (retired {c.production})")
        return 0
    if run is not None:
        raise canary.CanaryError(
            f"canary {run.candidate} is running: promote or roll it back before promoting {args.version}"
        )
    if not args.version:
        raise canary.CanaryError("no canary is running: name the VERSION to promote")
    v = get_version(db, args.version)
    if v.stage == "production":
        print(f"{v.name} is already in production")
        return 0
    gate = None
    if not args.force:
        from tuneloop.deploy.gate import require_passed

        gate = require_passed(db, v.name)
    prev = promote_version(
        db,
        v.name,
        actor=_actor(),
        reason=args.reason,
        details={"gate": {"baseline": gate.get("baseline"), "passed": True} if gate else "forced"},
    )
    print(f"promoted {v.name} to production" + (f" (retired {prev})" if prev else ""))
    return 0


def cmd_rollback(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.monitoring import canary

    db = ctx.db
    task = args.task
    if args.to:
        from tuneloop.registry import get_version

        task = get_version(db, args.to).task
    run = canary.running(db, task=task)
    if run is not None:
        if args.to:
            raise canary.CanaryError(
                "a canary is running: `deploy rollback` rolls the canary back; --to applies without one"
            )
        c = canary.rollback(db, run.id, actor=_actor(), reason=args.reason)
        print(f"rolled back canary {c.candidate}; {c.production} keeps serving production")
        return 0
    retired, restored = canary.rollback_production(db, actor=_actor(), reason=args.reason, to=args.to, task=task)
    print(f"rolled back {retired}; {restored} is in production again")
    return 0


def status(db: Database, deploy: DeploySettings, events: int = 10) -> dict[str, Any]:
    """Deploy state as a dict (production, canary + live judgement, recent events)."""
    from tuneloop.monitoring import canary
    from tuneloop.registry import version_by_stage
    from tuneloop.store_deploy import recent_events

    prod = version_by_stage(db, "production")
    out: dict[str, Any] = {"production": prod.name if prod else None, "canary": None}
    cls_prod, cls_run = version_by_stage(db, "production", task="classification"), canary.running(db, "classification")
    if cls_prod is not None or cls_run is not None:  # stages are per task: a classifier has its own production
        out["classification"] = {
            "production": cls_prod.name if cls_prod else None,
            "canary": {"id": cls_run.id, "candidate": cls_run.candidate, "share": cls_run.share} if cls_run else None,
        }
    run = canary.running(db, task="chat")
    if run is not None:
        d = canary.judge(db, run.id, deploy)
        out["canary"] = {
            "id": run.id,
            "candidate": run.candidate,
            "production": run.production,
            "share": run.share,
            "started_at": str(run.started_at),
            "judgement": d.to_dict(),
            "summary": d.summary(),
        }
    out["events"] = [
        {k: (str(v) if k == "occurred_at" else v) for k, v in e.items()} for e in recent_events(db, events)
    ]
    return out


def cmd_status(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.table import print_table

    st = status(ctx.db, ctx.settings.deploy, args.events)
    if args.json:
        print(json.dumps(st, indent=2, default=str))
        return 0
    print(f"production: {st['production'] or '-'}")
    c = st["canary"]
    if c:
        print(f"canary:     {c['candidate']} at {c['share']:.0%} since {c['started_at'][:19]} ({c['id']})")
        print(f"            {c['summary']}")
    else:
        print("canary:     -")
    cls = st.get("classification")
    if cls:
        can = cls["canary"]
        print(
            f"classifier: {cls['production'] or '-'} in production"
            + (f", canary {can['candidate']} at {can['share']:.0%} ({can['id']})" if can else "")
        )
    if st["events"]:
        print()
        print_table(
            ["occurred_at", "version", "from", "to", "actor", "reason"],
            [
                [
                    e["occurred_at"][:19],
                    e["model_version"],
                    e["from_stage"],
                    e["to_stage"],
                    e["actor"],
                    (e["reason"] or "")[:70],
                ]
                for e in st["events"]
            ],
            title="recent deploy events",
        )
    return 0


# ---- loop and demo (registered here; implemented in deploy.loop / deploy.watch / deploy.demo) ----


def _register_loop(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "loop",
        help="one cycle (or --watch: continuous) of sample -> train -> gate -> canary -> decide",
        description="Run the continuous-training loop: sample production data and feedback into a dataset, "
        "train a new version from the production one, gate it, canary it and promote or roll "
        "back. Every step is recorded in loop_runs; rerunning with --cycle ID resumes an "
        "interrupted cycle, skipping finished steps. --watch keeps cycling, triggered by drift "
        "over threshold, N new feedback items, or a schedule.",
        epilog="examples:\n  tuneloop loop --window 24h --train max_steps=20\n"
        "  tuneloop loop --cycle CYCLE_ID                          # resume an interrupted cycle\n"
        "  tuneloop loop --watch --min-feedback 50 --every 24h\n"
        "  tuneloop loop --train method=kto                        # train on thumbs-up/down\n"
        "  tuneloop loop --train method=auto                       # dpo, kto or sft: what the feedback supports\n"
        "  tuneloop loop --task classification --window 24h        # the production classifier's cycle\n"
        "  tuneloop loop --synthetic-share 0.2                     # + targeted synthetic rows (train split)\n"
        "  tuneloop --set deploy.loop_train_method=auto loop --watch   # global options go before the command\n\n"
        "training objective (--train method=, else deploy.loop_train_method, default sft):\n"
        "  sft   a LoRA on the sampled SFT set: corrections and thumbs-up answers, plus unrated traffic\n"
        "        (a thumbs-down answer without a correction is never an SFT answer)\n"
        "  dpo   a LoRA with DPO on the preference pairs: correction (chosen) vs served response (rejected)\n"
        "  kto   a LoRA with KTO on thumbs-up/corrections (desirable) and thumbs-down (undesirable) answers\n"
        "  auto  dpo with >= deploy.loop_min_pairs pairs, else kto with both thumbs-up and -down, else sft\n"
        "The train step's line shows the objective chosen and why.\n"
        "With --task classification: --train method=feature_extraction|lora|full (sft and auto mean lora); the\n"
        "next classifier starts from the production one.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cycle", help="resume this cycle id (default: a new cycle)")
    p.add_argument(
        "--task",
        choices=("chat", "classification"),
        default="chat",
        help="chat (default): the production chat model's loop; classification: the production classifier's "
        "(classify traffic and label feedback -> the next classifier -> macro-F1 gate -> canary on a classifier "
        "server, judged on label corrections and latency)",
    )
    p.add_argument(
        "--window", default=None, help="sample requests from this window (e.g. 24h; default: since the last cycle)"
    )
    p.add_argument(
        "--strategy", action="append", metavar="NAME[=SHARE]", help="sampling strategies (see `feedback sample --help`)"
    )
    p.add_argument("--limit", type=int, default=1000, help="most production rows to sample (default 1000)")
    p.add_argument(
        "--replay-fraction", type=float, default=0.2, help="replay share of the production version's data (default 0.2)"
    )
    p.add_argument(
        "--train",
        dest="train_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="training config override, e.g. --train max_steps=20; --train method=sft|dpo|kto|auto picks the "
        "objective (default deploy.loop_train_method; repeatable)",
    )
    p.add_argument("--train-config", metavar="FILE", help="training config YAML")
    p.add_argument(
        "--synthetic-share",
        type=float,
        default=0.0,
        help="share of the SFT train split made of targeted synthetic rows (data synthesize --mode targeted on the "
        "window's drifted prompts; train only), default 0",
    )
    p.add_argument(
        "--synthetic-endpoint", default=None, help="OpenAI-compatible generator (default: this machine's server)"
    )
    p.add_argument("--synthetic-model", default="production", help="generator model name (default: production)")
    p.add_argument("--golden", metavar="FILE", help="golden prompts for the gate")
    p.add_argument("--general", metavar="FILE", help="general set for the gate's forgetting check")
    p.add_argument("--eval-limit", type=int, help="evaluate at most this many held-out examples")
    p.add_argument(
        "--canary-timeout",
        type=float,
        default=None,
        help="seconds to wait for the canary decision (default deploy.canary_max_minutes)",
    )
    p.add_argument(
        "--no-canary", action="store_true", help="promote directly after the gate (no live traffic to split)"
    )
    p.add_argument("--watch", action="store_true", help="keep cycling when a trigger fires")
    p.add_argument(
        "--min-feedback", type=int, default=50, help="--watch: new feedback items that trigger a cycle (default 50)"
    )
    p.add_argument("--every", default=None, help="--watch: also run on this schedule (e.g. 24h)")
    p.add_argument("--poll", type=float, default=60.0, help="--watch: seconds between trigger checks (default 60)")
    p.add_argument("--max-cycles", type=int, default=None, help="--watch: stop after this many cycles")
    p.set_defaults(handler=cmd_loop)


def cmd_loop(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.deploy.loop import LoopOptions, run_cycle
    from tuneloop.deploy.watch import watch
    from tuneloop.errors import UserError
    from tuneloop.trainer.evaluate import check_inputs

    if not 0 <= args.synthetic_share < 1:
        raise UserError(f"--synthetic-share must be in [0, 1), got {args.synthetic_share}")
    # the gate reads these after sampling and training: refuse bad files before the cycle starts
    check_inputs(ctx.db, ctx.settings, None, args.golden or ctx.settings.deploy.gate_golden or None, args.general)

    opts = LoopOptions(
        task=args.task,
        window=args.window,
        strategies=args.strategy,
        limit=args.limit,
        replay_fraction=args.replay_fraction,
        synthetic_share=args.synthetic_share,
        synthetic_endpoint=args.synthetic_endpoint,
        synthetic_model=args.synthetic_model,
        train_overrides=args.train_overrides,
        train_config=args.train_config,
        golden=args.golden,
        general=args.general,
        eval_limit=args.eval_limit,
        canary=not args.no_canary,
        canary_timeout_s=args.canary_timeout,
        actor=_actor(),
    )
    if args.watch:
        watch(
            ctx.db,
            ctx.settings,
            opts,
            min_feedback=args.min_feedback,
            every=args.every,
            poll_s=args.poll,
            max_cycles=args.max_cycles,
        )
        return 0
    res = run_cycle(ctx.db, ctx.settings, opts, cycle_id=args.cycle)
    print(res.summary())
    return 0 if res.outcome in ("promoted", "nothing_to_do") else 1


def _register_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole loop, offline, on this machine: train, serve, drift, retrain, canary, promote",
        description="Pull SmolLM2-135M-Instruct, prepare the chatterbot-corpus data, LoRA-train v1, gate "
        "it, serve it, replay drifting traffic (chitchat-dataset) with simulated feedback through "
        "the OpenAI client, detect drift, sample, train v2, gate, canary and promote; ends with "
        "a summary and an HTML report. --tiny runs the same on a tiny random model in minutes.",
        epilog="examples:\n  tuneloop demo\n  tuneloop demo --tiny\n  tuneloop demo --base /path/to/hf-model --steps 10",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tiny", action="store_true", help="use a tiny random Llama (fast; outputs are gibberish)")
    p.add_argument("--base", metavar="PATH", help="base model folder (default: smollm2-135m-instruct)")
    p.add_argument("--steps", type=int, default=None, help="training steps per version (default 30; 4 with --tiny)")
    p.add_argument(
        "--requests", type=int, default=None, help="simulated production requests (default 160; 60 with --tiny)"
    )
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument("--out", metavar="DIR", help="where the report goes (default <home>/reports/demo-<time>)")
    p.add_argument(
        "--offline-only", action="store_true", help="stop after v1 (pull, prepare, train, eval, register): no server"
    )
    p.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.deploy.demo import DemoOptions, run_demo

    opts = DemoOptions(
        tiny=args.tiny,
        base=args.base,
        steps=args.steps,
        requests=args.requests,
        port=args.port,
        out=args.out,
        offline_only=args.offline_only,
    )
    return run_demo(ctx, opts)


# ---- tuneloop eval -------------------------------------------------------------------------------


def _register_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate model versions on a dataset's held-out split (+ golden prompts, forgetting)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare models on the same held-out examples: loss, perplexity, exact match, token F1, ROUGE-L, "
        "golden prompts and general-set perplexity (forgetting). Answers are generated on vLLM's offline engine "
        "(adapters as LoRA requests; deploy.eval_backend), loss on transformers. Prints a table and stores a JSON "
        "report.",
        epilog="examples:\n  tuneloop eval chat-v1 base --dataset chatterbot --limit 50\n"
        "  tuneloop eval chat-v2 chat-v1 --golden golden.yaml --general general.txt\n"
        "  tuneloop eval chat-v1 base --backend transformers",
    )
    p.add_argument("models", nargs="+", help="version names, model folders or 'base' (the first model's base)")
    p.add_argument("--dataset", help="dataset with a test split (default: the first version's dataset)")
    p.add_argument("--golden", help="golden prompts (YAML or JSONL: prompt + expect/regex)")
    p.add_argument(
        "--general", help="general held-out text (.txt, .jsonl with text/messages, or a dataset) for forgetting"
    )
    p.add_argument("--limit", type=int, help="evaluate at most this many test examples")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation budget per example (default 64)")
    p.add_argument(
        "--backend",
        choices=("vllm", "transformers"),
        help="where answers are generated (default: deploy.eval_backend, vllm)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=cmd_eval)


def cmd_eval(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.deploy.gate import eval_generator
    from tuneloop.trainer.evaluate import check_inputs, evaluate, format_report

    check_inputs(ctx.db, ctx.settings, args.models, args.golden, args.general)  # before the engine starts
    with eval_generator(ctx.settings, args.backend) as generator:
        report = evaluate(
            args.models,
            args.dataset,
            ctx.db,
            ctx.settings,
            golden=args.golden,
            general=args.general,
            limit=args.limit,
            max_new_tokens=args.max_new_tokens,
            generator=generator,
        )
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0
