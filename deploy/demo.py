"""``tuneloop demo``: the whole loop, offline, on this machine.

Contract
--------
:func:`run_demo` runs, with progress shown, and returns the exit code:

1. base model: SmolLM2-135M-Instruct (``trainer.bootstrap.pull``), ``--base PATH``,
   or with ``--tiny`` a tiny random Llama built locally;
2. data: the chatterbot-corpus prepared into a registered dataset (DATA's
   ``trainer.corpora`` + ``trainer.data``);
3. v1: LoRA training (``trainer.train.train``), the gate against the base model
   (``deploy.gate.run_gate``), promoted to production;
   ``--offline-only`` stops here and prints the versions table (the issue-2 demo);
4. serving: ``tuneloop serve`` as a subprocess, answering the ``production`` alias;
5. production traffic: prompts from chitchat-dataset (another distribution, so
   it drifts) through the official ``openai`` client, one simulated user per
   conversation; the user compares each answer with the dataset's reference
   reply (token F1) and posts a rating — thumbs-down plus the reference as a
   correction when the answer is poor — to ``/v1/feedback``;
6. drift of v1 over that traffic (DRIFT's ``monitoring.drift_job``);
7. sample (``feedback.sample``) -> v2 trained -> gated against v1 -> canary on
   live traffic -> judged (``monitoring.canary``) -> promoted or rolled back;
8. drift again, for the version now in production;
9. a summary table and ``report.html`` (inline SVG plots) + ``summary.json``.

The demo uses its own settings overrides only where the tiny model needs them
(its outputs are gibberish, so with ``--tiny`` the gate tolerance is widened
and the summary says so).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneloop.errors import UserError

# held-out examples the demo's gates evaluate per model (greedy generation on CPU is the slow part)
GATE_EXAMPLES = 48


@dataclass
class DemoOptions:
    tiny: bool = False
    base: str | None = None
    steps: int | None = None
    requests: int | None = None
    port: int = 0
    out: str | None = None
    offline_only: bool = False


@dataclass
class DemoState:
    started: float = field(default_factory=time.monotonic)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    gates: dict[str, dict[str, Any]] = field(default_factory=dict)
    traffic: dict[str, dict[str, Any]] = field(default_factory=dict)
    drift: dict[str, dict[str, Any]] = field(default_factory=dict)
    sample: dict[str, Any] = field(default_factory=dict)
    canary: dict[str, Any] = field(default_factory=dict)
    promoted: str | None = None


class Stages:
    """A progress line per stage, with its duration."""

    def __init__(self, total: int, state: DemoState):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="demo", unit="stage", file=sys.stderr, leave=True)
        self.state = state
        self.name = ""
        self.t0 = 0.0

    def __call__(self, name: str):
        self.name = name
        return self

    def __enter__(self):
        self.t0 = time.monotonic()
        self.bar.set_postfix_str(self.name)
        print(f"\n== {self.name}", flush=True)
        return self

    def __exit__(self, et, e, tb):
        dt = time.monotonic() - self.t0
        self.state.timings[self.name] = round(dt, 1)
        if et is None:
            self.bar.update()
            print(f"== {self.name}: done in {dt:.0f} s", flush=True)
        return False

    def close(self):
        self.bar.close()


# ---- steps -------------------------------------------------------------------------------------


def base_model(ctx, opts: DemoOptions) -> Path:
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
    return pull(DEFAULT_BASE, ctx.settings.paths.models_path)


def prepare_chatterbot(ctx, base: Path, name: str = "chatterbot") -> str:
    """The chatterbot-corpus as a registered SFT dataset (DATA's corpora + prepare); returns its id."""
    from tuneloop.trainer import corpora

    return corpora.prepare_corpus(ctx.db, ctx.settings, "chatterbot", name=name, base=str(base)).id


def train_version(ctx, base: Path, dataset: str, name: str, steps: int, parent: str | None = None):
    from tuneloop.deploy.loop import LoopOptions, build_train_config
    from tuneloop.trainer.train import train

    cfg = build_train_config(
        LoopOptions(train_overrides=[f"max_steps={steps}", "method=lora"]), str(base), dataset, name, parent
    )
    return train(cfg, ctx.db, ctx.settings, progress=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``tuneloop serve`` in a subprocess (its own process group), stopped with SIGTERM so the log drains."""

    def __init__(self, ctx, port: int, log_path: Path, extra: list[str] | None = None):
        self.ctx, self.port, self.log_path, self.extra = ctx, port, log_path, extra or []
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self):
        exe = Path(sys.executable).parent / "tuneloop"
        cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "tuneloop.cli"])]
        if self.ctx.config_path:
            cmd += ["--config", self.ctx.config_path]
        for o in (
            self.ctx.overrides
            + [f"server.port={self.port}", "server.host=127.0.0.1", "server.state_refresh_s=1"]
            + self.extra
        ):
            cmd += ["--set", o]
        cmd += ["serve"]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(os.environ, TUNELOOP_HOME=str(self.ctx.settings.paths.home_path)),
        )
        self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError(
                    f"`tuneloop serve` exited with {self.proc.returncode}; see {self.log_path}:\n{_tail(self.log_path)}"
                )
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise UserError(f"`tuneloop serve` not ready after {timeout_s:.0f} s; see {self.log_path}")

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return False


def _tail(p: Path, n: int = 30) -> str:
    try:
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def chitchat_conversations(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (first message, reply) pairs from the chitchat-dataset package (a different distribution than chatterbot)."""
    import importlib.util
    import random

    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or spec.origin is None:
        raise UserError(
            "the demo's production traffic needs the PyPI package chitchat-dataset: pip install --no-deps chitchat-dataset==0.9.0"
        )
    data = json.loads((Path(spec.origin).parent / "dataset.json").read_text())
    pairs = []
    for conv in data.values():
        msgs = [m for turn in conv.get("messages", []) for m in turn]
        texts = [m.get("text", "").strip() for m in msgs if m.get("text", "").strip()]
        if len(texts) >= 2 and 3 <= len(texts[0].split()) <= 40 and 2 <= len(texts[1].split()) <= 40:
            pairs.append((texts[0], texts[1]))
    random.Random(seed).shuffle(pairs)
    if not pairs:
        raise UserError("chitchat-dataset has no usable conversations")
    return [pairs[i % len(pairs)] for i in range(n)]


def token_f1(a: str, b: str) -> float:
    from collections import Counter

    ta, tb = a.lower().split(), b.lower().split()
    common = sum((Counter(ta) & Counter(tb)).values())
    if not ta or not tb or not common:
        return 0.0
    p, r = common / len(ta), common / len(tb)
    return 2 * p * r / (p + r)


def simulate_traffic(
    url: str,
    convs: list[tuple[str, str]],
    users: int = 32,
    concurrency: int = 8,
    max_tokens: int = 48,
    good_f1: float = 0.2,
    seed: int = 0,
    desc: str = "traffic",
) -> dict[str, Any]:
    """Chat requests for ``production`` via the openai client + simulated feedback; per-arm stats from the responses."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from openai import OpenAI
    from tqdm import tqdm

    client = OpenAI(
        base_url=url + "/v1", api_key=os.environ.get("TUNELOOP_API_KEY", "none"), max_retries=2, timeout=120
    )
    http = httpx.Client(
        base_url=url, timeout=30, headers={"Authorization": f"Bearer {os.environ.get('TUNELOOP_API_KEY', 'none')}"}
    )
    rng = random.Random(seed)
    jobs = [(i, prompt, ref, f"user-{rng.randrange(users)}") for i, (prompt, ref) in enumerate(convs)]
    stats: dict[str, Any] = {
        "requests": 0,
        "failed": 0,
        "up": 0,
        "down": 0,
        "corrections": 0,
        "f1": [],
        "by_version": {},
    }

    def one(job):
        i, prompt, ref, user = job
        try:
            r = client.chat.completions.create(
                model="production",
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                temperature=0.7,
                user=user,
                seed=seed + i,
            )
        except Exception as e:
            return {"ok": False, "error": str(e)}
        answer = r.choices[0].message.content or ""
        f1 = token_f1(answer, ref)
        body: dict[str, Any] = {"request_id": r.id, "source": "demo-user"}
        if f1 >= good_f1:
            body["rating"] = "up"
        else:
            body.update(rating="down", correction=ref)
        fb = http.post("/v1/feedback", json=body)
        return {"ok": True, "model": r.model, "f1": f1, "rating": body["rating"], "feedback_status": fb.status_code}

    with ThreadPoolExecutor(concurrency) as ex:
        for res in tqdm(ex.map(one, jobs), total=len(jobs), desc=desc, unit="req", file=sys.stderr):
            stats["requests"] += 1
            if not res["ok"]:
                stats["failed"] += 1
                stats.setdefault("errors", []).append(res["error"][:200])
                continue
            stats[res["rating"]] += 1
            stats["corrections"] += res["rating"] == "down"
            stats["f1"].append(res["f1"])
            v = stats["by_version"].setdefault(res["model"], {"requests": 0, "up": 0, "f1": 0.0})
            v["requests"] += 1
            v["up"] += res["rating"] == "up"
            v["f1"] += res["f1"]
    for v in stats["by_version"].values():
        v["f1"] = v["f1"] / v["requests"] if v["requests"] else 0.0
    f1s = stats.pop("f1")
    stats["mean_f1"] = sum(f1s) / len(f1s) if f1s else 0.0
    http.close()
    return stats


def measure_drift(ctx, version: str) -> dict[str, Any]:
    """DRIFT's drift computation for ``version`` over its recent traffic; returns {feature: {value, threshold, drifted}}."""
    from tuneloop.monitoring import drift_job

    res = drift_job.run_once(ctx.db, ctx.settings, version)  # contract of DRIFT's module
    return res if isinstance(res, dict) else getattr(res, "__dict__", {"result": str(res)})


# ---- main ----------------------------------------------------------------------------------------


def run_demo(ctx, opts: DemoOptions) -> int:
    from tuneloop.registry import get_version, set_stage

    if opts.tiny:  # gibberish model: plumbing, not quality — say so, and let the gate judge with a wide tolerance
        ctx.overrides = list(ctx.overrides) + ["deploy.gate_min_delta=1.0", "deploy.gate_max_forgetting=100"]
    ctx.overrides = list(ctx.overrides) + [
        "deploy.canary_min_requests=15",
        "deploy.canary_max_minutes=10",
        "deploy.canary_judge_interval_s=2",
    ]
    ctx.__dict__.pop("settings", None)  # rebuild settings with the overrides
    steps = opts.steps or (4 if opts.tiny else 30)
    n_req = opts.requests or (60 if opts.tiny else 160)
    st = DemoState()
    if opts.tiny:
        st.notes.append(
            "--tiny: a random-init model; outputs are gibberish, gate tolerance widened (deploy.gate_min_delta=1.0)"
        )
    home = ctx.settings.paths.home_path
    out = Path(opts.out) if opts.out else ctx.settings.paths.sub("reports") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(4 if opts.offline_only else 12, st)
    tag = "tiny" if opts.tiny else "demo"
    v1, v2 = _fresh_name(ctx.db, f"{tag}-v1"), None
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
            from tuneloop.deploy.gate import run_gate

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
        port = opts.port or free_port()
        with ServerProcess(ctx, port, out / "server.log") as srv:
            with stages(f"serve {v1}: {n_req} production requests + feedback"):
                st.traffic["before"] = simulate_traffic(srv.url, convs[:n_req], desc="traffic v1")
                _print_traffic(st.traffic["before"])
            with stages(f"drift of {v1}"):
                st.drift["before"] = _drift_or_note(ctx, v1, st)
            with stages("sample production + feedback"):
                from tuneloop.feedback.sample import SampleConfig, sample

                res = sample(
                    ctx.db,
                    home,
                    SampleConfig(
                        name=f"{tag}-production",
                        strategies={"feedback": 0.7, "stratified": 0.3},
                        replay_from=ds1,
                        replay_fraction=0.2,
                        dedup_against=[ds1],
                    ),
                )
                st.sample = {
                    "dataset": res.sft.id,
                    "preference": res.preference.id if res.preference else None,
                    "card": res.card,
                }
                print(f"dataset {res.sft.id}: {res.card['splits']}, origins {res.card['origins']}")
            v2 = _fresh_name(ctx.db, f"{tag}-v2")
            with stages(f"train {v2} on production data"):
                r2 = train_version(ctx, base, res.sft.id, v2, steps, parent=v1)
                st.versions[v2] = {"dataset": res.sft.id, "metrics": r2.metrics, "run_id": r2.run_id}
            with stages(f"gate {v2} vs {v1}"):
                g2 = run_gate(ctx.db, ctx.settings, v2, actor="demo", limit=GATE_EXAMPLES)
                st.gates[v2] = g2.to_dict()
                print(g2.message())
            if not g2.passed:
                st.notes.append(f"{v2} did not pass the gate vs {v1}: not deployed")
            else:
                from tuneloop.monitoring import canary

                with stages(f"canary {v2} (50% of production traffic)"):
                    c = canary.start(ctx.db, v2, 0.5, actor="demo", reason="gate passed")
                    time.sleep(3)  # the server re-reads the deploy state every second
                    st.traffic["canary"] = simulate_traffic(
                        srv.url, convs[n_req : 2 * n_req], desc="canary traffic", seed=2
                    )
                    _print_traffic(st.traffic["canary"])
                with stages("judge the canary"):
                    # the live server judges a running canary by itself (deploy.canary_judge_interval_s);
                    # give it a few intervals, then judge here if it has not decided yet
                    deadline = time.monotonic() + 4 * ctx.settings.deploy.canary_judge_interval_s + 5
                    while time.monotonic() < deadline and canary.get(ctx.db, c.id).status == "running":
                        time.sleep(1)
                    decided = canary.get(ctx.db, c.id)
                    if decided.status == "running":
                        d = canary.judge(ctx.db, c.id, ctx.settings.deploy)
                        if d.action == "wait":
                            d.action, d.reasons = "rollback", d.reasons + ["not enough canary traffic in the demo"]
                        canary.apply(ctx.db, d, actor="demo")
                        action, reasons, by = d.action, d.reasons, "demo"
                        print(d.summary())
                    else:
                        info = decided.decision or {}
                        action = "promote" if decided.status == "promoted" else "rollback"
                        reasons, by = info.get("reasons") or [info.get("reason", "")], info.get("actor", "server")
                        print(f"canary {c.id}: {decided.status} by {by}: {'; '.join(map(str, reasons))}")
                    st.canary = {
                        "id": c.id,
                        "decision": action,
                        "decided_by": by,
                        "reasons": reasons,
                        "arms": {k: v.__dict__ for k, v in canary.arm_stats(ctx.db, canary.get(ctx.db, c.id)).items()},
                    }
                    st.promoted = v2 if action == "promote" else None
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


def _fresh_name(db, name: str) -> str:
    names = {r["name"] for r in db.query("SELECT name FROM model_versions")}
    if name not in names:
        return name
    i = 2
    while f"{name}.{i}" in names:
        i += 1
    return f"{name}.{i}"


def _drift_or_note(ctx, version: str, st: DemoState) -> dict[str, Any]:
    try:
        return measure_drift(ctx, version)
    except ModuleNotFoundError as e:
        st.notes.append(f"drift not measured: {e.name} is not available")
        return {}


def _print_traffic(t: dict[str, Any]) -> None:
    print(
        f"{t['requests']} requests ({t['failed']} failed), feedback: {t['up']} up, {t['down']} down with a correction; "
        f"mean token F1 vs the reference reply {t['mean_f1']:.3f}; by version: "
        + ", ".join(f"{k} {v['requests']} (F1 {v['f1']:.3f})" for k, v in t["by_version"].items())
    )


def _finish(ctx, st: DemoState, out: Path, stages: Stages, code: int = 0) -> int:
    from tuneloop.registry import list_versions
    from tuneloop.table import print_table

    stages.close()
    total = time.monotonic() - st.started
    versions = list_versions(ctx.db)
    print()
    rows = []
    for v in versions:
        g = st.gates.get(v.name) or {}
        q = next((c for c in g.get("checks", []) if c["name"] == "quality"), None)
        summ = g.get("extra", {}).get("summary") or {}
        mine = next(iter(summ.values()), None) or {}
        rows.append(
            [
                v.name,
                v.stage,
                v.dataset_id or "-",
                _fmt(mine.get("loss")),
                _fmt(mine.get("token_f1")),
                ("passed" if g.get("passed") else "failed") if g else "-",
                _fmt(q["value"]) if q else "-",
            ]
        )
    print_table(
        ["version", "stage", "dataset", "eval loss", "token F1", "gate", "CI low"], rows, title="model versions"
    )
    n = ctx.db.query("SELECT count(*) AS n FROM requests")[0]["n"]
    f = ctx.db.query("SELECT count(*) AS n, count(correction) AS c FROM feedback")[0]
    print(
        f"\nrequests served: {n}; feedback: {f['n']} ({f['c']} corrections); "
        f"used in training: {st.sample.get('card', {}).get('origins', {})}"
    )
    if st.promoted:
        why = "; ".join(st.canary.get("reasons", [])) if st.canary else "gate passed"
        print(f"promoted: {st.promoted} ({why})")
    for k in ("before", "after"):
        if st.drift.get(k):
            print(f"drift {k}: {_drift_line(st.drift[k])}")
    for note in st.notes:
        print(f"note: {note}")
    summary = {
        "total_s": round(total, 1),
        "timings_s": st.timings,
        "versions": st.versions,
        "gates": st.gates,
        "traffic": st.traffic,
        "drift": st.drift,
        "sample": st.sample,
        "canary": st.canary,
        "promoted": st.promoted,
        "requests": n,
        "feedback": f,
        "notes": st.notes,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    write_report(out / "report.html", summary)
    print(f"\nreport: {out / 'report.html'}  (total {total / 60:.1f} min)")
    return code


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _drift_line(d: dict[str, Any]) -> str:
    feats = d.get("features") if isinstance(d.get("features"), dict) else d
    parts = []
    for k, v in feats.items():
        if isinstance(v, dict) and "value" in v:
            parts.append(f"{k} {_fmt(v['value'])}{' (drifted)' if v.get('drifted') else ''}")
    return ", ".join(parts) or json.dumps(d, default=str)[:200]


# ---- HTML report (inline SVG, no plotting dependency) ----------------------------------------------


def _bars(title: str, items: list[tuple[str, float]], fmt: str = "{:.3g}", threshold: float | None = None) -> str:
    """A horizontal bar chart as inline SVG."""
    from html import escape

    if not items:
        return ""
    w, row, left = 640, 24, 220
    top = max([v for _, v in items] + [threshold or 0, 1e-9])
    h = row * len(items) + 30
    out = [f'<h3>{escape(title)}</h3><svg width="{w}" height="{h}" role="img" aria-label="{escape(title)}">']
    for i, (label, v) in enumerate(items):
        y = 10 + i * row
        bw = max(1, (w - left - 70) * max(v, 0) / top)
        out.append(
            f'<text x="{left - 6}" y="{y + 15}" text-anchor="end" font-size="12">{escape(label)}</text>'
            f'<rect x="{left}" y="{y + 3}" width="{bw:.1f}" height="{row - 8}" fill="#4c78a8"/>'
            f'<text x="{left + bw + 4}" y="{y + 15}" font-size="12">{escape(fmt.format(v))}</text>'
        )
    if threshold is not None:
        x = left + (w - left - 70) * threshold / top
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="5" y2="{h - 15}" stroke="#e45756" stroke-dasharray="4"/>'
            f'<text x="{x + 3:.1f}" y="{h - 4}" font-size="11" fill="#e45756">threshold</text>'
        )
    out.append("</svg>")
    return "".join(out)


def write_report(path: Path, summary: dict[str, Any]) -> None:
    """``report.html``: versions and gates, traffic and feedback, drift before/after, stage timings."""
    from html import escape

    parts = [
        "<!doctype html><meta charset='utf-8'><title>tuneloop demo</title>",
        "<style>body{font-family:sans-serif;max-width:900px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}pre{background:#f6f6f6;padding:8px;white-space:pre-wrap}</style>",
        f"<h1>tuneloop demo</h1><p>total {summary['total_s'] / 60:.1f} min; promoted: <b>{escape(str(summary.get('promoted')))}</b>; "
        f"requests served: {summary.get('requests')}; feedback: {summary.get('feedback')}</p>",
    ]
    for n in summary.get("notes", []):
        parts.append(f"<p><i>note: {escape(n)}</i></p>")
    parts.append("<h2>Gates</h2>")
    for name, g in summary.get("gates", {}).items():
        summ = g.get("extra", {}).get("summary") or {}
        metric = g.get("metric", "token_f1")
        parts.append(
            _bars(
                f"{name}: mean {metric} on the held-out split",
                [(k, float((v or {}).get(metric) or 0)) for k, v in summ.items()],
            )
        )
        lines = [f"gate {'PASSED' if g.get('passed') else 'FAILED'}: {g.get('candidate')} vs {g.get('baseline')}"]
        lines += [f"  {c['name']}: {c['detail']}" for c in g.get("checks", [])]
        parts.append(f"<pre>{escape(chr(10).join(lines))}</pre>")
    parts.append("<h2>Production traffic and feedback</h2>")
    tr = summary.get("traffic", {})
    items = []
    for phase, t in tr.items():
        items += [(f"{phase}: thumbs up", t.get("up", 0)), (f"{phase}: thumbs down", t.get("down", 0))]
    parts.append(_bars("simulated feedback per phase", items, "{:.0f}"))
    items = [(f"{phase}: {v}", d["f1"]) for phase, t in tr.items() for v, d in t.get("by_version", {}).items()]
    parts.append(_bars("mean token F1 of answers vs the reference reply, per phase and serving version", items))
    if summary.get("canary"):
        c = summary["canary"]
        parts.append(
            f"<h2>Canary</h2><p>decision: <b>{escape(c['decision'])}</b> — {escape('; '.join(c['reasons']))}</p>"
        )
        arms = c.get("arms", {})
        parts.append(
            _bars(
                "thumbs-down share per arm",
                [(f"{a} ({s.get('model_version')})", s.get("negative_share", 0)) for a, s in arms.items()],
                "{:.0%}",
            )
        )
        parts.append(
            _bars(
                "p50 latency per arm (s)",
                [(f"{a} ({s.get('model_version')})", s.get("latency_p50_s") or 0) for a, s in arms.items()],
            )
        )
    parts.append("<h2>Drift</h2>")
    for phase, d in summary.get("drift", {}).items():
        feats = d.get("features") if isinstance(d.get("features"), dict) else d
        items = [
            (k, float(v["value"]))
            for k, v in feats.items()
            if isinstance(v, dict) and isinstance(v.get("value"), (int, float))
        ]
        parts.append(_bars(f"drift statistics {phase}", items))
    if not summary.get("drift"):
        parts.append("<p>not measured</p>")
    parts.append(_bars("stage durations (s)", list(summary.get("timings_s", {}).items()), "{:.0f}"))
    parts.append(f"<h2>Raw summary</h2><pre>{escape(json.dumps(summary, indent=2, default=str)[:20000])}</pre>")
    Path(path).write_text("\n".join(parts))
