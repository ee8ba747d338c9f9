"""The llm-compressor side of an int8 / int4 export, run in its own process with the overlay of
:mod:`tuneloop.trainer.quant_tool` (never imported by tuneloop's process).

Contract
--------
``python -m tuneloop.trainer.quant_runtime`` reads one JSON job on stdin, writes one JSON result on stdout.

Job: ``{"src": HF folder, "out": folder, "scheme": "w8a8" | "w4a16", "texts": [calibration texts],
"max_seq_length": int, "group_size": int}``.

* ``w8a8``: int8 weights (per output channel) and int8 activations (dynamic, per token), llm-compressor's recipe
  for it: ``SmoothQuantModifier`` (moves activation outliers into the weights), then ``GPTQModifier`` with scheme
  ``W8A8`` on every ``Linear`` but ``lm_head``.
* ``w4a16``: int4 weights in groups of ``group_size`` input columns (symmetric), 16-bit activations, by
  ``GPTQModifier``; ``lm_head`` kept.
* Calibration: ``texts`` (the caller renders training rows through the chat template), tokenised without extra
  special tokens, cut at ``max_seq_length``.
* The model is saved compressed (``save_compressed=True``: the ``compressed-tensors`` format vLLM loads, with the
  ``quantization_config`` in ``config.json``); every other file of ``src`` (tokenizer, chat template, generation
  config) is copied as is, so the template is byte-identical to the parent's.

Result: ``{"seconds": float, "recipe": str}`` (the recipe llm-compressor wrote, as YAML text).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any


def run(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = Path(job["src"]), Path(job["out"])
    tok = AutoTokenizer.from_pretrained(str(src))
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    max_len = int(job.get("max_seq_length", 512))
    enc = [tok(t, add_special_tokens=False, truncation=True, max_length=max_len) for t in job["texts"]]
    ds = Dataset.from_dict(
        {"input_ids": [e["input_ids"] for e in enc], "attention_mask": [e["attention_mask"] for e in enc]}
    )
    recipe: list[Any]
    if job["scheme"] == "w8a8":
        recipe = [
            SmoothQuantModifier(smoothing_strength=0.8),
            GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]),
        ]
    elif job["scheme"] == "w4a16":
        weights = QuantizationArgs(
            num_bits=4, type="int", symmetric=True, strategy="group", group_size=int(job["group_size"])
        )
        recipe = [
            GPTQModifier(
                config_groups={"int4": QuantizationScheme(targets=["Linear"], weights=weights)}, ignore=["lm_head"]
            )
        ]
    else:
        raise ValueError(f"unknown scheme {job['scheme']!r}")
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=max_len, num_calibration_samples=len(enc))
    model.save_pretrained(str(out), save_compressed=True)
    seconds = time.perf_counter() - t0
    for f in src.iterdir():
        if f.is_file() and not (
            f.suffix == ".safetensors" or f.name in ("config.json", "model.safetensors.index.json")
        ):
            shutil.copy2(f, out / f.name)
    recipe_file = out / "recipe.yaml"
    return {"seconds": seconds, "recipe": recipe_file.read_text() if recipe_file.is_file() else ""}


def main() -> int:
    json.dump(run(json.load(sys.stdin)), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
