"""``tuneloop export model VERSION --format int8-w8a8|int4-w4a16``: int8 / int4 weights vLLM serves, smoke-tested
and measured in vLLM against the unquantized parent.

Contract
--------
* :data:`FORMATS`: ``int8-w8a8`` (int8 weights per channel, int8 activations per token, dynamic; SmoothQuant then
  GPTQ) and ``int4-w4a16`` (int4 weights in groups, 16-bit activations; GPTQ), made by llm-compressor in its own
  process and package overlay (:mod:`tuneloop.trainer.quant_runtime`, :mod:`tuneloop.trainer.quant_tool`), saved in
  the ``compressed-tensors`` format. These are the schemes vLLM's CPU build runs: its ``int8_scaled_mm`` (oneDNN)
  and ``cpu_gemm_wna16`` kernels, with bfloat16 activations (:func:`tuneloop.runtime.pick_dtype` picks bfloat16 for
  a quantized folder on CPU; fp32 activations are refused by both kernels). int4 groups are the largest of 128, 64
  and 32 that divide every linear layer's input width (SmolLM2's 576 is not a multiple of 128).
* Source: as for GGUF (:func:`tuneloop.trainer.export_common.source_folder`: an adapter is merged first).
  Calibration: up to ``calibration_samples`` rows of the version's dataset's train split, each rendered whole
  (prompt and answer) through the chat template.
* Output: ``<home>/exports/<version>-<format>/model/`` (the HF folder: weights, ``config.json`` with its
  ``quantization_config``, the parent's tokenizer and chat template copied byte for byte) and ``manifest.json``
  beside it.
* Smoke test and quality check, every export, on ``generator`` (:class:`Scorer`: vLLM's offline engine, the engine
  that serves it, handed in by the caller since ``trainer`` does not import ``server``): the parent
  (fp32 on CPU) and the quantized folder each answer the version's test split (at most ``limit`` rows, greedy, the
  same prompt token ids, timed after a warm-up) and score its reference answers (prompt logprobs). Measured: token
  F1 of both and its drop, the perplexity ratio, how often answers agree, tokens/s of both, and one chat answer
  through the exported tokenizer's template; with golden prompts, both sides' pass rates. The budget is
  :class:`~tuneloop.trainer.export_common.ExportBudget`.
* A passing export is registered as a version of kind ``quantized`` named ``<version>-<format>`` (parent: the
  version), which vLLM serves like any merged version (``tuneloop serve --model NAME``; the gate and canary treat
  it as any other candidate). A failing one is kept, flagged (``passed: false``), never registered; the CLI exits 1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tuneloop.errors import UserError
from tuneloop.trainer.export_common import (
    ExportBudget,
    ExportResult,
    digest,
    eval_rows,
    golden_quality,
    open_export,
    quality,
    register_export,
    source_folder,
    tokenizer_template,
    write_manifest,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from tuneloop.db import Database
    from tuneloop.settings import Settings


class Scorer(Protocol):
    """Greedy generation and reference scoring on the serving engine (vLLM's offline engine in the product:
    :class:`tuneloop.server.offline_engine.OfflineGenerator`, handed in by the CLI as the gate's generator is)."""

    def generate(
        self, base: Path, adapter: Path | None, prompts: list[list[int]], max_new_tokens: int
    ) -> list[str]: ...

    def score(self, base: Path, scored: list[tuple[list[int], list[int]]]) -> list[tuple[float, int]]: ...


#: format -> llm-compressor scheme (tuneloop.trainer.quant_runtime)
FORMATS = {"int8-w8a8": "w8a8", "int4-w4a16": "w4a16"}
GROUP_SIZES = (128, 64, 32)


def export_quantized(
    db: Database,
    settings: Settings,
    version: str,
    fmt: str,
    generator: Scorer,
    budget: ExportBudget | None = None,
    limit: int = 32,
    max_new_tokens: int = 32,
    calibration_samples: int = 64,
    say: Callable[[str], None] = print,
    golden: list[dict[str, Any]] | None = None,
) -> ExportResult:
    """Quantize, smoke-test and measure in vLLM, write the manifest, register when within budget (module doc)."""
    from tuneloop.ids import hash_path
    from tuneloop.trainer.quant_tool import VERSION, ensure

    budget = budget or ExportBudget()
    if calibration_samples < 1:
        raise UserError(f"--calibration-samples must be >= 1, got {calibration_samples}")
    v, name, out = open_export(db, settings, version, fmt, FORMATS)
    folder = out / "model"
    if folder.exists():
        raise UserError(f"{folder} already exists; remove it to export again")
    if not v.dataset_id:
        raise UserError("the version has no dataset recorded: its train split calibrates, its test split measures")
    tool = ensure(settings.paths.models_path, say)
    out.mkdir(parents=True, exist_ok=True)
    src = source_folder(db, settings, v, out, say)
    scheme = FORMATS[fmt]
    group = _group_size(src) if scheme == "w4a16" else None
    texts = _calibration_texts(db, v.dataset_id, src, calibration_samples)
    job = {"src": str(src), "out": str(folder), "scheme": scheme, "texts": texts, "max_seq_length": 512}
    if group is not None:
        job["group_size"] = group
    say(f"quantizing {version} to {fmt} with llm-compressor {VERSION} on {len(texts)} calibration rows ...")
    proc = subprocess.run(
        [sys.executable, "-m", "tuneloop.trainer.quant_runtime"],
        input=json.dumps(job),
        env=tool.python_env(),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        raise UserError(f"llm-compressor failed to quantize {version} to {fmt}:\n{proc.stderr[-3000:]}")
    made = json.loads(proc.stdout.strip().splitlines()[-1])
    say(f"smoke test: vLLM loads {folder} and answers; quality on the test split against {version} ...")
    q = _measure(db, generator, src, folder, v.dataset_id, limit, max_new_tokens, golden or [])
    parent_size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    parent_template = tokenizer_template(src)
    if src.parent == out:  # the merged copy: measured, no longer needed
        shutil.rmtree(src, ignore_errors=True)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    template = tokenizer_template(folder)
    from tuneloop.runtime import pick_dtype

    passed = budget.passes(q)
    manifest: dict[str, Any] = {
        "name": name,
        "format": fmt,
        "folder": str(folder),
        "size_bytes": size,
        "sha256": hash_path(folder),
        "parent": version,
        "parent_size_bytes": parent_size,
        "size_ratio": size / parent_size if parent_size else None,
        "llmcompressor": VERSION,
        "scheme": scheme,
        "group_size": group,
        "recipe": made.get("recipe", ""),
        "quantize_seconds": made.get("seconds"),
        "calibration": {"dataset": v.dataset_id, "split": "train", "rows": len(texts), "max_seq_length": 512},
        "quantization_config": cfg.get("quantization_config"),
        "serving_dtype": pick_dtype(settings.engine.dtype, folder),
        "chat_template_sha256": digest(template),
        "chat_template_matches_parent": template is not None and template == parent_template,
        "eos_token_id": cfg.get("eos_token_id"),
        "quality": q,
        "budget": asdict(budget),
        "passed": passed,
    }
    write_manifest(out, manifest)
    res = ExportResult(version, fmt, folder, manifest, passed)
    if passed:
        keys = ("format", "llmcompressor", "scheme", "group_size", "calibration", "budget", "serving_dtype")
        res.registered = register_export(db, v, name, "quantized", folder, manifest, {k: manifest[k] for k in keys})
    return res


def _group_size(src: Path) -> int:
    """The largest int4 group that divides every linear layer's input width (module doc)."""
    cfg = json.loads((src / "config.json").read_text())
    heads = int(cfg.get("num_attention_heads", 1))
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    widths = {int(cfg["hidden_size"]), int(cfg.get("intermediate_size", cfg["hidden_size"])), heads * head_dim}
    for g in GROUP_SIZES:
        if all(w % g == 0 for w in widths):
            return g
    raise UserError(
        f"int4 needs linear layers whose input widths ({sorted(widths)}) are multiples of 32; use int8-w8a8 or GGUF"
    )


def _calibration_texts(db: Database, dataset: str, src: Path, n: int) -> list[str]:
    """Up to ``n`` train rows of ``dataset``, each rendered whole through ``src``'s chat template."""
    from transformers import AutoTokenizer

    from tuneloop.dataset_store import chat_message, good_chat, load_splits

    dd = load_splits(db, dataset)
    if "train" not in dd or not len(dd["train"]):
        raise UserError(f"dataset {dataset!r} has no train rows to calibrate on")
    tok = AutoTokenizer.from_pretrained(str(src))
    texts = []
    for r in dd["train"]:
        chat = good_chat(r)
        if chat is None:
            continue
        prompt, answer = chat
        msgs = [chat_message(m) for m in [*prompt, {"role": "assistant", "content": answer}]]
        texts.append(str(tok.apply_chat_template(msgs, tokenize=False)))
        if len(texts) == n:
            break
    if not texts:
        raise UserError(f"dataset {dataset!r} has no chat rows in its train split to calibrate on")
    return texts


def _measure(
    db: Database,
    gen: Scorer,
    src: Path,
    folder: Path,
    dataset: str | None,
    limit: int,
    max_new_tokens: int,
    golden: list[dict[str, Any]],
) -> dict[str, Any]:
    """Both models on the serving engine, on the same prompts (module doc)."""
    from transformers import AutoTokenizer

    from tuneloop.chat import render_prompt

    tok = AutoTokenizer.from_pretrained(str(folder))
    split, prompts, refs, scored = eval_rows(db, dataset, limit, tok)
    chat_ids = render_prompt(tok, [{"role": "user", "content": "Hello! Who are you?"}])
    gold = [render_prompt(tok, g["messages"]) for g in golden]
    gold_answers: dict[str, list[str]] = {}
    side: dict[str, tuple[list[str], list[tuple[float, int]], float]] = {}
    chat_answer = ""
    for key, model in (("parent", src), ("export", folder)):
        gen.generate(model, None, prompts[:2], 4)  # warm-up: engine start and first batch are not decode speed
        t0 = time.perf_counter()
        answers = gen.generate(model, None, prompts, max_new_tokens)
        secs = time.perf_counter() - t0
        tokens = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)
        side[key] = (answers, gen.score(model, scored), tokens / secs if secs else 0.0)
        gold_answers[key] = gen.generate(model, None, gold, max_new_tokens) if gold else []
        if key == "export":
            chat_answer = gen.generate(model, None, [chat_ids], 16)[0]
    q = quality(
        split=split,
        refs=refs,
        answers=side["export"][0],
        parent_answers=side["parent"][0],
        nll=side["export"][1],
        parent_nll=side["parent"][1],
        tokens_per_s=side["export"][2],
        parent_tokens_per_s=side["parent"][2],
        runtime="vLLM",
    )
    q["parent_runtime"] = "vLLM"
    q["chat_answer"] = chat_answer
    q["golden"] = golden_quality(golden, gold_answers["export"], gold_answers["parent"]) if golden else None
    return q
