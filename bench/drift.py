"""Benchmark: tuneloop's drift statistics over 1,000,000 logged requests vs Evidently, same data, same run.

What it does
------------
1. Writes 1,000,000 synthetic production requests (model version ``bench-v1``)
   and 100,000 reference rows (``bench-ref``, the "training" side) into a fresh
   DuckDB file with the real schema (``tuneloop.db.Database`` migrations), in
   DuckDB SQL: chat-message prompts drawn from a Zipf-like 5,000-word
   vocabulary, prompt/response token counts and a finish_reason mix; production
   is mildly shifted (longer prompts, new words, more ``length`` finishes).
   The reference profile (the dict ``monitoring.profile`` stores) is built from
   the reference rows once, outside the timings, as the drift job finds it
   stored in ``reference_profiles``.
2. In a fresh child process (so peak RSS is the drift work's own), times
   a) the statistics both tools compute, from the database: value counts in
      DuckDB SQL of prompt_tokens and finish_reason on both sides, then PSI
      (reference-quantile bins), KS, Wasserstein (``monitoring.drift_stats``) and
      categorical Jensen-Shannon;
   b) tuneloop's full non-embedding drift pass: ``production_stats`` over the
      1M-row window (lengths, word counts joined to the vocabulary, finish /
      empty shares, feedback) + ``compare`` (every statistic with its null
      calibration), i.e. what ``DriftJob`` does per version minus embeddings,
      with the default ``drift.word_sample`` (words of 50k requests counted);
   c) the same pass counting every word (``word_sample=0``), once, to show
      what the sample costs in accuracy (values printed side by side).
   Peak RSS is each child's VmHWM (``ru_maxrss`` carries the parent's over).
3. Runs Evidently 0.7.23 in a separate venv (``.cache/bench-venv``, created here
   with ``evidently==0.7.23 'pandas<3'`` when missing: Evidently does not import
   with pandas 3) in a child process, on the same rows exported to Parquet:
   ``ValueDrift`` with method psi / ks / wasserstein on prompt_tokens and
   jensenshannon on finish_reason; timed is ``Report.run`` (the Parquet ->
   pandas load is reported separately).
4. Prints a table, the speed ratios, both tools' values side by side, and
   checks the targets (<= 1 s for the statistics, >= 10x faster than
   Evidently, peak RSS <= 0.4 GB). ``--json`` writes everything to a file.

5. ``--scan``: instead of 1-4, the drift scan rate over the three places the
   logs can be read from, for the same rows: the DuckDB file, a PostgreSQL
   database (a throwaway ``LocalPostgres`` started here, rows loaded with
   COPY) and the Parquet exports ``tuneloop export logs`` writes of it. Timed is
   ``DriftJob.compute`` (the job's real path: on PostgreSQL the window is
   found with portable SQL and only its rows are copied into DuckDB as Arrow;
   then ``production_stats`` + ``compare``, no embeddings), best of
   ``--repeats``; rows/s = requests in the window / seconds. For PostgreSQL
   the copy alone (``LogSource.connect`` of the window) is timed too. Prints
   the ratios and checks the statistics agree across the three.

Usage::

    python bench/drift.py                        # 1M production + 100k reference rows
    python bench/drift.py --rows 200000 --repeats 1 --skip-evidently   # quick look
    python bench/drift.py --scan --rows 100000 --reference-rows 10000   # DuckDB file vs PostgreSQL vs Parquet
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BENCH_VENV = ROOT / ".cache" / "bench-venv"
EVIDENTLY_REQ = ["evidently==0.7.23", "pandas<3"]
VOCAB_WORDS = 5000
TARGET_S, TARGET_RATIO, TARGET_RSS_GB = 1.0, 10.0, 0.4


# ---- data ------------------------------------------------------------------------------------------


def _insert_sql(version: str, n: int, max_words: int, new_word_share: float, length_share: float, day: str) -> str:
    """INSERT of ``n`` synthetic requests of ``version`` (real columns; prompt = one user message)."""
    return f"""
    INSERT INTO requests (id, received_at, route, model, model_version, arm, prompt, response, finish_reason,
                          prompt_tokens, completion_tokens, ttft_s, latency_s, status, error, stream, params,
                          user_id, key_id)
    SELECT '{version}-' || i, TIMESTAMP '{day}' + to_seconds(i / 20), 'chat.completions', '{version}', '{version}',
           'direct',
           json_array(json_object('role', 'user', 'content', txt)),
           CASE WHEN resp_tokens = 0 THEN '' ELSE 'answer ' || i END,
           CASE WHEN random() < {length_share} THEN 'length' ELSE 'stop' END,
           18 + round(nw * 1.3)::INTEGER, resp_tokens, 0.05, 0.5, 200, NULL, false, NULL, NULL, NULL
    FROM (
      SELECT i, nw, greatest(0, round(40 + 25 * sqrt(-2 * ln(random() + 1e-12)) * cos(2 * pi() * random())))::INTEGER AS resp_tokens,
             array_to_string(list_transform(range(nw), lambda x: CASE WHEN random() < {new_word_share}
                                  THEN 'new' || floor(random() * 500)::INTEGER
                                  ELSE 'w' || floor(pow(random(), 3) * {VOCAB_WORDS})::INTEGER END), ' ') AS txt
      FROM (SELECT i, (5 + floor(random() * {max_words - 4}))::INTEGER AS nw FROM range({n}) t(i))
    )"""


def make_database(path: Path, rows: int, ref_rows: int, seed: float = 0.42) -> dict:
    """Fresh DuckDB file with the real schema, ``rows`` production + ``ref_rows`` reference requests."""
    from tuneloop.db import open_database

    db = open_database(path)
    t = time.perf_counter()
    with db.connect() as con:
        con.execute(f"SELECT setseed({seed})")
        con.execute(_insert_sql("bench-ref", ref_rows, 40, 0.0, 0.10, "2025-01-01"))
        con.execute(_insert_sql("bench-v1", rows, 48, 0.02, 0.15, "2025-02-01"))
    return {"generate_s": time.perf_counter() - t, "db_bytes": path.stat().st_size}


def reference_profile(path: Path, vocab_size: int = 10000, seed: int = 0) -> dict:
    """The profile dict ``monitoring.profile`` stores, built from the reference rows with SQL (not timed)."""
    import numpy as np

    from tuneloop.db import open_database
    from tuneloop.monitoring.drift import _TEXT_SQL, WORD_PATTERN
    from tuneloop.monitoring.profile import js_null

    ref = "model_version = 'bench-ref'"
    with open_database(path).connect(transaction=False) as con:

        def vc(col):
            return [
                [int(a), int(b)]
                for a, b in con.execute(
                    f"SELECT {col}, count(*) FROM requests WHERE {ref} GROUP BY 1 ORDER BY 1"
                ).fetchall()
            ]

        n, flen, empty = con.execute(f"""SELECT count(*), count(*) FILTER (WHERE finish_reason = 'length'),
                                         count(*) FILTER (WHERE response = '') FROM requests WHERE {ref}""").fetchone()
        wc = con.execute(f"""SELECT word, count(*) AS c FROM (SELECT unnest(regexp_extract_all(lower({_TEXT_SQL}), '{WORD_PATTERN.replace("'", "''")}')) AS word
                             FROM requests WHERE {ref}) GROUP BY word ORDER BY c DESC, word""").fetchall()
        texts = [
            r[0]
            for r in con.execute(
                f"SELECT {_TEXT_SQL} FROM requests WHERE {ref} USING SAMPLE reservoir(5000 ROWS) REPEATABLE (1)"
            ).fetchall()
        ]
        prompt_length, response_length = vc("prompt_tokens"), vc("completion_tokens")
    total = sum(c for _, c in wc)
    top = wc[:vocab_size]
    kept = sum(c for _, c in top)
    return {
        "n_rows": int(n),
        "prompt_length": prompt_length,
        "response_length": response_length,
        "vocab": [w for w, _ in top],
        "vocab_counts": [c for _, c in top],
        "total_tokens": total,
        "oov_tokens": total - kept,
        "oov_expected": ((total - kept) + sum(1 for _, c in top if c == 1)) / total,
        "finish_mix": {"length": int(flen), "stop": int(n - flen)},
        "empty_share": empty / n,
        "js_null": js_null(texts, vocab_size, np.random.default_rng(seed)),
    }


# ---- tuneloop side (runs in a child process) -------------------------------------------------------


def common_statistics(path: Path) -> dict:
    """PSI, KS, Wasserstein on prompt_tokens and categorical JS on finish_reason, from the database."""
    import numpy as np

    from tuneloop.db import open_database
    from tuneloop.monitoring.drift_stats import js_divergence, ks_counts, psi_counts, wasserstein_counts

    with open_database(path, read_only=True).connect(transaction=False) as con:
        lens = con.execute("""SELECT model_version = 'bench-v1' AS prod, prompt_tokens, count(*) FROM requests
                              WHERE model_version IN ('bench-ref', 'bench-v1') AND status < 400 GROUP BY ALL""").fetchnumpy()
        fin = con.execute("""SELECT model_version = 'bench-v1' AS prod, finish_reason, count(*) FROM requests
                             WHERE model_version IN ('bench-ref', 'bench-v1') AND status < 400 GROUP BY ALL""").fetchall()
    prod, val, cnt = (
        np.asarray(lens["prod"]),
        np.asarray(lens["prompt_tokens"], float),
        np.asarray(lens["count_star()"], float),
    )
    rv, rc, pv, pc = val[~prod], cnt[~prod], val[prod], cnt[prod]
    psi, *_ = psi_counts(rv, rc, pv, pc, 10)
    d, p = ks_counts(rv, rc, pv, pc)
    wd = wasserstein_counts(rv, rc, pv, pc)
    mean = np.average(rv, weights=rc)
    ref_std = float(np.sqrt(np.average((rv - mean) ** 2, weights=rc)))  # ddof=0, as Evidently normalises
    cats = sorted({c for _, c, _ in fin})
    ref_f = np.array([sum(n for pr, c, n in fin if c == k and not pr) for k in cats], float)
    prod_f = np.array([sum(n for pr, c, n in fin if c == k and pr) for k in cats], float)
    js_nat = js_divergence(ref_f, prod_f, base=np.e)
    return {
        "psi": psi,
        "ks_statistic": d,
        "ks_pvalue": p,
        "wasserstein": wd,
        "wasserstein_normed": wd / ref_std,
        "js_divergence_nat": js_nat,
        "js_distance_nat": float(np.sqrt(js_nat)),
        "n_reference": int(rc.sum()),
        "n_production": int(pc.sum()),
    }


def full_pass(path: Path, profile: dict, word_sample: int | None = None) -> dict:
    """``production_stats`` over the whole production window + ``compare`` without embeddings.

    Words are counted as the drift job counts them (``drift.word_sample`` requests at most) unless
    ``word_sample`` overrides it (0: every request, the exact count)."""
    from datetime import datetime

    from tuneloop.db import open_database
    from tuneloop.monitoring.drift import compare, parse_window, production_stats
    from tuneloop.settings import DriftSettings

    settings = DriftSettings(embeddings=False)
    if word_sample is not None:
        settings.word_sample = word_sample
    with open_database(path, read_only=True).connect(transaction=False) as con:
        prod = production_stats(
            con,
            "bench-v1",
            parse_window("3650d"),
            profile["vocab"],
            datetime(2026, 1, 1),
            word_sample=settings.word_sample,
        )
    res = compare(profile, prod, settings, "bench")
    return {
        "n_requests": prod.n_requests,
        "score": res.score,
        "features": {
            f.feature: {"value": f.value, "threshold": f.threshold, "drifted": f.drifted} for f in res.features
        },
    }


def peak_rss_gb() -> float:
    """This process's peak RSS in GB: VmHWM, the high-water mark of this program's own memory.

    Not ``getrusage().ru_maxrss``: Linux carries that over from the parent at fork+exec, so a child
    started by this benchmark right after it generated 1M rows reported the parent's ~0.37 GB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024**2


def ours_child(path: Path, profile_path: Path, which: str, repeats: int) -> None:
    """Child-process entry: time one measurement (``common`` or ``full``) and print JSON with this process's peak RSS."""
    import numpy as np  # noqa: F401  (imports are not timed: a server has them loaded)
    import scipy.stats  # noqa: F401

    profile = json.loads(profile_path.read_text())
    fn = {
        "common": lambda: common_statistics(path),
        "full": lambda: full_pass(path, profile),
        "full_exact": lambda: full_pass(path, profile, word_sample=0),
    }[which]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        values = fn()
        times.append(time.perf_counter() - t)
    print(json.dumps({"times_s": times, "values": values, "peak_rss_gb": peak_rss_gb()}))


# ---- Evidently side (runs in the bench venv) -------------------------------------------------------

EVIDENTLY_CHILD = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import pandas as pd
import evidently
from evidently import DataDefinition, Dataset, Report
from evidently.metrics import ValueDrift

ref_path, prod_path, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = time.perf_counter()
ref, cur = pd.read_parquet(ref_path), pd.read_parquet(prod_path)
load_s = time.perf_counter() - t
definition = DataDefinition(numerical_columns=["prompt_tokens"], categorical_columns=["finish_reason"])
metrics = [ValueDrift(column="prompt_tokens", method="psi"), ValueDrift(column="prompt_tokens", method="ks"),
           ValueDrift(column="prompt_tokens", method="wasserstein"), ValueDrift(column="finish_reason", method="jensenshannon")]
times = []
for _ in range(repeats):
    t = time.perf_counter()
    snap = Report(metrics).run(Dataset.from_pandas(cur, data_definition=definition),
                               Dataset.from_pandas(ref, data_definition=definition))
    d = snap.dict()
    times.append(time.perf_counter() - t)
values = {}
for m, name in zip(d["metrics"], ["psi", "ks_pvalue", "wasserstein_normed", "js_distance_nat"]):
    v = m["value"]
    values[name] = float(v if not isinstance(v, dict) else next(iter(v.values())))
def peak_rss_gb():  # VmHWM, as on our side (ru_maxrss would include the parent's RSS)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024 ** 2
print(json.dumps({"version": evidently.__version__, "pandas": pd.__version__, "load_s": load_s, "times_s": times,
                  "values": values, "peak_rss_gb": peak_rss_gb()}))
"""


def ensure_bench_venv() -> Path:
    """``.cache/bench-venv`` with Evidently 0.7.23 and pandas<3 (created on first use)."""
    py = BENCH_VENV / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import evidently"], capture_output=True).returncode == 0:
        return py
    print(f"creating {BENCH_VENV} with {' '.join(EVIDENTLY_REQ)} (once) ...", file=sys.stderr)
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(BENCH_VENV)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *EVIDENTLY_REQ], check=True)
    return py


def run_evidently(path: Path, tmp: Path, repeats: int) -> dict:
    import duckdb

    py = ensure_bench_venv()
    con = duckdb.connect(str(path), read_only=True)
    for name, version in (("ref", "bench-ref"), ("prod", "bench-v1")):
        con.execute(f"""COPY (SELECT prompt_tokens, finish_reason FROM requests WHERE model_version = '{version}' AND status < 400)
                        TO '{tmp / name}.parquet' (FORMAT parquet)""")
    con.close()
    (tmp / "evidently_child.py").write_text(EVIDENTLY_CHILD)
    r = subprocess.run(
        [str(py), str(tmp / "evidently_child.py"), str(tmp / "ref.parquet"), str(tmp / "prod.parquet"), str(repeats)],
        capture_output=True,
        text=True,
        cwd=tmp,
    )
    if r.returncode != 0:
        raise SystemExit(f"Evidently run failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- scan rate over the DuckDB file, PostgreSQL and Parquet (--scan) ---------------------------------


def load_postgres(duck_path: Path, url: str) -> dict:
    """Every row of the DuckDB file's ``requests`` into the PostgreSQL database at ``url`` (COPY)."""
    import duckdb

    from tuneloop.db import open_database
    from tuneloop.monitoring.sources import table_columns

    cols = [n for n, _ in table_columns("requests")]
    db = open_database(url)
    t = time.perf_counter()
    con = duckdb.connect(str(duck_path), read_only=True)
    try:
        cur = con.execute(f"SELECT {', '.join(cols)} FROM requests")
        with db.connect() as pg:
            while batch := cur.fetchmany(20_000):
                pg.copy_rows("requests", cols, batch)
            pg.execute("ANALYZE requests")
    finally:
        con.close()
        db.close()
    return {"load_s": time.perf_counter() - t}


def scan_pass(db_url: str, parquet: str | None, profile: dict, repeats: int) -> dict:
    """Best-of-``repeats`` ``DriftJob.compute`` of bench-v1 over its whole window from one source."""
    from datetime import datetime

    from tuneloop.db import open_database
    from tuneloop.monitoring.drift import parse_window
    from tuneloop.monitoring.drift_job import DriftJob
    from tuneloop.monitoring.profile import Profile, store_profile
    from tuneloop.monitoring.sources import log_source
    from tuneloop.settings import DriftSettings

    db = open_database(db_url)
    try:
        store_profile(db, Profile("bench-v1", None, profile))
        src = log_source(db, parquet)
        job = DriftJob(db, DriftSettings(embeddings=False), None, source=src)
        window, now = parse_window("3650d"), datetime(2026, 1, 1)
        times, copy_times = [], []
        res = None
        for _ in range(repeats):
            t = time.perf_counter()
            res = job.compute("bench-v1", window, now)
            times.append(time.perf_counter() - t)
            if src.copies:  # the PostgreSQL -> DuckDB copy of the same window, alone
                start, end = job.window_span("bench-v1", window, now)
                t = time.perf_counter()
                with src.connect(since=start, until=end, model_version="bench-v1"):
                    pass
                copy_times.append(time.perf_counter() - t)
        assert res is not None and res.skipped is None, res
        return {
            "n_requests": res.n_requests,
            "times_s": times,
            "copy_s": copy_times,
            "features": {f.feature: f.value for f in res.features},
        }
    finally:
        db.close()


def run_scan(a: argparse.Namespace) -> int:
    """``--scan``: the drift pass over the DuckDB file vs PostgreSQL vs Parquet exports (see module doc)."""
    from datetime import datetime

    from tuneloop.db import open_database
    from tuneloop.deploy.postgres_server import LocalPostgres
    from tuneloop.monitoring.export import export_logs

    with tempfile.TemporaryDirectory(prefix="tuneloop-bench-scan-") as d:
        tmp = Path(d)
        tmp.chmod(0o755)  # the PostgreSQL server may run as another user (root runs it as nobody)
        db_path = tmp / "tuneloop.duckdb"
        print(f"generating {a.rows:,} production + {a.reference_rows:,} reference requests ...", file=sys.stderr)
        gen = make_database(db_path, a.rows, a.reference_rows)
        profile = reference_profile(db_path)
        t = time.perf_counter()
        export_logs(open_database(db_path), tmp / "parquet", "bench", window_s=86400, now=datetime(2026, 1, 1))
        export_s = time.perf_counter() - t
        (tmp / "pg").mkdir()
        (tmp / "pg").chmod(0o755)
        with LocalPostgres(tmp / "pg") as pg:
            print("loading PostgreSQL ...", file=sys.stderr)
            load = load_postgres(db_path, pg.url)
            print("timing the drift pass over each source ...", file=sys.stderr)
            runs = {
                "duckdb": scan_pass(str(db_path), None, profile, a.repeats),
                "postgres": scan_pass(pg.url, None, profile, a.repeats),
                # control plane (the profile) in a second DuckDB file, logs from the Parquet exports
                "parquet": scan_pass(str(tmp / "control.duckdb"), str(tmp / "parquet"), profile, a.repeats),
            }
    n = runs["duckdb"]["n_requests"]
    best = {k: min(v["times_s"]) for k, v in runs.items()}
    rate = {k: n / v for k, v in best.items()}
    ref = runs["duckdb"]["features"]
    agree = all(
        runs[k]["n_requests"] == n
        and runs[k]["features"].keys() == ref.keys()
        and all(abs(runs[k]["features"][f] - ref[f]) <= 1e-9 * max(1.0, abs(ref[f])) for f in ref)
        for k in runs
    )
    print(
        f"\ndrift pass over {n:,} requests of one version ({a.reference_rows:,} other rows in the table); "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; best of {a.repeats}"
    )
    print(f"{'source':36s} {'seconds':>8s} {'rows/s':>10s} {'time / file':>15s}")
    for k, label in (
        ("duckdb", "DuckDB file"),
        ("postgres", "PostgreSQL (window copied as Arrow)"),
        ("parquet", "Parquet exports"),
    ):
        print(f"{label:36s} {best[k]:8.3f} {rate[k]:10,.0f} {best[k] / best['duckdb']:14.2f}x")
    copy_s = min(runs["postgres"]["copy_s"])
    print(f"{'  of which PostgreSQL -> DuckDB copy':36s} {copy_s:8.3f} {n / copy_s:10,.0f}")
    print(f"PostgreSQL load (COPY, not timed above): {load['load_s']:.1f} s; Parquet export: {export_s:.1f} s")
    print(f"statistics equal across the three sources: {agree}")
    if a.json:
        a.json.write_text(
            json.dumps(
                {"rows": a.rows, "generate": gen, "load": load, "export_s": export_s, "runs": runs, "agree": agree},
                indent=2,
                default=str,
            )
        )
    return 0 if agree else 1


# ---- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=1_000_000, help="production requests (default 1,000,000)")
    ap.add_argument("--reference-rows", type=int, default=100_000, help="reference rows (default 100,000)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions per measurement; the best is reported")
    ap.add_argument("--skip-evidently", action="store_true", help="only time tuneloop")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument(
        "--scan",
        action="store_true",
        help="time the drift pass over the DuckDB file vs PostgreSQL vs Parquet exports instead (module doc, 5)",
    )
    ap.add_argument("--_ours", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.scan:
        return run_scan(a)
    if a._ours:
        ours_child(Path(a._ours[0]), Path(a._ours[1]), a._ours[2], a.repeats)
        return 0

    with tempfile.TemporaryDirectory(prefix="tuneloop-bench-drift-") as d:
        tmp = Path(d)
        db_path = tmp / "tuneloop.duckdb"
        print(f"generating {a.rows:,} production + {a.reference_rows:,} reference requests ...", file=sys.stderr)
        gen = make_database(db_path, a.rows, a.reference_rows)
        (tmp / "profile.json").write_text(json.dumps(reference_profile(db_path)))
        print(f"  {gen['generate_s']:.1f} s, {gen['db_bytes'] / 1e6:.0f} MB; timing tuneloop ...", file=sys.stderr)
        ours = {}
        for which in ("common", "full", "full_exact"):  # one fresh process each: its peak RSS is that measurement's own
            r = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--_ours",
                    str(db_path),
                    str(tmp / "profile.json"),
                    which,
                    "--repeats",
                    "1" if which == "full_exact" else str(a.repeats),
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            if r.returncode != 0:
                raise SystemExit(f"tuneloop run failed:\n{r.stderr[-4000:]}")
            ours[which] = json.loads(r.stdout.strip().splitlines()[-1])
        ev = None
        if not a.skip_evidently:
            print("timing Evidently ...", file=sys.stderr)
            ev = run_evidently(db_path, tmp, max(1, min(a.repeats, 2)))

    common_s, full_s = min(ours["common"]["times_s"]), min(ours["full"]["times_s"])
    result = {
        "rows": a.rows,
        "reference_rows": a.reference_rows,
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "generate": gen,
        "tuneloop": ours,
        "evidently": ev,
    }
    print(
        f"\n{a.rows:,} production vs {a.reference_rows:,} reference requests; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}; best of {a.repeats}"
    )
    print(f"{'what':58s} {'seconds':>8s} {'peak RSS GB':>12s}")
    print(
        f"{'tuneloop: PSI+KS+Wasserstein+categorical JS (SQL + numpy)':58s} {common_s:8.3f} {ours['common']['peak_rss_gb']:12.2f}"
    )
    print(
        f"{'tuneloop: full non-embedding drift pass (production_stats+compare)':58s} {full_s:8.3f} {ours['full']['peak_rss_gb']:12.2f}"
    )
    exact = ours["full_exact"]
    print(
        f"{'  the same, counting every word (drift.word_sample=0)':58s} {min(exact['times_s']):8.3f} {exact['peak_rss_gb']:12.2f}"
    )
    fs, fe = ours["full"]["values"]["features"], exact["values"]["features"]
    print(
        "  sampled vs exact word statistics: "
        + ", ".join(
            f"{k} {fs[k]['value']:.4f} vs {fe[k]['value']:.4f} (drifted {fs[k]['drifted']} / {fe[k]['drifted']})"
            for k in ("vocabulary", "oov")
        )
    )
    if ev:
        ev_s = min(ev["times_s"])
        print(
            f"{'Evidently ' + ev['version'] + ': the same 4 statistics (Report.run)':58s} {ev_s:8.3f} {ev['peak_rss_gb']:12.2f}"
        )
        print(f"{'Evidently: Parquet -> pandas load (not in its time)':58s} {ev['load_s']:8.3f}")
        result["ratio_common"] = ev_s / common_s
        result["ratio_full"] = ev_s / full_s
        print(
            f"\nspeed-up vs Evidently: {ev_s / common_s:.1f}x (same statistics), {ev_s / full_s:.1f}x (our full pass)"
        )
        print("\nvalues        tuneloop              Evidently")
        ov = ours["common"]["values"]
        for key, ours_key in (
            ("psi", "psi"),
            ("ks_pvalue", "ks_pvalue"),
            ("wasserstein_normed", "wasserstein_normed"),
            ("js_distance_nat", "js_distance_nat"),
        ):
            print(f"{key:18s} {ov[ours_key]:<20.6g} {ev['values'][key]:.6g}")
        print("(PSI differs by design: ours bins at reference quantiles, Evidently equal-width over both samples)")
    checks = {
        "stats_under_1s": common_s <= TARGET_S,
        "full_pass_under_1s": full_s <= TARGET_S,
        "stats_rss_under_0.4GB": ours["common"]["peak_rss_gb"] <= TARGET_RSS_GB,
        "full_pass_rss_under_0.4GB": ours["full"]["peak_rss_gb"] <= TARGET_RSS_GB,
    }
    if ev:
        checks["10x_faster"] = result["ratio_common"] >= TARGET_RATIO
    result["checks"] = checks
    print("\ntargets: " + ", ".join(f"{k} {'OK' if v else 'MISSED'}" for k, v in checks.items()))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
