"""``tuneloop export model VERSION --format gguf-...``: a version as a GGUF file, smoke-tested and measured in llama.cpp.

Contract
--------
* :data:`FORMATS`: ``gguf-f16`` and ``gguf-q8_0`` are written by llama.cpp's own converter
  (``convert_hf_to_gguf.py --outtype``); the k-quants (``gguf-q4_k_m``, ``gguf-q5_k_m``, ``gguf-q6_k``) are the
  converter's f16 file requantized by llama.cpp's ``llama-quantize``. The tool is :mod:`tuneloop.trainer.llamacpp`
  (pinned, built once). The converter copies the tokenizer, its chat template and EOS into the GGUF metadata; the
  smoke test reads them back.
* ``gguf-lora``: a LoRA adapter version as a GGUF LoRA (llama.cpp's ``convert_lora_to_gguf.py --base``, f16), for
  ``llama-cli --lora``, Ollama's ``ADAPTER`` or llama-cpp-python's ``lora_path``. It runs on the base as GGUF f16,
  converted once per base into ``<home>/exports/bases/`` and named in the manifest (``base_gguf``). DoRA and the
  other PEFT types are refused (the converter reads plain LoRA only): export them merged.
* Source of the other formats: a merged or base version's folder as is; an adapter version (LoRA and the other weight
  adapters) is first merged into its base in the export folder (:func:`tuneloop.trainer.export_common.source_folder`,
  with its logit parity check); the merged copy is removed once measured. Classifiers and prompt-learning adapters
  are refused up front (:class:`~tuneloop.errors.UserError`).
* Output: ``<home>/exports/<version>-<format>/<version>-<format>.gguf`` and ``manifest.json`` beside it.
* Smoke test and quality check, every export: llama.cpp loads the file in its own process
  (:mod:`tuneloop.trainer.gguf_runtime`), answers a chat through the template stored in the file, and on the same
  prompt token ids as the parent (the version's test split, at most ``limit`` rows) generates greedy answers and
  scores the reference answers (for ``gguf-lora``: the base GGUF with the LoRA applied). The parent runs in
  transformers (fp32; an adapter merged). Measured: the task metric (token F1 against
  the references) of both, its drop, the perplexity of the references under both and its ratio, how often the two
  answers agree, and decode tokens/s of llama.cpp; with golden prompts, both sides' pass rates
  (:func:`~tuneloop.trainer.export_common.golden_quality`). The budget (:class:`~tuneloop.trainer.export_common.ExportBudget`) is a metric drop of at most
  ``max_metric_drop`` and a perplexity rise of at most ``max_ppl_increase``.
* The manifest: format, file name, size, sha256, the parent's name and size, the size ratio, llama.cpp's version,
  the converter and quantize commands, the chat template's sha256 (and whether it equals the tokenizer's), the EOS
  id, the quality numbers, the budget and ``passed``.
* A passing export is registered as a version of kind ``gguf`` (parent: the version; never servable by vLLM,
  :func:`tuneloop.registry.unservable_reason`), named ``<version>-<format>``. A failing one is kept with its manifest
  (``passed: false``) but not registered; :func:`export_gguf` returns it flagged and the CLI exits 1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.errors import UserError
from tuneloop.trainer.export_common import (
    ExportBudget,
    ExportResult,
    base_folder,
    digest,
    eval_rows,
    golden_quality,
    open_export,
    quality,
    register_export,
    sha256,
    source_folder,
    tokenizer_template,
    write_manifest,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from tuneloop.db import Database
    from tuneloop.registry import ModelVersion
    from tuneloop.settings import Settings
    from tuneloop.trainer.llamacpp import LlamaCpp

#: format -> (converter outtype, llama-quantize type or None)
FORMATS: dict[str, tuple[str, str | None]] = {
    "gguf-f16": ("f16", None),
    "gguf-q8_0": ("q8_0", None),
    "gguf-q6_k": ("f16", "Q6_K"),
    "gguf-q5_k_m": ("f16", "Q5_K_M"),
    "gguf-q4_k_m": ("f16", "Q4_K_M"),
    "gguf-lora": ("f16", None),
}
__all__ = ["FORMATS", "ExportBudget", "ExportResult", "export_gguf"]


def export_gguf(
    db: Database,
    settings: Settings,
    version: str,
    fmt: str,
    budget: ExportBudget | None = None,
    limit: int = 32,
    max_new_tokens: int = 32,
    say: Callable[[str], None] = print,
    golden: list[dict[str, Any]] | None = None,
) -> ExportResult:
    """Convert, smoke-test, measure, write the manifest, register when within budget (see module doc)."""
    from tuneloop.trainer.llamacpp import VERSION, ensure

    budget = budget or ExportBudget()
    v, name, out = open_export(db, settings, version, fmt, FORMATS)
    lora = fmt == "gguf-lora"
    if lora:
        _check_lora(v)
    gguf = out / f"{name}.gguf"
    if gguf.exists():
        raise UserError(f"{gguf} already exists; remove it to export again")
    tool = ensure(settings.paths.models_path, say)
    out.mkdir(parents=True, exist_ok=True)
    src = source_folder(db, settings, v, out, say)  # an adapter merged: the parent the GGUF is measured against
    base_gguf: Path | None = None
    if lora:
        base = base_folder(settings, v)
        base_gguf = _base_gguf(settings, tool, base, say)
        commands = _convert_lora(tool, base, Path(v.path), gguf, say)
        parent_size = sum(f.stat().st_size for f in Path(v.path).glob("*.safetensors"))
    else:
        outtype, qtype = FORMATS[fmt]
        commands = _convert(tool, src, gguf, outtype, qtype, say)
        parent_size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    say(f"smoke test: llama.cpp loads {gguf.name} and answers; quality on the test split against {version} ...")
    q, meta = _measure(
        db, tool, src, base_gguf or gguf, gguf if lora else None, v.dataset_id, limit, max_new_tokens, golden or []
    )
    template = tokenizer_template(src)
    if src.parent == out:  # the merged copy: measured, no longer needed (the GGUF is the export)
        shutil.rmtree(src, ignore_errors=True)
    passed = budget.passes(q)
    manifest: dict[str, Any] = {
        "name": name,
        "format": fmt,
        "file": gguf.name,
        "size_bytes": gguf.stat().st_size,
        "sha256": sha256(gguf),
        "parent": version,
        "parent_size_bytes": parent_size,
        "size_ratio": gguf.stat().st_size / parent_size if parent_size else None,
        "llama_cpp_python": VERSION,
        "commands": commands,
        "chat_template_sha256": digest(meta.get("chat_template")),
        "chat_template_matches_tokenizer": bool(template) and meta.get("chat_template") == template,
        "eos_token_id": meta.get("eos_token_id"),
        "quality": q,
        "budget": asdict(budget),
        "passed": passed,
    }
    if base_gguf is not None:
        manifest["base_gguf"] = {"path": str(base_gguf), "sha256": sha256(base_gguf)}
    write_manifest(out, manifest)
    res = ExportResult(version, fmt, gguf, manifest, passed)
    if passed:
        keys = ("format", "llama_cpp_python", "commands", "budget", "base_gguf")
        res.registered = register_export(
            db, v, name, "gguf", gguf, manifest, {k: manifest[k] for k in keys if k in manifest}
        )
    return res


def _check_lora(v: ModelVersion) -> None:
    from tuneloop.trainer.merge import _adapter_config

    if v.kind != "adapter":
        raise UserError(f"gguf-lora exports a LoRA adapter version; {v.name!r} is a {v.kind} model (use gguf-f16 ...)")
    cfg = _adapter_config(Path(v.path), v.name)
    if str(cfg.get("peft_type", "")).upper() != "LORA" or cfg.get("use_dora"):
        kind = "DoRA" if cfg.get("use_dora") else str(cfg.get("peft_type"))
        raise UserError(
            f"{v.name!r} is a {kind} adapter; llama.cpp's LoRA converter reads plain LoRA only: "
            f"export it merged instead (--format gguf-q8_0 ...)"
        )


def _base_gguf(settings: Settings, tool: LlamaCpp, base: Path, say: Callable[[str], None]) -> Path:
    """The base as GGUF f16, converted once per base content (``<home>/exports/bases/``)."""
    from tuneloop.ids import hash_path

    dest = settings.paths.sub("exports") / "bases" / f"{base.name}-{hash_path(base)[:12]}-f16.gguf"
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".part")
        say(f"converting the base {base.name} to GGUF f16 once, for its LoRA adapters ...")
        _run(
            [sys.executable, str(tool.converter), str(base), "--outfile", str(tmp), "--outtype", "f16"],
            tool.converter_env(),
        )
        tmp.rename(dest)
    return dest


def _convert_lora(tool: LlamaCpp, base: Path, adapter: Path, gguf: Path, say: Callable[[str], None]) -> list[str]:
    cmd = [sys.executable, str(tool.lora_converter), str(adapter), "--base", str(base), "--outfile", str(gguf)]
    cmd += ["--outtype", "f16"]
    say("converting the adapter with llama.cpp's convert_lora_to_gguf.py ...")
    _run(cmd, tool.converter_env())
    return [" ".join(cmd[1:])]


def _convert(
    tool: LlamaCpp, src: Path, gguf: Path, outtype: str, qtype: str | None, say: Callable[[str], None]
) -> list[str]:
    """Run llama.cpp's converter (and quantizer); the commands, as run."""
    first = gguf if qtype is None else gguf.with_suffix(".f16.gguf")
    conv = [sys.executable, str(tool.converter), str(src), "--outfile", str(first), "--outtype", outtype]
    say(f"converting with llama.cpp's convert_hf_to_gguf.py --outtype {outtype} ...")
    _run(conv, tool.converter_env())
    cmds = [" ".join(conv[1:])]
    if qtype is not None:
        quant = [str(tool.quantize), str(first), str(gguf), qtype]
        say(f"quantizing to {qtype} with llama-quantize ...")
        _run(quant, tool.tool_env())
        first.unlink()
        cmds.append(" ".join(quant))
    return cmds


def _run(cmd: list[str], env: dict[str, str] | None) -> None:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise UserError(
            f"`{Path(cmd[1] if cmd[0] == sys.executable else cmd[0]).name}` failed:\n{(r.stderr or r.stdout)[-3000:]}"
        )


def _measure(
    db: Database,
    tool: LlamaCpp,
    src: Path,
    gguf: Path,
    lora: Path | None,
    dataset: str | None,
    limit: int,
    max_new_tokens: int,
    golden: list[dict[str, Any]],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Quality of the GGUF (``lora`` applied when given) against its parent on the test split and the golden
    prompts; its metadata."""
    from tuneloop.chat import render_prompt
    from tuneloop.trainer.evaluate import ModelRef, _load, _nll_many, generate_transformers

    model, tok = _load(ModelRef("parent", src))
    split, prompts, refs, scored = eval_rows(db, dataset, limit, tok)
    gold = [render_prompt(tok, g["messages"]) for g in golden]
    t0 = time.perf_counter()
    parent_answers = generate_transformers(model, tok, prompts, max_new_tokens)
    parent_s = time.perf_counter() - t0
    parent_gold = generate_transformers(model, tok, gold, max_new_tokens) if gold else []
    parent_nll = _nll_many(model, scored)
    del model
    job = {
        "model": str(gguf),
        "lora": str(lora) if lora else None,
        "n_ctx": max(len(s) for s in [*(s for s, _ in scored), *gold]) + max_new_tokens + 16,
        "prompts": prompts + gold,  # the test split's, then the golden prompts (speed counts both)
        "max_new_tokens": max_new_tokens,
        "scored": [[s, m] for s, m in scored],
        "chat": [{"role": "user", "content": "Hello! Who are you?"}],
    }
    proc = subprocess.run(
        [sys.executable, "-m", "tuneloop.trainer.gguf_runtime"],
        input=json.dumps(job),
        env=tool.python_env(),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise UserError(f"llama.cpp could not load or run {gguf.name} (smoke test failed):\n{proc.stderr[-3000:]}")
    got = json.loads(proc.stdout)
    answers, gold_answers = got["answers"][: len(prompts)], got["answers"][len(prompts) :]
    parent_tokens = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in parent_answers)
    q = quality(
        split=split,
        refs=refs,
        answers=answers,
        parent_answers=parent_answers,
        nll=[(float(x), int(k)) for x, k in got["nll"]],
        parent_nll=parent_nll,
        tokens_per_s=got["completion_tokens"] / got["seconds"] if got["seconds"] else 0.0,
        parent_tokens_per_s=parent_tokens / parent_s if parent_s else 0.0,
        runtime="llama.cpp",
    )
    q["parent_runtime"] = "transformers"
    q["chat_answer"] = got["chat"]
    q["golden"] = golden_quality(golden, gold_answers, parent_gold) if golden else None
    return q, got["metadata"]
