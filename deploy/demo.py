"""``tuneloop demo``: the whole loop, offline, on this machine — production teaches the model a product.

Contract
--------
:func:`run_demo` runs, with progress shown, and returns the exit code. The scenario
(:mod:`tuneloop.deploy.scenario`): a support assistant for Quillnote, a made-up
note-taking app whose fact sheet (prices, refund window, support hours, a coupon
code ...) no model has seen. Simulated: the users, their questions and their ratings.

1. base model: SmolLM2-135M-Instruct (``trainer.bootstrap.pull``), ``--base PATH``,
   or with ``--tiny`` a tiny random Llama built locally;
2. v1 is trained on general chat (the chatterbot-corpus, LoRA) and gated against the
   base model (held-out chatterbot + golden prompts), then promoted to production;
   ``--offline-only`` stops here;
3. serving: ``tuneloop serve`` as a subprocess (``deploy.server_process``);
4. production traffic (``deploy.traffic``): Quillnote customers' questions through
   the official ``openai`` client; each simulated user checks the answer against the
   fact's rule (e.g. it must state ``$11``) and posts to ``/v1/feedback`` a thumbs-up,
   or a thumbs-down with the fact sheet's answer as the correction (what support
   staff would write);
5. drift of v1 over that traffic (``monitoring.drift_job.run_once``);
6. v2: one cycle of the loop (``deploy.loop.run_cycle``, the code ``tuneloop loop``
   runs): sample production + feedback with replay of v1's data -> train v2 ->
   gate vs v1 (production slice, retention on v1's data, golden prompts, shift) ->
   canary on live traffic (the simulated users again) -> judged by the live
   server's sequential judge -> promoted or rolled back;
7. traffic and drift again, for the version now in production;
8. v1 vs v2 on held-out question phrasings never sent or trained on
   (``quillnote-heldout``): task success and its paired 95% CI;
9. a summary table, the targets before/after (``demo_report.scorecard``),
   ``report.html`` (inline SVG plots) and ``summary.json`` (``deploy.demo_report``).

The demo adds settings overrides only where it needs them: a canary judged every
2 s with a traffic budget of the canary round, a 5-point error-rate margin, its
golden prompts as ``deploy.gate_golden``, and with ``--tiny`` (whose outputs are
gibberish) gates that compare held-out loss instead of text metrics. Every demo
version trains LoRA r=16 on all linear layers at lr 1e-3 (:data:`TRAIN`).
It runs on whatever ``database.url`` names (the DuckDB file by default, or a shared
PostgreSQL): deploy state goes through :mod:`tuneloop.store_deploy` and the registry.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.deploy.demo_report import DemoState, finish
from tuneloop.errors import UserError

if TYPE_CHECKING:
    from tuneloop.cli import Context
    from tuneloop.db import Database
    from tuneloop.monitoring.canary import Canary
    from tuneloop.trainer.evaluate import Generator
    from tuneloop.trainer.train import TrainResult

# held-out examples the demo's gates evaluate per model (answers generated on vLLM's offline engine)
GATE_EXAMPLES = 200
CANARY_SHARE = 0.5
# what the demo changes in the settings (besides the --tiny gate tolerance): a judge every 2 s that may decide
# once each arm has 50 rated requests (the sequential test's minimum), within the canary round's traffic
CANARY_OVERRIDES = [
    "deploy.canary_min_requests=50",
    "deploy.canary_max_minutes=10",
    "deploy.canary_judge_interval_s=2",
    # a 2-point error-rate margin cannot be shown on ~70 requests per arm; the demo allows 5 points
    "deploy.canary_max_error_rate_delta=0.05",
    # the fact sheet's answers and chatterbot's replies are short: 48 tokens is plenty to judge them
    "deploy.gate_max_new_tokens=48",
]
# --tiny: gibberish answers cannot be scored by text metrics, so its gates compare held-out loss instead
TINY_OVERRIDES = ["deploy.gate_metric=neg_loss"]
# how every demo version is trained: LoRA r=16 on all linear layers at lr 1e-3, 8 chats per step — enough for
# SmolLM2-135M to learn the fact sheet from the corrections in a few dozen steps on two CPU cores
TRAIN = ["method=lora", "lora.r=16", "lora.alpha=32", "lora.targets=[all-linear]", "learning_rate=1e-3", "batch_size=8"]
# v2 continues v1's adapter (the loop's default) at lr 1.5e-3 with 65% of its rows replayed from v1's data: it
# learns the fact sheet and keeps v1's general chat within the gate's forgetting limit (docs/BENCHMARKS.md)
V2_LEARNING_RATE = "learning_rate=1.5e-3"
V2_REPLAY = 0.65


@dataclass
class DemoOptions:
    tiny: bool = False
    base: str | None = None
    steps: int | None = None
    requests: int | None = None
    port: int = 0
    out: str | None = None
    offline_only: bool = False


class Stages:
    """A progress bar over the stages, a line per stage, and its duration in ``state.timings``."""

    def __init__(self, total: int, state: DemoState):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="demo", unit="stage", file=sys.stderr, leave=True)
        self.state = state

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        self.bar.set_postfix_str(name)
        print(f"\n== {name}", flush=True)
        try:
            yield
        finally:
            self.state.timings[name] = round(time.monotonic() - t0, 1)
        self.bar.update()
        print(f"== {name}: done in {time.monotonic() - t0:.0f} s", flush=True)

    def close(self) -> None:
        self.bar.close()


# ---- steps -------------------------------------------------------------------------------------


def base_model(ctx: Context, opts: DemoOptions) -> Path:
    from tuneloop.trainer.bootstrap import DEFAULT_BASE, build_tiny_model, is_hf_folder, pull

    if opts.base:
        if not is_hf_folder(opts.base):
            raise UserError(f"--base {opts.base} is not a Hugging Face model folder (no config.json)")
        return Path(opts.base).resolve()
    if opts.tiny:
        dest = ctx.settings.paths.models_path / "tiny-llama-demo"
        if not (dest / ".complete").is_file():
            build_tiny_model(dest)
        return dest
    return Path(pull(DEFAULT_BASE, ctx.settings.paths.models_path))


def prepare_chatterbot(ctx: Context, base: Path, name: str = "chatterbot") -> str:
    """The chatterbot-corpus as a registered SFT dataset; returns its id."""
    from tuneloop.trainer import corpora

    # a 20% test split (about 245 rows), so the first gate evaluates GATE_EXAMPLES held-out examples per model
    rec = corpora.prepare_corpus(ctx.db, ctx.settings, "chatterbot", name=name, base=str(base), split=(0.75, 0.05, 0.2))
    return str(rec.id)


def train_version(ctx: Context, base: Path, dataset: str, name: str, steps: int) -> TrainResult:
    from tuneloop.deploy.loop import LoopOptions, build_train_config
    from tuneloop.trainer.train import train

    cfg = build_train_config(LoopOptions(train_overrides=train_overrides(steps)), str(base), dataset, name, None)
    return train(cfg, ctx.db, ctx.settings, progress=True)


def train_overrides(steps: int) -> list[str]:
    """Training settings of every demo version (:data:`TRAIN`) for ``steps`` steps."""
    return [*TRAIN, f"max_steps={steps}"]


def heldout_eval(ctx: Context, v1: str, v2: str, generator: Generator | None) -> dict[str, Any]:
    """v1 vs v2 on the scenario's held-out phrasings: task success each, paired bootstrap CI of the difference."""
    from tuneloop.deploy import scenario
    from tuneloop.deploy.gate import paired_bootstrap
    from tuneloop.trainer.evaluate import evaluate

    ds = scenario.register_heldout(ctx.db, ctx.settings.paths.home_path)
    rep = evaluate([v1, v2], ds, ctx.db, ctx.settings, generator=generator, max_new_tokens=48)
    a, b = rep["per_example"][v2]["task_success"], rep["per_example"][v1]["task_success"]
    bs = paired_bootstrap(a, b, ctx.settings.deploy.bootstrap_samples)
    s1, s2 = rep["summary"][v1]["task_success"], rep["summary"][v2]["task_success"]
    return {
        "dataset": ds,
        "report_id": rep["id"],
        "n": len(a),
        "task_success": {v1: s1, v2: s2},
        "ratio": (s2 / s1) if s1 else None,
        "delta": bs.mean_delta,
        "ci": [bs.ci_low, bs.ci_high],
        "samples": rep["samples"],
    }


def measure_drift(ctx: Context, version: str) -> dict[str, Any]:
    """Drift of ``version`` over its recent traffic; returns {feature: {value, threshold, drifted}}."""
    from tuneloop.monitoring import drift_job

    res = drift_job.run_once(ctx.db, ctx.settings, version)
    return res if isinstance(res, dict) else getattr(res, "__dict__", {"result": str(res)})


# ---- main ----------------------------------------------------------------------------------------


def demo_context(ctx: Context, opts: DemoOptions, golden: Path) -> Context:
    """A new context: the caller's config and overrides plus the demo's own settings overrides."""
    from tuneloop.cli import Context

    # the canary's traffic budget is 80% of its expected share of the canary round: the judge decides within it
    n_canary = int(canary_requests(opts) * CANARY_SHARE * 0.8)
    extra = (
        (TINY_OVERRIDES if opts.tiny else [])
        + CANARY_OVERRIDES
        + [f"deploy.canary_max_requests={n_canary}", f"deploy.gate_golden={golden}"]
    )
    return Context(ctx.config_path, [*ctx.overrides, *extra])


def demo_requests(opts: DemoOptions) -> int:
    """Requests in the first round of simulated traffic (v1 serving alone)."""
    return opts.requests or (60 if opts.tiny else 160)


def canary_requests(opts: DemoOptions) -> int:
    """Requests in the canary round: at a 50% share about 88 canary requests (its budget), enough to show
    the error-rate guardrail non-inferior within the demo's 5-point margin and 50 ratings per arm."""
    return max(demo_requests(opts), 220)


def run_demo(ctx: Context, opts: DemoOptions) -> int:
    from tuneloop.deploy import scenario
    from tuneloop.deploy.gate import eval_generator

    out = Path(opts.out) if opts.out else ctx.settings.paths.sub("reports") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    ctx = demo_context(ctx, opts, scenario.write_golden(out / "golden.yaml"))
    st = DemoState()
    if opts.tiny:  # gibberish model: plumbing, not quality — say so
        st.notes.append(
            "--tiny: a random-init model; its outputs are gibberish, so the gates compare held-out loss "
            "(deploy.gate_metric=neg_loss) and the task-success targets are not expected to be met"
        )
    stages = Stages(4 if opts.offline_only else 12, st)
    tag = "tiny" if opts.tiny else "demo"
    v1 = _fresh_name(ctx.db, f"{tag}-v1")
    # one evaluation engine for every gate and the held-out eval (started on first use, freed at the end)
    with eval_generator(ctx.settings) as gen:
        try:
            code = _run(ctx, opts, st, stages, out, tag, v1, gen)
        except BaseException:
            stages.close()
            raise
    return code


def _run(
    ctx: Context, opts: DemoOptions, st: DemoState, stages: Stages, out: Path, tag: str, v1: str, gen: Generator | None
) -> int:
    from tuneloop.deploy import scenario
    from tuneloop.deploy.gate import run_gate
    from tuneloop.deploy.server_process import tuneloop_server
    from tuneloop.deploy.traffic import print_traffic, simulate_traffic
    from tuneloop.registry import get_version, set_stage

    steps = opts.steps or (4 if opts.tiny else 20)
    steps2 = opts.steps or (4 if opts.tiny else 30)
    n_req, n_can = demo_requests(opts), canary_requests(opts)
    with stages("base model"):
        base = base_model(ctx, opts)
        print(f"base model: {base}")
    with stages("prepare chatterbot-corpus"):
        ds1 = prepare_chatterbot(ctx, base)
        print(f"dataset: {ds1}")
    with stages(f"train {v1} on general chat (LoRA, {steps} steps)"):
        r1 = train_version(ctx, base, ds1, v1, steps)
        st.versions[v1] = {"dataset": ds1, "metrics": r1.metrics, "run_id": r1.run_id}
    with stages(f"gate {v1} vs base"):
        g1 = run_gate(ctx.db, ctx.settings, v1, actor="demo", limit=GATE_EXAMPLES, generator=gen)
        st.gates[v1] = g1.to_dict()
        print(g1.message())
    if opts.offline_only:
        if g1.passed:
            set_stage(ctx.db, v1, "production", actor="demo", reason="gate passed vs base")
            st.promoted = v1
        return _finish(ctx, st, out, stages)
    if not g1.passed:
        st.notes.append(f"{v1} did not pass the gate vs the base model; the demo stops")
        return _finish(ctx, st, out, stages, code=1)
    set_stage(ctx.db, v1, "production", actor="demo", reason="gate passed vs base")
    questions = scenario.traffic(n_req + n_can + 40, seed=1)
    server = tuneloop_server(
        ctx.settings.paths.home_path,
        out / "server.log",
        port=opts.port or None,
        config_path=ctx.config_path,
        overrides=[*ctx.overrides, "server.state_refresh_s=1"],
    )
    with server as srv:
        print(f"web console (while the demo's server runs): {srv.url}/ui", flush=True)
        with stages(f"serve {v1}: {n_req} {scenario.PRODUCT} support questions + feedback"):
            st.traffic["before"] = simulate_traffic(srv.url, questions[:n_req], desc="traffic v1")
            print_traffic(st.traffic["before"])
        with stages(f"drift of {v1}"):
            st.drift["before"] = _drift_or_note(ctx, v1, st)

        def canary_traffic(c: Canary) -> None:
            time.sleep(3)  # the server re-reads the deploy state every second
            st.traffic["canary"] = simulate_traffic(
                srv.url, questions[n_req : n_req + n_can], desc="canary traffic", seed=2
            )
            print_traffic(st.traffic["canary"])

        _second_round(ctx, st, stages, tag, v1, ds1, steps2, canary_traffic, gen)
        with stages("traffic and drift after"):
            prod = get_version(ctx.db, st.promoted or v1).name
            time.sleep(2)
            st.traffic["after"] = simulate_traffic(srv.url, questions[n_req + n_can :], desc="traffic after", seed=3)
            print_traffic(st.traffic["after"])
            st.drift["after"] = _drift_or_note(ctx, prod, st)
    v2 = next((v for v in st.versions if v != v1), None)
    if v2 is not None:
        with stages(f"held-out {scenario.PRODUCT} questions: {v1} vs {v2}"):
            st.heldout = heldout_eval(ctx, v1, v2, gen)
            h = st.heldout
            print(
                f"task success on {h['n']} held-out phrasings: {v1} {h['task_success'][v1]:.0%}, "
                f"{v2} {h['task_success'][v2]:.0%}; difference {h['delta']:+.0%}, "
                f"95% CI [{h['ci'][0]:+.0%}, {h['ci'][1]:+.0%}]"
            )
    return _finish(ctx, st, out, stages)


def _second_round(
    ctx: Context,
    st: DemoState,
    stages: Stages,
    tag: str,
    v1: str,
    ds1: str,
    steps: int,
    canary_traffic: Callable[[Canary], None],
    generator: Generator | None,
) -> None:
    """v2 through one cycle of the loop: sample -> train -> gate vs v1 -> canary with live traffic -> decide."""
    from tuneloop.dataset_store import load_card
    from tuneloop.deploy.gate import last_gate
    from tuneloop.deploy.loop import LoopOptions, run_cycle
    from tuneloop.monitoring import canary

    v2 = _fresh_name(ctx.db, f"{tag}-v2")
    opts = LoopOptions(
        strategies=["feedback=0.7", "stratified=0.3"],
        dataset_name=f"{tag}-production",
        dedup_against=[ds1],
        replay_fraction=V2_REPLAY,
        train_overrides=[*train_overrides(steps), V2_LEARNING_RATE],
        eval_limit=GATE_EXAMPLES,
        canary_share=CANARY_SHARE,
        # the live server judges a running canary by itself (deploy.canary_judge_interval_s): the canary round's
        # traffic ends within its budget, so the server decides; give it a few intervals after the traffic
        canary_server_judge_s=4 * ctx.settings.deploy.canary_judge_interval_s + 5,
        canary_timeout_s=0,
        canary_rollback_undecided=True,
        version_name=v2,
        actor="demo",
    )
    labels = {
        "sample": "sample production + feedback",
        "train": f"train {v2} on production data",
        "gate": f"gate {v2} vs {v1}",
        "canary": f"canary {v2} ({CANARY_SHARE:.0%} of production traffic) and its judgement",
    }
    res = run_cycle(
        ctx.db,
        ctx.settings,
        opts,
        on_canary_start=canary_traffic,
        generator=generator,
        step_context=lambda name, _inputs: stages(labels.get(name, name)),
    )
    steps_done = {k: v.get("details") or {} for k, v in res.steps.items()}
    if steps_done.get("gate", {}).get("message"):
        print(steps_done["gate"]["message"])
    print(res.summary())
    s = steps_done.get("sample", {})
    if res.outcome == "nothing_to_do":
        st.notes.append(f"nothing to sample from production: {v2} not trained ({s.get('reason', '')})")
        return
    card = load_card(ctx.db, s["dataset"])
    st.sample = {"dataset": s["dataset"], "preference": s.get("preference"), "card": card}
    print(f"dataset {s['dataset']}: {card.get('splits')}, origins {card.get('origins')}")
    t = steps_done.get("train", {})
    st.versions[v2] = {"dataset": s["dataset"], "metrics": t.get("metrics"), "run_id": t.get("run_id")}
    st.gates[v2] = last_gate(ctx.db, v2) or {}
    if res.outcome == "gate_failed":
        st.notes.append(f"{v2} did not pass the gate vs {v1}: not deployed")
        return
    c = steps_done.get("canary", {})
    arms = {}
    if c.get("canary_id"):
        decided = canary.get(ctx.db, c["canary_id"])
        arms = {k: v.__dict__ for k, v in canary.arm_stats(ctx.db, decided).items()}
    st.canary = {
        "id": c.get("canary_id"),
        "decision": "promote" if res.outcome == "promoted" else "rollback",
        "decided_by": c.get("decided_by"),
        "reasons": c.get("reasons") or [c.get("reason", "")],
        "arms": arms,
    }
    st.promoted = v2 if res.outcome == "promoted" else None


def _fresh_name(db: Database, name: str) -> str:
    from tuneloop.registry import version_names

    names = version_names(db)
    if name not in names:
        return name
    i = 2
    while f"{name}.{i}" in names:
        i += 1
    return f"{name}.{i}"


def _drift_or_note(ctx: Context, version: str, st: DemoState) -> dict[str, Any]:
    try:
        return measure_drift(ctx, version)
    except ModuleNotFoundError as e:
        st.notes.append(f"drift not measured: {e.name} is not available")
        return {}


def _finish(ctx: Context, st: DemoState, out: Path, stages: Stages, code: int = 0) -> int:
    stages.close()
    finish(ctx.db, st, out)
    return code
