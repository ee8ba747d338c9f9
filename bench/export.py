"""Model export: size, decode speed and quality per format, against the fp32 parent in vLLM, same run.

Usage::

    python bench/export.py          # SmolLM2-135M-Instruct: gguf-f16 gguf-q8_0 gguf-q4_k_m int8-w8a8 int4-w4a16
    python bench/export.py --formats gguf-q8_0 int8-w8a8 --limit 16

A throw-away home: the chatterbot corpus prepared on SmolLM2, SmolLM2 registered as version ``smollm2`` with that
dataset, then ``tuneloop export model`` (:func:`tuneloop.trainer.export_gguf.export_gguf`) per format: llama.cpp's
converter and quantizer, the smoke test and the quality check in llama.cpp against the parent on the test split
(token F1 of greedy answers, perplexity of the references). The baseline of speed is the parent, fp32, on vLLM's
offline engine (tuneloop's evaluation engine) over the same prompt token ids and token budget, timed after a warm-up
batch. Printed per format: size and its ratio to fp32 (target for q8_0: <= 30%), llama.cpp tokens/s and the ratio to
vLLM fp32's tokens/s, token-F1 drop and perplexity ratio against the budget (q8_0 target: within the default budget).

llama.cpp decodes one sequence at a time here (batch 1, as on a device); vLLM runs the prompts as one batch, as a
server does. Both numbers are reported; the ratio says what one user on the edge gets against the batched server.
int8 / int4 (``tuneloop export model --format int8-w8a8|int4-w4a16``, llm-compressor, calibrated on 64 train rows)
are measured in vLLM itself, batched, against the same fp32 baseline: a like-for-like serving speed-up.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", nargs="+", default=["gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "int8-w8a8", "int4-w4a16"])
    ap.add_argument("--limit", type=int, default=32, help="test-split examples (default 32)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()

    import os

    home = Path(tempfile.mkdtemp(prefix="tuneloop-bench-export-"))
    os.environ["TUNELOOP_HOME"] = str(home)
    from tuneloop.chat import render_prompt, split_answer
    from tuneloop.db import open_database
    from tuneloop.ids import hash_path
    from tuneloop.registry import ModelVersion, register_version
    from tuneloop.settings import load_settings
    from tuneloop.trainer.bootstrap import DEFAULT_BASE, pull
    from tuneloop.trainer.evaluate import load_eval_rows
    from tuneloop.trainer.export_gguf import export_gguf
    from tuneloop.trainer.export_quant import FORMATS as QUANT
    from tuneloop.trainer.export_quant import export_quantized

    settings = load_settings()
    base = pull(DEFAULT_BASE, settings.paths.models_path)
    exe = str(Path(sys.executable).parent / "tuneloop")
    src = home / "chat.jsonl"
    subprocess.run([exe, "data", "corpus", "chatterbot-corpus", "-o", str(src), "--limit", "200"], check=True)
    subprocess.run(
        [exe, "data", "prepare", str(src), "--name", "chat", "--base", str(base), "--no-progress"], check=True
    )
    db = open_database(settings.paths.db_path)
    from tuneloop.registry import get_dataset

    ds = get_dataset(db, "chat")
    register_version(
        db,
        ModelVersion(
            name="smollm2", kind="base", base_model=str(base), path=str(base), content_hash=hash_path(base),
            dataset_id=ds.id,
        ),
    )  # fmt: skip

    # the baseline: the fp32 parent on vLLM's offline engine, same prompts and budget
    from transformers import AutoTokenizer

    from tuneloop.server.offline_engine import OfflineGenerator

    tok = AutoTokenizer.from_pretrained(str(base))
    rows, _, _ = load_eval_rows(db, ds.id, args.limit)
    prompts = [render_prompt(tok, split_answer(r["messages"])[0]) for r in rows]
    with OfflineGenerator(settings.engine) as gen:
        gen.generate(base, None, prompts[:2], 4)  # warm-up
        t0 = time.perf_counter()
        answers = gen.generate(base, None, prompts, args.max_new_tokens)
        secs = time.perf_counter() - t0
    vllm_tps = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers) / secs
    fp32 = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    print(f"parent: SmolLM2-135M-Instruct fp32, {fp32 / 1e6:.1f} MB; vLLM offline (batched) {vllm_tps:.1f} tokens/s")
    print(
        "| format | size MB | of fp32 | runtime | tokens/s | vs vLLM fp32 | token F1 drop | perplexity x | within budget |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for fmt in args.formats:
        kw = dict(limit=args.limit, max_new_tokens=args.max_new_tokens, say=lambda m: None)
        if fmt in QUANT:
            with OfflineGenerator(settings.engine) as g:
                res = export_quantized(db, settings, "smollm2", fmt, g, **kw)  # type: ignore[arg-type]
            runtime = "vLLM (bf16 activations, batched)"
        else:
            res = export_gguf(db, settings, "smollm2", fmt, **kw)  # type: ignore[arg-type]
            runtime = "llama.cpp (batch 1)"
        m, q = res.manifest, res.manifest["quality"]
        print(
            f"| {fmt} | {m['size_bytes'] / 1e6:.1f} | {m['size_bytes'] / fp32:.1%} | {runtime} | {q['tokens_per_s']:.1f} | "
            f"x{q['tokens_per_s'] / vllm_tps:.2f} | {q['metric_drop']:+.4f} | {q['ppl_ratio']:.4f} | {res.passed} |",
            flush=True,
        )
    print(f"(home: {home})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
