"""Classification serving: ``tuneloop serve`` vs vLLM's own server on the same classifier folder, same run.

Usage::

    python bench/classify_serve.py           # a 3-label classifier head on SmolLM2-135M (model cache)
    python bench/classify_serve.py --tiny    # the same head on the tiny random test model (fast smoke run)

The classifier is built here (seeded, a few seconds): ``AutoModelForSequenceClassification`` over the base
folder with ``num_labels=3`` (labels ``negative``/``neutral``/``positive``, random head; plumbing, not
quality) and the base's tokenizer, saved as a full HF folder — exactly what `tuneloop train` registers for a
classification run. Both servers get the same vLLM settings (pooling runner, dtype float32, eager,
max_model_len, max_num_seqs, seed; tuneloop.runtime.configure_vllm_env), vLLM's started as
``python -m vllm.entrypoints.openai.api_server --runner pooling`` (its endpoint is ``POST /classify``;
tuneloop's is ``POST /v1/classify``, same body and answer).

Load: ``--clients`` concurrent aiohttp clients, ``--requests`` requests per phase, each request one text
(``single``) or ``--batch`` texts (``batch``). The sides are measured in ``--rounds`` interleaved rounds with
a rotating order, both servers up the whole time; the ratio (tuneloop / vLLM, target >= 0.95) compares the
per-side medians of classification requests per second. On a shared machine wall-clock rates move with other
load, so each phase also records the CPU milliseconds per request of each API server process and of its whole
process tree (engine core included), which other load barely moves. tuneloop logs every input to its DuckDB request log
during the run (the count is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tuneloop.deploy.server_process import (  # noqa: E402
    ServerProcess,
    ServerStartError,
    free_port,
    tuneloop_server,
)

TEXTS = [
    "The delivery was late and the box was damaged.",
    "Great product, works exactly as described!",
    "It is fine, nothing special about it.",
    "I would not buy this again, the battery died in a day.",
    "Customer support solved my problem in five minutes.",
    "The colour is slightly different from the photo.",
    "Absolutely love it, my kids use it every day.",
    "Average quality for the price.",
]
LABELS = ["negative", "neutral", "positive"]


def build_classifier(base: Path, dest: Path) -> Path:
    """A seeded 3-label ``*ForSequenceClassification`` over ``base`` (random head), saved with its tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base),
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
        dtype=torch.float32,
    )
    tok = AutoTokenizer.from_pretrained(str(base))
    model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.save_pretrained(str(dest))
    tok.save_pretrained(str(dest))
    return dest


async def load(url: str, path: str, model: str, clients: int, requests: int, batch: int) -> dict:
    """``requests`` classify requests (``batch`` texts each) from ``clients`` concurrent clients."""
    import aiohttp

    lats: list[float] = []
    sem = asyncio.Semaphore(clients)
    conn = aiohttp.TCPConnector(limit=clients, keepalive_timeout=2.0)
    async with aiohttp.ClientSession(base_url=url, connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as h:

        async def one(i: int) -> None:
            texts = [TEXTS[(i + k) % len(TEXTS)] for k in range(batch)]
            body = {"model": model, "input": texts[0] if batch == 1 else texts}
            async with sem:
                t0 = time.perf_counter()
                async with h.post(path, json=body) as r:
                    r.raise_for_status()
                    out = await r.json()
                    assert len(out["data"]) == batch and out["data"][0]["label"] in LABELS, out
                lats.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - t0
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] if len(xs) > 1 else xs[0]  # noqa: E731
    return {"req_s": requests / wall, "inputs_s": requests * batch / wall, "lat_p50": q(lats, 50), "wall_s": wall}


def cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) used so far by the server process ``pid`` and by its whole process tree."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0, 0.0
    own = sum(p.cpu_times()[:2])
    tree = 0.0
    for q in procs:
        try:
            tree += sum(q.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return own, tree


def measured(pid: int, run: Callable[[], dict], requests: int) -> dict:
    """``run()``'s numbers plus the CPU milliseconds per request of the API server process and of its tree
    (engine included): robust to other load on the machine, unlike wall-clock rates."""
    own0, tree0 = cpu_s(pid)
    out = run()
    own1, tree1 = cpu_s(pid)
    return out | {"api_cpu_ms": 1000 * (own1 - own0) / requests, "tree_cpu_ms": 1000 * (tree1 - tree0) / requests}


def phases(pid: int, url: str, path: str, model: str, a: argparse.Namespace) -> dict:
    out = {"single": measured(pid, lambda: asyncio.run(load(url, path, model, a.clients, a.requests, 1)), a.requests)}
    if a.batch > 1:
        n = max(1, a.requests // 4)
        out["batch"] = measured(pid, lambda: asyncio.run(load(url, path, model, a.clients, n, a.batch)), n)
    return out


def wait_ready(server: ServerProcess, timeout: float = 600) -> float:
    try:
        return server.wait_ready(timeout)
    except ServerStartError as e:
        raise SystemExit(str(e)) from None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--base",
        default=str(Path.home() / ".cache/tuneloop/models/smollm2-135m-instruct"),
        help="base model folder the classifier head is put on",
    )
    ap.add_argument("--tiny", action="store_true", help="put the head on the tiny random test model instead")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients")
    ap.add_argument("--requests", type=int, default=256, help="requests per measured phase")
    ap.add_argument("--batch", type=int, default=8, help="texts per request of the batched phase (1 = skip it)")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds (medians are compared)")
    a = ap.parse_args()

    from tuneloop.runtime import configure_vllm_env

    work = Path(tempfile.mkdtemp(prefix="tuneloop-bench-cls-"))
    configure_vllm_env(cache_root=ROOT / ".tuneloop")
    base = Path(a.base)
    if a.tiny:
        from tuneloop.trainer.bootstrap import build_tiny_model

        base = build_tiny_model(work / "tiny-llama")
    model = build_classifier(base, work / f"{base.name}-cls")
    name = model.name
    env = dict(
        os.environ,
        TUNELOOP_ENGINE__MAX_MODEL_LEN=str(a.max_model_len),
        TUNELOOP_ENGINE__MAX_NUM_SEQS="64",
    )
    env.pop("TUNELOOP_CONFIG", None)
    print(f"classifier {model} (head on {base}); {a.clients} clients x {a.requests} requests; work dir {work}")
    servers: dict[str, tuple[ServerProcess, str]] = {
        "tuneloop": (
            tuneloop_server(
                work / "home",
                work / "tuneloop.log",
                model=model,
                serve_args=["--log-level", "warning"],
                env=env,
                cwd=work,
                stop_grace_s=120,
            ),
            "/v1/classify",
        )
    }
    port = free_port()
    vcmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    vcmd += ["--served-model-name", name, "--port", str(port), "--runner", "pooling", "--dtype", "float32"]
    vcmd += ["--enforce-eager", "--max-model-len", str(a.max_model_len), "--max-num-seqs", "64", "--seed", "0"]
    vcmd += ["--disable-log-stats", "--uvicorn-log-level", "warning"]
    servers["vllm"] = (
        ServerProcess(
            vcmd, port, work / "vllm.log", env=env, cwd=work, ready_path="/health", stop_grace_s=120, name="vllm serve"
        ),
        "/classify",
    )
    for srv, _ in servers.values():
        srv.start()
    results: dict = {"config": vars(a) | {"model": str(model), "cpus": os.cpu_count()}}
    rounds: dict[str, list[dict]] = {side: [] for side in servers}
    try:
        for side, (srv, path) in servers.items():
            results[side] = {"start_s": wait_ready(srv)}
            asyncio.run(load(srv.url, path, name, a.clients, a.clients * 2, 1))  # warm-up
        order = list(servers)
        for r in range(a.rounds):
            for side in order[r % len(order) :] + order[: r % len(order)]:
                srv, path = servers[side]
                rounds[side].append(phases(srv.pid, srv.url, path, name, a))
                print(
                    f"round {r + 1} {side}: {json.dumps(rounds[side][-1], default=lambda x: round(x, 4))}", flush=True
                )
    finally:
        for srv, _ in servers.values():
            srv.stop()
    for side in servers:
        results[side] |= {
            phase: {k: statistics.median(r[phase][k] for r in rounds[side]) for k in rounds[side][0][phase]}
            for phase in rounds[side][0]
        } | {"rounds": rounds[side]}
    results["tuneloop"]["logged_rows"] = _count_rows(work / "home" / "tuneloop.duckdb")
    t, v = results["tuneloop"], results["vllm"]
    ratios = {f"{phase}_req_s (>=0.95)": t[phase]["req_s"] / v[phase]["req_s"] for phase in rounds["vllm"][0]}
    results["ratios"] = ratios
    print("\nmedians: requests/s, CPU ms per request of the API process / of the whole server (engine included)")
    for phase in rounds["vllm"][0]:
        print(
            f"  {phase:8s} tuneloop {t[phase]['req_s']:8.1f} req/s {t[phase]['api_cpu_ms']:6.2f} / "
            f"{t[phase]['tree_cpu_ms']:6.2f} ms   vllm {v[phase]['req_s']:8.1f} req/s {v[phase]['api_cpu_ms']:6.2f} / "
            f"{v[phase]['tree_cpu_ms']:6.2f} ms"
        )
    print("ratios (tuneloop / vLLM):")
    for k, ratio in ratios.items():
        print(f"  {k:30s} {ratio:.3f}")
    print(f"logged by tuneloop: {results['tuneloop']['logged_rows']} rows")
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"results: {work / 'results.json'}")
    return 0


def _count_rows(path: Path) -> int:
    from tuneloop.db import open_database

    if not path.exists():
        return 0
    db = open_database(path)
    try:
        return int(db.query("SELECT count(*) AS n FROM requests WHERE route = 'classify'")[0]["n"])
    finally:
        db.close()


if __name__ == "__main__":
    sys.exit(main())
