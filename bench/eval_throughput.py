"""Evaluation throughput: answers generated on vLLM's offline engine vs transformers ``generate``, one run.

Both sides generate greedy answers (fp32 on CPU, at most ``--max-new-tokens``) to the
same ``--examples`` chat prompts from the chatterbot-corpus questions, rendered with
the model's chat template exactly as ``tuneloop eval`` renders them:

* baseline: :func:`tuneloop.trainer.evaluate.generate_transformers` (what the gate used
  before: transformers ``generate`` in left-padded batches of ``--hf-batch``);
* tuneloop: :class:`tuneloop.server.offline_engine.OfflineGenerator` (vLLM's offline
  engine; an adapter would go in as a LoRA request).

It prints examples/s of each side, the ratio (target >= 5x) with and without the
engine's start-up, and the share of identical answers.

    python bench/eval_throughput.py [--model DIR] [--examples 200] [--max-new-tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def corpus_questions(n: int) -> list[str]:
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or spec.origin is None:
        raise SystemExit("error: the chatterbot-corpus package is not installed (make setup installs it)")
    qs: list[str] = []
    for f in sorted((Path(spec.origin).parent / "data" / "english").glob("*.yml")):
        for conv in yaml.safe_load(f.read_text()).get("conversations", []):
            if conv and isinstance(conv[0], str):
                qs.append(conv[0])
    if not qs:
        raise SystemExit("error: no questions found in chatterbot-corpus")
    return [qs[i % len(qs)] for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model folder (default: the pulled smollm2-135m-instruct)")
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=8, help="transformers batch size (the gate's)")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)

    from tuneloop.settings import load_settings

    settings = load_settings()
    model = Path(args.model or Path(settings.paths.models_path) / "smollm2-135m-instruct")
    if not (model / "config.json").is_file():
        print(
            f"error: {model} is not a model folder (run `tuneloop models pull smollm2-135m-instruct`)", file=sys.stderr
        )
        return 2
    from tuneloop.runtime import configure_vllm_env

    configure_vllm_env(settings.engine)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.chat import render_prompt
    from tuneloop.server.offline_engine import OfflineGenerator
    from tuneloop.trainer.evaluate import generate_transformers

    tok = AutoTokenizer.from_pretrained(str(model))
    prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q in corpus_questions(args.examples)]
    print(f"{len(prompts)} prompts, {sum(map(len, prompts)) / len(prompts):.0f} tokens on average; model {model}")

    t0 = time.perf_counter()
    with OfflineGenerator(settings.engine) as g:
        t_gen = time.perf_counter()
        ours = g.generate(model, None, prompts, args.max_new_tokens)
        vllm_s = time.perf_counter() - t_gen - g.start_s
        vllm_total = time.perf_counter() - t0
        start_s = g.start_s
    print(f"vllm: {vllm_total:.1f} s with start-up ({start_s:.1f} s), {vllm_s:.1f} s generating")

    torch.set_num_threads(os.cpu_count() or 1)
    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    t0 = time.perf_counter()
    base = generate_transformers(hf, tok, prompts, args.max_new_tokens, batch=args.hf_batch)
    hf_s = time.perf_counter() - t0
    print(f"transformers generate (batch {args.hf_batch}): {hf_s:.1f} s")

    same = sum(a == b for a, b in zip(ours, base)) / len(prompts)
    res = {
        "examples": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "vllm_examples_per_s": len(prompts) / vllm_s,
        "vllm_examples_per_s_with_startup": len(prompts) / vllm_total,
        "transformers_examples_per_s": len(prompts) / hf_s,
        "speedup": hf_s / vllm_s,
        "speedup_with_startup": hf_s / vllm_total,
        "identical_answers": same,
    }
    print(
        f"examples/s: vllm {res['vllm_examples_per_s']:.2f} ({res['vllm_examples_per_s_with_startup']:.2f} with start-up) "
        f"vs transformers {res['transformers_examples_per_s']:.2f}: {res['speedup']:.1f}x "
        f"({res['speedup_with_startup']:.1f}x with start-up; target >= 5x); identical answers {same:.0%}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
