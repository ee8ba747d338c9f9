"""lm-evaluation-harness scores ``tuneloop serve`` exactly as it scores vLLM's own OpenAI server.

The harness runs as its users run it, the ``lm_eval`` command (``python -m lm_eval run``, a subprocess: its
environment, caches and outputs stay in tmp, no network), model ``local-completions`` on ``/v1/completions``,
the tiny model's tokenizer, over two local tasks in tests/data/lm_eval/ (JSONL read with ``dataset_path:
json``): ``tl_gen`` (generate_until, exact_match: 10 sentences to complete, greedy) and ``tl_mc``
(multiple_choice, acc / acc_norm: 10 questions, 2 to 4 choices, 30 log-likelihood requests, each an echoed
prompt with logprobs and max_tokens 1). Once against the tuneloop server, once against vLLM's server (same
model, same engine settings: tests/fixtures_vllm.py), in two request modes: token-id prompts in batches of 4
(``tokenized_requests=True``) and text prompts one by one (``tokenized_requests=False``), 2 concurrent requests.

The tiny model is random, so the scores mean nothing; their equality across the two servers, together with
equal generations and equal per-choice log-likelihoods sample by sample, is what is asserted.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fixtures_vllm import base_model_id

pytestmark = [pytest.mark.engine, pytest.mark.slow]

TASKS_DIR = Path(__file__).parent / "data" / "lm_eval"
TASKS = ("tl_gen", "tl_mc")
METRICS = {"tl_gen": ("exact_match,none",), "tl_mc": ("acc,none", "acc_norm,none")}
N_DOCS = 10
MODES = {
    "tokens-batched": {"model_args": {"tokenized_requests": "True"}, "batch_size": "4"},
    "text": {"model_args": {"tokenized_requests": "False"}, "batch_size": "1"},
}


def run_lm_eval(
    url: str, model: str, tokenizer: Path, mode: dict[str, Any], work: Path, server_log: Any = None
) -> dict[str, Any]:
    """``lm_eval run`` against ``url``'s ``/v1/completions`` in ``work`` (a copy of the task folder); its
    results JSON with the logged samples under ``"samples"`` (``{task: [sample, ...]}`` by doc id)."""
    shutil.copytree(TASKS_DIR, work)
    out = work / "out"
    args = {
        "model": model,
        "base_url": f"{url}/v1/completions",
        "tokenizer": str(tokenizer),
        "tokenizer_backend": "huggingface",
        "num_concurrent": "2",
        "max_retries": "1",  # an error answer fails the run instead of being retried away
        "max_length": "512",  # the servers' max_model_len
        "timeout": "120",
        **mode["model_args"],
    }
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions"]
    cmd += ["--model_args", ",".join(f"{k}={v}" for k, v in args.items()), "--batch_size", mode["batch_size"]]
    cmd += ["--tasks", *TASKS, "--include_path", str(work), "--output_path", str(out), "--log_samples"]
    hf = work / "hf"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(hf),
        "HF_DATASETS_CACHE": str(hf / "datasets"),
        "LM_HARNESS_CACHE_PATH": str(work / "lm-eval-cache"),
        "OPENAI_API_KEY": "unused",
        "TOKENIZERS_PARALLELISM": "false",
    }
    # data_files in the task YAMLs are relative: lm-eval runs in the copied folder
    r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        output = (r.stdout + r.stderr).splitlines()
        failed = [ln for ln in output if "API request failed" in ln or "Exception:" in ln][:3]
        errors = [ln for ln in server_log().splitlines() if "Error" in ln][-3:] if server_log is not None else []
        raise AssertionError(
            f"lm_eval against {url} exited {r.returncode}\ncommand: {' '.join(cmd)}\n"
            f"its first failed requests:\n{chr(10).join(failed)}\noutput (tail):\n{chr(10).join(output[-15:])}\n"
            f"last errors in the server's log:\n{chr(10).join(errors)}"
        )
    [results_file] = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    results["samples"] = {}
    for task in TASKS:
        [samples_file] = out.rglob(f"samples_{task}_*.jsonl")
        rows = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]
        results["samples"][task] = sorted(rows, key=lambda s: s["doc_id"])
    return results


@pytest.mark.parametrize("mode", list(MODES))
def test_lm_eval_scores_tuneloop_as_vllm(mode, parity_server, vllm_server, tiny_model, tmp_path):
    # the two runs at once (each is mostly lm-eval's own start-up, one core each)
    with ThreadPoolExecutor(2) as pool:
        futures = {
            "vllm": pool.submit(
                run_lm_eval, vllm_server.url, vllm_server.model, tiny_model, MODES[mode], tmp_path / "vllm"
            ),
            "tuneloop": pool.submit(
                run_lm_eval,
                parity_server.url,
                base_model_id(parity_server.url),
                tiny_model,
                MODES[mode],
                tmp_path / "tuneloop",
                parity_server.output,
            ),
        }
        runs = {side: f.result() for side, f in futures.items()}
    scores = {side: {t: {m: r["results"][t][m] for m in METRICS[t]} for t in TASKS} for side, r in runs.items()}
    print(f"lm-eval scores ({mode}): {json.dumps(scores)}")

    for side, r in runs.items():
        for task in TASKS:
            # every document ran, and each score is a number
            assert r["n-samples"][task]["effective"] == N_DOCS, (side, task, r["n-samples"])
            assert len(r["samples"][task]) == N_DOCS, (side, task)
            for metric in METRICS[task]:
                value = r["results"][task][metric]
                assert isinstance(value, float) and math.isfinite(value) and 0 <= value <= 1, (side, metric, value)
        # the log-likelihood path really ran: one request per choice, each a finite negative log-likelihood
        for s in r["samples"]["tl_mc"]:
            assert len(s["resps"]) == len(s["doc"]["choices"]) >= 2, (side, s["doc_id"])
            for [[ll, _greedy]] in s["resps"]:
                assert math.isfinite(float(ll)) and float(ll) < 0, (side, s["doc_id"], ll)
        assert sum(len(s["resps"]) for s in r["samples"]["tl_mc"]) == 30

    assert scores["tuneloop"] == scores["vllm"], f"lm-eval scores differ ({mode}): {json.dumps(scores)}"

    tl, vl = runs["tuneloop"]["samples"], runs["vllm"]["samples"]
    # generate_until: the same greedy text for every document (and not one text for all: a mix-up would show)
    gen = {side: [s["resps"][0][0] for s in runs[side]["samples"]["tl_gen"]] for side in runs}
    assert gen["tuneloop"] == gen["vllm"], f"generations differ ({mode}):\n{json.dumps(gen, ensure_ascii=False)}"
    assert len(set(gen["vllm"])) > 1, gen["vllm"]
    # multiple_choice: per choice the same log-likelihood (within the sum of a few 1e-4 token tolerances) and
    # the same is_greedy
    for t, v in zip(tl["tl_mc"], vl["tl_mc"]):
        for [[tll, tg]], [[vll, vg]] in zip(t["resps"], v["resps"]):
            assert math.isclose(float(tll), float(vll), rel_tol=0, abs_tol=1e-3) and tg == vg, (
                f"doc {t['doc_id']} ({t['doc']['question']!r}): tuneloop {t['resps']} vs vLLM {v['resps']}"
            )
