"""Benchmark: the web console's traffic page on a 1,000,000-row request log, first paint in a real browser.

What it does
------------
1. Builds the tiny test model (random weights: serving speed does not matter here) and a fresh DuckDB file with
   the real schema, and writes ``--rows`` old chat requests (8 to 38 days ago) into its request log with one
   DuckDB ``INSERT ... SELECT FROM range()`` (:func:`seed_log`, which the browser test uses too); then starts
   ``tuneloop serve`` on it and sends 8 live requests.
2. Loads ``/ui/traffic`` (the newest 50 of all rows, plus the total count) ``--loads`` times in Debian's
   Chromium through Playwright, and the named baseline, the same page filtered to the last hour (the 8 live
   rows), as often, interleaved. Timed is the browser's own ``first-contentful-paint`` (a buffered
   ``PerformanceObserver``), and the navigation's time to first byte.
3. Prints both medians and bests, the ratio (whole log / last hour) and the target (first paint <= 1 s on 1M
   rows). ``--json FILE`` writes everything.

Run: ``python bench/console.py`` (about a minute; needs ``chromium`` and the dev requirements).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PAINT = """() => new Promise((done) => new PerformanceObserver((list, obs) => {
  const fcp = list.getEntriesByName('first-contentful-paint')[0];
  if (!fcp) return;
  obs.disconnect();
  const nav = performance.getEntriesByType('navigation')[0];
  done({fcp: fcp.startTime, ttfb: nav.responseStart});
}).observe({type: 'paint', buffered: true}))"""


def seed_log(db: Any, rows: int, version: str = "tiny-a") -> None:
    """``rows`` old chat requests of ``version`` (8 to 38 days ago, one every 2.6 s; every 500th a 500), written
    as one INSERT. Users ``user-0`` .. ``user-96``."""
    from tuneloop.db import utcnow

    with db.connect() as con:
        con.execute(
            f"""INSERT INTO requests (id, received_at, route, model, model_version, arm, prompt, response,
                    finish_reason, prompt_tokens, completion_tokens, ttft_s, latency_s, status, stream, user_id)
                SELECT 'old-' || lpad(CAST(i AS VARCHAR), 7, '0'),
                       CAST(? AS TIMESTAMP) - INTERVAL 8 DAY - to_seconds(i * 2.6),
                       'chat.completions', 'production', ?, 'production',
                       '[{{"role": "user", "content": "old question number ' || i || '"}}]',
                       'old answer ' || i, 'stop', 12, 20, 0.05 + (i % 7) / 100.0, 0.4 + (i % 11) / 10.0,
                       CASE WHEN i % 500 = 0 THEN 500 ELSE 200 END, false, 'user-' || (i % 97)
                FROM range({int(rows)}) t(i)""",
            [utcnow(), version],
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="old rows in the request log (default 1,000,000)")
    ap.add_argument("--loads", type=int, default=5, help="page loads per side (default 5)")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()
    exe = shutil.which("chromium")
    if exe is None:
        print("error: chromium is not installed (make test-deps)", file=sys.stderr)
        return 2
    import openai
    from playwright.sync_api import sync_playwright

    from tuneloop.db import open_database
    from tuneloop.deploy.server_process import tuneloop_server
    from tuneloop.trainer.bootstrap import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="tuneloop-bench-console-"))
    model = build_tiny_model(work / "tiny-llama")
    home = work / "home"
    home.mkdir()
    t0 = time.perf_counter()
    seed_log(open_database(home / "tuneloop.duckdb"), args.rows)
    seeded_s = time.perf_counter() - t0
    server = tuneloop_server(home, work / "serve.log", model=model, overrides=["engine.max_model_len=512"])
    with server as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        for i in range(8):
            client.chat.completions.create(
                model=model.name, messages=[{"role": "user", "content": f"question {i}"}], max_tokens=4
            )
        import httpx

        httpx.post(srv.url + "/admin/log/flush", timeout=60).raise_for_status()
        runs: dict[str, list[dict[str, float]]] = {"whole_log": [], "last_hour": []}
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.goto(srv.url + "/ui/traffic")  # warm-up: templates compiled, DuckDB caches filled
            for _ in range(args.loads):
                for side, path in (("whole_log", "/ui/traffic"), ("last_hour", "/ui/traffic?since=1h")):
                    page.goto(srv.url + path)
                    runs[side].append(page.evaluate(PAINT))
            browser.close()
    shutil.rmtree(work, ignore_errors=True)
    fcp = {side: [r["fcp"] for r in rs] for side, rs in runs.items()}
    med = {side: statistics.median(v) for side, v in fcp.items()}
    result = {
        "rows": args.rows + 8,
        "seed_s": round(seeded_s, 2),
        "runs": runs,
        "median_fcp_ms": med,
        "best_fcp_ms": {side: min(v) for side, v in fcp.items()},
        "ratio_median": med["whole_log"] / med["last_hour"],
        "target_ms": 1000,
    }
    print(f"request log: {result['rows']:,} rows (seeded in {seeded_s:.1f} s)")
    print(f"{'page':<34}{'median first paint':>20}{'best':>10}")
    for side, label in (("whole_log", "/ui/traffic (whole log)"), ("last_hour", "/ui/traffic?since=1h (baseline)")):
        print(f"{label:<34}{med[side]:>17.0f} ms{min(fcp[side]):>7.0f} ms")
    print(f"ratio whole log / last hour: {result['ratio_median']:.2f}x")
    met = med["whole_log"] <= 1000
    print(f"target: first paint <= 1000 ms on {args.rows:,} rows: {'met' if met else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
