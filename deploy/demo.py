"""``tuneloop demo``: the whole loop, offline, on this machine.

Contract
--------
:func:`run_demo` runs, with progress shown, and returns the exit code:

1. base model: SmolLM2-135M-Instruct (``trainer.bootstrap.pull``), ``--base PATH``,
   or with ``--tiny`` a tiny random Llama built locally;
2. data: the chatterbot-corpus prepared into a registered dataset
   (``tuneloop.trainer.corpora.prepare_corpus``);
3. v1: LoRA training (``tuneloop.trainer.train.train``), the gate against the base model
   (``tuneloop.deploy.gate.run_gate``), promoted to production;
   ``--offline-only`` stops here and prints the versions table;
4. serving: ``tuneloop serve`` as a subprocess (``deploy.server_process``),
   answering the ``production`` alias;
5. production traffic (``deploy.traffic``): prompts from chitchat-dataset (another
   distribution, so it drifts) through the official ``openai`` client, one
   simulated user per conversation; the user compares each answer with the
   dataset's reference reply (token F1 over normalised tokens) and posts a
   rating — thumbs-down plus the reference as a correction when the answer is
   poor — to ``/v1/feedback``;
6. drift of v1 over that traffic (``monitoring.drift_job.run_once``);
7. v2: one cycle of the continuous loop (``deploy.loop.run_cycle``): sample the
   production traffic and feedback -> train v2 from v1 -> gate against v1 ->
   canary on live traffic (the simulated users again) -> judged (by the live
   server's judge, else here) -> promoted or rolled back;
8. drift again, for the version now in production;
9. a summary table and ``report.html`` (inline SVG plots) + ``summary.json``
   (``deploy.demo_report``).

The demo adds settings overrides only where it needs them: a small canary
(``deploy.canary_min_requests=15``, a traffic budget of the canary's share of one
round of traffic, a 5-point error-rate margin, a judge every 2 s) and, with ``--tiny``
(whose outputs are gibberish), a widened gate tolerance, which the summary notes.
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
    from tuneloop.trainer.train import TrainResult

# held-out examples the demo's gates evaluate per model (answers generated on vLLM's offline engine)
GATE_EXAMPLES = 200
# what the demo changes in the settings (besides the --tiny gate tolerance)
CANARY_OVERRIDES = ["deploy.canary_min_requests=15", "deploy.canary_max_minutes=10", "deploy.canary_judge_interval_s=2"]
TINY_OVERRIDES = ["deploy.gate_min_delta=1.0", "deploy.gate_max_forgetting=100"]
CANARY_SHARE = 0.5


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

    return str(corpora.prepare_corpus(ctx.db, ctx.settings, "chatterbot", name=name, base=str(base)).id)


def train_version(ctx: Context, base: Path, dataset: str, name: str, steps: int) -> TrainResult:
    from tuneloop.deploy.loop import LoopOptions, build_train_config
    from tuneloop.trainer.train import train

    cfg = build_train_config(LoopOptions(train_overrides=train_overrides(steps)), str(base), dataset, name, None)
    return train(cfg, ctx.db, ctx.settings, progress=True)


def train_overrides(steps: int) -> list[str]:
    """Training settings of every demo version: LoRA for ``steps`` steps."""
    return [f"max_steps={steps}", "method=lora"]


def measure_drift(ctx: Context, version: str) -> dict[str, Any]:
    """Drift of ``version`` over its recent traffic; returns {feature: {value, threshold, drifted}}."""
    from tuneloop.monitoring import drift_job

    res = drift_job.run_once(ctx.db, ctx.settings, version)
    return res if isinstance(res, dict) else getattr(res, "__dict__", {"result": str(res)})


# ---- main ----------------------------------------------------------------------------------------


def demo_context(ctx: Context, opts: DemoOptions) -> Context:
    """A new context: the caller's config and overrides plus the demo's own settings overrides."""
    from tuneloop.cli import Context

    # The canary sees about half of one round of traffic. Its budget ends with that traffic, so the server's
    # sequential judge decides then (non-inferior -> promote) instead of waiting for production-sized traffic;
    # and a 2-point error-rate margin cannot be shown on ~50 requests per arm, so the demo allows 5 points.
    n_canary = int(demo_requests(opts) * CANARY_SHARE * 0.8)
    budget = [f"deploy.canary_max_requests={n_canary}", "deploy.canary_max_error_rate_delta=0.05"]
    extra = (TINY_OVERRIDES if opts.tiny else []) + CANARY_OVERRIDES + budget
    return Context(ctx.config_path, [*ctx.overrides, *extra])


def demo_requests(opts: DemoOptions) -> int:
    """Requests per round of simulated traffic."""
    return opts.requests or (60 if opts.tiny else 160)


def run_demo(ctx: Context, opts: DemoOptions) -> int:
    from tuneloop.deploy.gate import run_gate
    from tuneloop.deploy.server_process import tuneloop_server
    from tuneloop.deploy.traffic import chitchat_conversations, print_traffic, simulate_traffic
    from tuneloop.registry import get_version, set_stage

    ctx = demo_context(ctx, opts)
    steps = opts.steps or (4 if opts.tiny else 30)
    n_req = demo_requests(opts)
    st = DemoState()
    if opts.tiny:  # gibberish model: plumbing, not quality — say so
        st.notes.append(
            "--tiny: a random-init model; outputs are gibberish, gate tolerance widened (deploy.gate_min_delta=1.0)"
        )
    out = Path(opts.out) if opts.out else ctx.settings.paths.sub("reports") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(4 if opts.offline_only else 11, st)
    tag = "tiny" if opts.tiny else "demo"
    v1 = _fresh_name(ctx.db, f"{tag}-v1")
    try:
        with stages("base model"):
            base = base_model(ctx, opts)
            print(f"base model: {base}")
        with stages("prepare chatterbot-corpus"):
            ds1 = prepare_chatterbot(ctx, base)
            print(f"dataset: {ds1}")
        with stages(f"train {v1} (LoRA, {steps} steps)"):
            r1 = train_version(ctx, base, ds1, v1, steps)
            st.versions[v1] = {"dataset": ds1, "metrics": r1.metrics, "run_id": r1.run_id}
        with stages(f"gate {v1} vs base"):
            g1 = run_gate(ctx.db, ctx.settings, v1, actor="demo", limit=GATE_EXAMPLES)
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
        convs = chitchat_conversations(2 * n_req + 20, seed=1)
        server = tuneloop_server(
            ctx.settings.paths.home_path,
            out / "server.log",
            port=opts.port or None,
            config_path=ctx.config_path,
            overrides=[*ctx.overrides, "server.state_refresh_s=1"],
        )
        with server as srv:
            with stages(f"serve {v1}: {n_req} production requests + feedback"):
                st.traffic["before"] = simulate_traffic(srv.url, convs[:n_req], desc="traffic v1")
                print_traffic(st.traffic["before"])
            with stages(f"drift of {v1}"):
                st.drift["before"] = _drift_or_note(ctx, v1, st)

            def canary_traffic(c: Canary) -> None:
                time.sleep(3)  # the server re-reads the deploy state every second
                st.traffic["canary"] = simulate_traffic(
                    srv.url, convs[n_req : 2 * n_req], desc="canary traffic", seed=2
                )
                print_traffic(st.traffic["canary"])

            _second_round(ctx, st, stages, tag, v1, ds1, steps, canary_traffic)
            with stages("drift after"):
                prod = get_version(ctx.db, st.promoted or v1).name
                time.sleep(2)
                st.traffic["after"] = simulate_traffic(
                    srv.url, convs[2 * n_req : 2 * n_req + 20], desc="traffic after", seed=3
                )
                st.drift["after"] = _drift_or_note(ctx, prod, st)
        return _finish(ctx, st, out, stages)
    except BaseException:
        stages.close()
        raise


def _second_round(
    ctx: Context,
    st: DemoState,
    stages: Stages,
    tag: str,
    v1: str,
    ds1: str,
    steps: int,
    canary_traffic: Callable[[Canary], None],
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
        replay_fraction=0.2,
        train_overrides=train_overrides(steps),
        eval_limit=GATE_EXAMPLES,
        canary_share=CANARY_SHARE,
        # the live server judges a running canary by itself (deploy.canary_judge_interval_s): give it a few
        # intervals, then judge here once; still undecided is a rollback
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
    names = {r["name"] for r in db.query("SELECT name FROM model_versions")}
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
