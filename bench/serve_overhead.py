"""Serving overhead: ``tuneloop serve`` vs vLLM's own OpenAI server vs the offline engine, same model and settings.

Usage::

    python bench/serve_overhead.py            # SmolLM2-135M-Instruct from the model cache
    python bench/serve_overhead.py --tiny     # the tiny random test model (fast smoke run)
    python bench/serve_overhead.py --shared-only   # embedded DuckDB vs shared PostgreSQL backend, same run

Same load on both servers: ``--clients`` concurrent clients, each sending
chat requests with fixed prompts, greedy, fixed ``max_tokens``, streaming and
non-streaming. Same vLLM settings on both sides (dtype float32, eager,
max_model_len, LoRA enabled with the same rank/slots, max_num_seqs, seed) and
the same CPU environment (tuneloop.runtime.configure_vllm_env). Prints
ratios (tuneloop / vLLM): throughput (target >= 1.0), p50 TTFT (<= 1.0),
logging on/off throughput (>= 0.98), structured-output throughput with the
same ``json_schema`` response format on both servers (>= 0.95), server RSS of
the whole process tree (<= 1.1); and tuneloop at ``--offline-clients`` concurrent clients vs the
offline engine (``vllm.LLM`` on the same prompts, >= 0.95).

``--shared`` adds a side ``tuneloop_pg``: the same server with ``database.url`` on a local PostgreSQL (started by
the benchmark, fsync off), and the ratios shared / embedded for throughput (>= 0.98) and p50 TTFT (<= 1/0.98).
``--shared-only`` runs just those two sides.

All three servers and the offline engine run at once (each idle while another
is measured) and are measured in ``--rounds`` interleaved rounds with a
rotating order, so a change in background load (including the idle sides'
own) hits every side alike; ratios compare per-side medians over the rounds
(every round is kept in the JSON).
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tuneloop.deploy.server_process import (  # noqa: E402
    ServerProcess,
    ServerStartError,
    free_port,
    tuneloop_server,
)

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for learning to cook.",
    "Explain photosynthesis simply.",
    "Write a haiku about the sea.",
    "How do I make a cup of tea?",
    "What is a prime number?",
    "Name three planets in our solar system.",
    "Why is the sky blue?",
]


def tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])
    except psutil.NoSuchProcess:
        return 0


def wait_ready(server: ServerProcess, timeout: float = 600) -> float:
    """Seconds until ``server`` is ready (SystemExit with its log's tail when it fails)."""
    try:
        return server.wait_ready(timeout)
    except ServerStartError as e:
        raise SystemExit(str(e)) from None


# the structured-output round: the same JSON schema on both servers (bounded values, so answers end by themselves)
JSON_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {
                "topic": {"type": "string", "enum": ["geography", "cooking", "science", "poetry", "other"]},
                "confident": {"type": "boolean"},
                "rating": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
            },
            "required": ["topic", "confident", "rating"],
            "additionalProperties": False,
        },
    },
}


async def load(
    url: str, model: str, clients: int, requests: int, max_tokens: int, stream: bool, extra: dict | None = None
) -> dict:
    """``requests`` chat requests from ``clients`` concurrent clients; tokens/s, TTFT and latency percentiles.

    The client is aiohttp (as in vLLM's own serving benchmark): it shares the 2 cores with the
    servers, so it has to be cheap per chunk, or it becomes the bottleneck it is meant to measure.
    """
    import aiohttp

    ttfts, lats, tokens = [], [], 0
    sem = asyncio.Semaphore(clients)
    conn = aiohttp.TCPConnector(limit=clients, keepalive_timeout=2.0)  # below the servers' 5 s keep-alive

    async with aiohttp.ClientSession(base_url=url, connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as h:

        async def one(i: int):
            nonlocal tokens
            body = {
                "model": model,
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": max_tokens,
                "temperature": 0,
                **(extra or {}),
            }
            async with sem:
                t0 = time.perf_counter()
                if stream:
                    body |= {"stream": True, "stream_options": {"include_usage": True}}
                    first = None
                    async with h.post("/v1/chat/completions", json=body) as r:
                        r.raise_for_status()
                        async for raw in r.content:  # one SSE line at a time
                            line = raw.strip()
                            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                                continue
                            d = json.loads(line[6:])
                            if first is None and d.get("choices") and d["choices"][0]["delta"].get("content"):
                                first = time.perf_counter() - t0
                            if d.get("usage"):
                                tokens += d["usage"]["completion_tokens"]
                    ttfts.append(first if first is not None else time.perf_counter() - t0)
                else:
                    async with h.post("/v1/chat/completions", json=body) as r:
                        r.raise_for_status()
                        tokens += (await r.json())["usage"]["completion_tokens"]
                lats.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - t0
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] if len(xs) > 1 else (xs[0] if xs else float("nan"))  # noqa: E731
    return {
        "tok_s": tokens / wall,
        "tokens": tokens,
        "wall_s": wall,
        "ttft_p50": q(ttfts, 50) if ttfts else None,
        "lat_p50": q(lats, 50),
        "lat_p95": q(lats, 95),
    }


def phases(server: ServerProcess, model: str, a) -> dict:
    """One round of measured phases on ``server``: non-streaming, streaming, and (optionally) wide."""
    out = {}
    for stream in (False, True):
        out["stream" if stream else "plain"] = asyncio.run(
            load(server.url, model, a.clients, a.requests, a.max_tokens, stream)
        )
    if a.structured:
        out["json_schema"] = asyncio.run(
            load(server.url, model, a.clients, a.requests, a.max_tokens, False, {"response_format": JSON_FORMAT})
        )
    if a.offline_clients:
        out["wide"] = asyncio.run(
            load(server.url, model, a.offline_clients, a.offline_clients * 2, a.max_tokens, False)
        )
    return out


def median_round(rounds: list[dict]) -> dict:
    """Per phase and metric, the median over rounds (robust to one disturbed round)."""
    out: dict = {}
    for phase in rounds[0]:
        out[phase] = {
            k: statistics.median(r[phase][k] for r in rounds)
            for k in rounds[0][phase]
            if all(r[phase][k] is not None for r in rounds)
        }
    return out


def offline_engine(model_dir: str, a):
    """The offline engine, same settings as the servers, warmed up."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model_dir,
        dtype="float32",
        enforce_eager=True,
        max_model_len=a.max_model_len,
        enable_lora=True,
        max_lora_rank=16,
        max_loras=4,
        max_num_seqs=64,
        seed=0,
    )
    llm.chat(
        [[{"role": "user", "content": p}] for p in PROMPTS[:4]],
        SamplingParams(temperature=0, max_tokens=a.max_tokens),
        use_tqdm=False,
    )
    return llm


def offline(llm, a) -> dict:
    """One measured batch: ``2 x --offline-clients`` chats in one ``LLM.chat`` call."""
    from vllm import SamplingParams

    msgs = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(a.offline_clients * 2)]
    sp = SamplingParams(temperature=0, max_tokens=a.max_tokens)
    t0 = time.perf_counter()
    outs = llm.chat(msgs, sp, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default=str(Path.home() / ".cache/tuneloop/models/smollm2-135m-instruct"), help="model folder"
    )
    ap.add_argument("--tiny", action="store_true", help="build and use the tiny random test model")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients")
    ap.add_argument("--requests", type=int, default=64, help="requests per measured phase")
    ap.add_argument("--max-tokens", type=int, default=32, help="completion tokens per request")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument(
        "--offline-clients", type=int, default=64, help="concurrency of the offline-engine comparison (0 = skip)"
    )
    ap.add_argument("--skip-log-off", action="store_true", help="skip the logging-off run")
    ap.add_argument(
        "--no-structured",
        dest="structured",
        action="store_false",
        help="skip the structured-output (json_schema) round",
    )
    ap.add_argument(
        "--rounds", type=int, default=3, help="interleaved measurement rounds per side (medians are compared)"
    )
    ap.add_argument("--shared", action="store_true", help="also measure the shared PostgreSQL backend")
    ap.add_argument(
        "--shared-only", action="store_true", help="only the embedded vs shared backend comparison (no vLLM side)"
    )
    a = ap.parse_args()
    if a.shared_only:
        a.shared, a.skip_log_off, a.offline_clients = True, True, 0

    from tuneloop.runtime import configure_vllm_env

    work = Path(tempfile.mkdtemp(prefix="tuneloop-bench-"))
    configure_vllm_env(cache_root=ROOT / ".tuneloop")
    model = a.model
    if a.tiny:
        from tuneloop.trainer.bootstrap import build_tiny_model

        model = str(build_tiny_model(work / "tiny-llama"))
    name = Path(model).name
    env = dict(
        os.environ,
        TUNELOOP_ENGINE__MAX_MODEL_LEN=str(a.max_model_len),
        TUNELOOP_ENGINE__MAX_NUM_SEQS="64",
        TUNELOOP_ENGINE__MAX_LORA_RANK="16",
        TUNELOOP_ENGINE__MAX_LORAS="4",
    )
    env.pop("TUNELOOP_CONFIG", None)
    results: dict = {
        "config": vars(a)
        | {
            "model": model,
            "cpus": os.cpu_count(),
            "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_CPU")},
        }
    }
    print(
        f"model {model}; {a.clients} clients x {a.requests} requests, max_tokens={a.max_tokens}; work dir {work}",
        flush=True,
    )

    sides = [("tuneloop", {}), ("tuneloop_nolog", {"TUNELOOP_LOG__ENABLED": "false"})]
    if a.skip_log_off:
        sides = sides[:1]
    pg = None
    if a.shared:
        from tuneloop.deploy.postgres_server import LocalPostgres

        pg_root = Path(tempfile.mkdtemp(prefix="tuneloop-bench-pg-"))
        pg_root.chmod(0o755)
        pg = LocalPostgres(pg_root).start()
        sides.append(("tuneloop_pg", {"TUNELOOP_DATABASE__URL": pg.url}))
    servers: dict[str, ServerProcess] = {}
    for side, extra in sides:  # separate homes: each tuneloop side owns its database
        servers[side] = tuneloop_server(
            work / f"home-{side}",
            work / f"{side}.log",
            model=model,
            serve_args=["--log-level", "warning"],
            env=env | extra,
            cwd=work,
            stop_grace_s=120,
        )
    port = free_port()
    vcmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--served-model-name",
        name,
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        str(a.max_model_len),
        "--enable-lora",
        "--max-lora-rank",
        "16",
        "--max-loras",
        "4",
        "--max-num-seqs",
        "64",
        "--seed",
        "0",
        "--disable-log-stats",
        # tuneloop's defaults (engine.structured_outputs_backend, engine.compact_json), so both sides constrain alike
        "--structured-outputs-config",
        json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
        "--uvicorn-log-level",
        "warning",
    ]
    if not a.shared_only:
        servers["vllm"] = ServerProcess(
            vcmd, port, work / "vllm.log", env=env, cwd=work, ready_path="/health", stop_grace_s=120, name="vllm serve"
        )
    for srv in servers.values():  # all start at once
        srv.start()
    rounds: dict[str, list[dict]] = {side: [] for side in servers}
    try:
        for side, srv in servers.items():  # all up at once, idle while another side is measured
            results[side] = {"start_s": wait_ready(srv)}
            asyncio.run(load(srv.url, name, a.clients, a.clients, a.max_tokens, False))  # warm-up
        order = list(servers)
        llm = None
        if a.offline_clients:
            llm = offline_engine(model, a)
            order.append("offline")
            rounds["offline"] = []
        for r in range(a.rounds):  # interleaved rounds, rotating the order so no side always goes first
            for side in order[r % len(order) :] + order[: r % len(order)]:
                rounds[side].append({"wide": offline(llm, a)} if side == "offline" else phases(servers[side], name, a))
                print(
                    f"round {r + 1} {side}: {json.dumps(rounds[side][-1], default=lambda x: round(x, 4) if isinstance(x, float) else x)}",
                    flush=True,
                )
        for side, srv in servers.items():
            results[side] |= median_round(rounds[side]) | {"rounds": rounds[side], "rss_bytes": tree_rss(srv.pid)}
        if llm is not None:
            results["offline"] = median_round(rounds["offline"])["wide"] | {"rounds": rounds["offline"]}
    finally:
        for srv in servers.values():
            srv.stop()
    if "tuneloop" in results:
        results["tuneloop"]["logged_rows"] = _count_rows(work / "home-tuneloop" / "tuneloop.duckdb")
    if pg is not None:
        results["tuneloop_pg"]["logged_rows"] = _count_rows(pg.url)
        pg.stop()

    t = results["tuneloop"]
    ratios = {}
    if "vllm" in results:
        v = results["vllm"]
        ratios |= {
            "throughput_plain (>=1.0)": t["plain"]["tok_s"] / v["plain"]["tok_s"],
            "throughput_stream (>=1.0)": t["stream"]["tok_s"] / v["stream"]["tok_s"],
            "ttft_p50_stream (<=1.0)": t["stream"]["ttft_p50"] / v["stream"]["ttft_p50"],
            "rss_tree (<=1.1)": t["rss_bytes"] / v["rss_bytes"],
        }
    if "tuneloop_pg" in results:
        g = results["tuneloop_pg"]
        ratios |= {
            "shared_vs_embedded_throughput_plain (>=0.98)": g["plain"]["tok_s"] / t["plain"]["tok_s"],
            "shared_vs_embedded_throughput_stream (>=0.98)": g["stream"]["tok_s"] / t["stream"]["tok_s"],
            "shared_vs_embedded_ttft_p50_stream (<=1.02)": g["stream"]["ttft_p50"] / t["stream"]["ttft_p50"],
        }
    if a.structured and "vllm" in results:
        ratios["throughput_json_schema (>=0.95)"] = t["json_schema"]["tok_s"] / results["vllm"]["json_schema"]["tok_s"]
    if "tuneloop_nolog" in results:
        n = results["tuneloop_nolog"]
        ratios["logging_on_off_plain (>=0.98)"] = t["plain"]["tok_s"] / n["plain"]["tok_s"]
        ratios["logging_on_off_stream (>=0.98)"] = t["stream"]["tok_s"] / n["stream"]["tok_s"]
    if a.offline_clients:
        ratios[f"tuneloop_{a.offline_clients}_clients_vs_offline (>=0.95)"] = (
            t["wide"]["tok_s"] / results["offline"]["tok_s"]
        )
    results["ratios"] = ratios
    print("\nratios (tuneloop / baseline):")
    for k, r in ratios.items():
        print(f"  {k:45s} {r:.3f}")
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nresults: {work / 'results.json'}")
    return 0


def _count_rows(where: Path | str) -> int:
    """Logged requests in a DuckDB file (0 if it does not exist) or a PostgreSQL URL."""
    from tuneloop.db import is_postgres_url, open_database

    if not is_postgres_url(str(where)) and not Path(where).exists():
        return 0
    db = open_database(where)
    try:
        return int(db.query("SELECT count(*) AS n FROM requests")[0]["n"])
    finally:
        db.close()


if __name__ == "__main__":
    sys.exit(main())
