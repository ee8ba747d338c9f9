"""``tuneloop export model VERSION --format gguf-...``: a version as a GGUF file, smoke-tested and measured in llama.cpp.

Contract
--------
* :data:`FORMATS`: ``gguf-f16`` and ``gguf-q8_0`` are written by llama.cpp's own converter
  (``convert_hf_to_gguf.py --outtype``); the k-quants (``gguf-q4_k_m``, ``gguf-q5_k_m``, ``gguf-q6_k``) are the
  converter's f16 file requantized by llama.cpp's ``llama-quantize``. The tool is :mod:`tuneloop.trainer.llamacpp`
  (pinned, built once). The converter copies the tokenizer, its chat template and EOS into the GGUF metadata; the
  smoke test reads them back.
* Source: a merged or base version's folder as is; an adapter version (LoRA and the other weight adapters) is first
  merged into its base in the export folder (:func:`tuneloop.trainer.merge.merge_folder`, with its logit parity
  check). Classifiers and prompt-learning adapters are refused up front (:class:`~tuneloop.errors.UserError`).
* Output: ``<home>/exports/<version>-<format>/<version>-<format>.gguf`` and ``manifest.json`` beside it.
* Smoke test and quality check, every export: llama.cpp loads the file in its own process
  (:mod:`tuneloop.trainer.gguf_runtime`), answers a chat through the template stored in the file, and on the same
  prompt token ids as the parent (the version's test split, at most ``limit`` rows) generates greedy answers and
  scores the reference answers. The parent runs in transformers (fp32). Measured: the task metric (token F1 against
  the references) of both, its drop, the perplexity of the references under both and its ratio, how often the two
  answers agree, and decode tokens/s of llama.cpp. The budget (:class:`ExportBudget`) is a metric drop of at most
  ``max_metric_drop`` and a perplexity rise of at most ``max_ppl_increase``.
* The manifest: format, file name, size, sha256, the parent's name and size, the size ratio, llama.cpp's version,
  the converter and quantize commands, the chat template's sha256 (and whether it equals the tokenizer's), the EOS
  id, the quality numbers, the budget and ``passed``.
* A passing export is registered as a version of kind ``gguf`` (parent: the version; never servable by vLLM,
  :func:`tuneloop.registry.unservable_reason`), named ``<version>-<format>``. A failing one is kept with its manifest
  (``passed: false``) but not registered; :func:`export_gguf` returns it flagged and the CLI exits 1.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.errors import UserError

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
}


@dataclass
class ExportBudget:
    max_metric_drop: float = field(
        default=0.02,
        metadata={"help": "Largest drop of the task metric (token F1 on the test split, 0-1) against the parent."},
    )
    max_ppl_increase: float = field(
        default=0.05, metadata={"help": "Largest relative rise of the references' perplexity against the parent."}
    )


@dataclass
class ExportResult:
    version: str
    format: str
    path: Path
    manifest: dict[str, Any]
    passed: bool
    registered: ModelVersion | None = None

    def summary(self) -> str:
        q = self.manifest["quality"]
        verdict = "within budget" if self.passed else "OVER BUDGET (kept, flagged, not registered)"
        return (
            f"{self.path} ({self.manifest['size_bytes'] / 1e6:.1f} MB, {self.manifest['size_ratio']:.0%} of the parent): "
            f"token F1 {q['metric']:.4f} vs parent {q['parent_metric']:.4f} (drop {q['metric_drop']:+.4f}), "
            f"perplexity x{q['ppl_ratio']:.4f}, {q['tokens_per_s']:.1f} tokens/s in llama.cpp; {verdict}"
        )


def export_gguf(
    db: Database,
    settings: Settings,
    version: str,
    fmt: str,
    budget: ExportBudget | None = None,
    limit: int = 32,
    max_new_tokens: int = 32,
    say: Callable[[str], None] = print,
) -> ExportResult:
    """Convert, smoke-test, measure, write the manifest, register when within budget (see module doc)."""
    from tuneloop.registry import get_version
    from tuneloop.trainer.llamacpp import ensure

    budget = budget or ExportBudget()
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    v = get_version(db, version)
    if v.kind == "gguf":
        raise UserError(f"{version!r} is already a GGUF export; export its parent {v.parent_version!r}")
    if v.task == "classification":
        raise UserError(f"{version!r} is a classifier; GGUF export is for generative (chat) models")
    out = settings.paths.sub("exports") / f"{version}-{fmt}"
    gguf = out / f"{version}-{fmt}.gguf"
    name = f"{version}-{fmt}"
    if gguf.exists():
        raise UserError(f"{gguf} already exists; remove it to export again")
    tool = ensure(settings.paths.models_path, say)
    out.mkdir(parents=True, exist_ok=True)
    src = _source_folder(db, settings, v, out, say)
    outtype, qtype = FORMATS[fmt]
    commands = _convert(tool, src, gguf, outtype, qtype, say)
    say(f"smoke test: llama.cpp loads {gguf.name} and answers; quality on the test split against {version} ...")
    quality, meta = _measure(db, tool, src, gguf, v.dataset_id, limit, max_new_tokens)
    template = _tokenizer_template(src)
    passed = quality["metric_drop"] <= budget.max_metric_drop and quality["ppl_ratio"] - 1 <= budget.max_ppl_increase
    parent_size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    from tuneloop.trainer.llamacpp import VERSION

    manifest: dict[str, Any] = {
        "name": name,
        "format": fmt,
        "file": gguf.name,
        "size_bytes": gguf.stat().st_size,
        "sha256": _sha256(gguf),
        "parent": version,
        "parent_size_bytes": parent_size,
        "size_ratio": gguf.stat().st_size / parent_size if parent_size else None,
        "llama_cpp_python": VERSION,
        "commands": commands,
        "chat_template_sha256": _digest(meta.get("chat_template")),
        "chat_template_matches_tokenizer": bool(template) and meta.get("chat_template") == template,
        "eos_token_id": meta.get("eos_token_id"),
        "quality": quality,
        "budget": asdict(budget),
        "passed": passed,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    res = ExportResult(version, fmt, gguf, manifest, passed)
    if passed:
        res.registered = _register(db, v, name, gguf, manifest)
    return res


def _source_folder(db: Database, settings: Settings, v: ModelVersion, out: Path, say: Callable[[str], None]) -> Path:
    """The HF folder to convert: the version's own, or its adapter merged into the base (in ``out/merged``)."""
    from tuneloop.modelcache import resolve_model
    from tuneloop.registry import unservable_reason

    if v.kind != "adapter":
        return resolve_model(v.path, settings.paths.models_path, what=f"model folder of version {v.name!r}")
    from tuneloop.trainer.merge import MERGEABLE_PEFT_TYPES, _adapter_config, merge_folder, sample_prompts

    peft_type = str(_adapter_config(Path(v.path), v.name).get("peft_type", ""))
    if peft_type not in MERGEABLE_PEFT_TYPES:
        raise UserError(
            f"{v.name!r} is a {peft_type} adapter, which cannot be merged into weights, so it has no GGUF form: "
            f"{unservable_reason(v.kind, v.path) or 'retrain it with method=lora'}"
        )
    own_tok = (Path(v.path) / "tokenizer_config.json").is_file()
    base = resolve_model(v.base_model, settings.paths.models_path, what=f"base of {v.name!r}", tokenizer=not own_tok)
    dest = out / "merged"
    say(f"merging adapter {v.name} into {base.name} (logit parity checked) ...")
    merge_folder(
        base,
        Path(v.path),
        dest,
        sample_prompts(db, v.dataset_id),
        1e-3,
        {"merged_from": v.name, "adapter_hash": v.content_hash, "for": "gguf export"},
        what=repr(v.name),
    )
    return dest


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
    db: Database, tool: LlamaCpp, src: Path, gguf: Path, dataset: str | None, limit: int, max_new_tokens: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Quality of the GGUF against its parent on the test split (module doc); plus the GGUF's metadata."""
    from tuneloop.chat import completion_ids, render_prompt, split_answer
    from tuneloop.textmetrics import token_f1
    from tuneloop.trainer.evaluate import ModelRef, _load, _nll_many, generate_transformers, load_eval_rows

    if not dataset:
        raise UserError("the version has no dataset recorded: its test split is what the export is measured on")
    rows, _, split = load_eval_rows(db, dataset, limit)
    model, tok = _load(ModelRef("parent", src))
    prompts, refs, scored = [], [], []
    for r in rows:
        msgs, answer = split_answer(r["messages"])
        ids = render_prompt(tok, msgs, r.get("tools"))
        prompts.append(ids)
        refs.append(answer)
        target = completion_ids(tok, answer)
        scored.append((ids + target, [0] * len(ids) + [1] * len(target)))
    t0 = time.perf_counter()
    parent_answers = generate_transformers(model, tok, prompts, max_new_tokens)
    parent_s = time.perf_counter() - t0
    parent_nll = _nll_many(model, scored)
    del model
    chat = [{"role": "user", "content": "Hello! Who are you?"}]
    job = {
        "model": str(gguf),
        "n_ctx": max(len(s) for s, _ in scored) + max_new_tokens + 16,
        "prompts": prompts,
        "max_new_tokens": max_new_tokens,
        "scored": [[s, m] for s, m in scored],
        "chat": chat,
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
    f1 = [token_f1(a, ref) for a, ref in zip(got["answers"], refs)]
    pf1 = [token_f1(a, ref) for a, ref in zip(parent_answers, refs)]
    nll, n = sum(x for x, _ in got["nll"]), sum(k for _, k in got["nll"])
    pnll, pn = sum(x for x, _ in parent_nll), sum(k for _, k in parent_nll)
    import math

    ppl, pppl = math.exp(nll / max(n, 1)), math.exp(pnll / max(pn, 1))
    parent_tokens = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in parent_answers)
    quality = {
        "split": split,
        "examples": len(rows),
        "metric_name": "token_f1",
        "metric": sum(f1) / len(f1),
        "parent_metric": sum(pf1) / len(pf1),
        "metric_drop": sum(pf1) / len(pf1) - sum(f1) / len(f1),
        "perplexity": ppl,
        "parent_perplexity": pppl,
        "ppl_ratio": ppl / pppl,
        "answers_identical": sum(a == b for a, b in zip(got["answers"], parent_answers)) / len(rows),
        "tokens_per_s": got["completion_tokens"] / got["seconds"] if got["seconds"] else 0.0,
        "parent_tokens_per_s_transformers": parent_tokens / parent_s if parent_s else 0.0,
        "chat_answer": got["chat"],
    }
    return quality, got["metadata"]


def _tokenizer_template(folder: Path) -> str | None:
    """The chat template the folder's tokenizer renders with (``chat_template.jinja`` or tokenizer_config.json)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    try:
        t = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        return None
    return t if isinstance(t, str) else None


def _register(db: Database, v: ModelVersion, name: str, gguf: Path, manifest: dict[str, Any]) -> ModelVersion:
    from tuneloop.registry import ModelVersion, register_version

    return register_version(
        db,
        ModelVersion(
            name=name,
            kind="gguf",
            base_model=v.base_model,
            path=str(gguf),
            content_hash=manifest["sha256"],
            parent_version=v.name,
            dataset_id=v.dataset_id,
            run_id=v.run_id,
            config={"export": {k: manifest[k] for k in ("format", "llama_cpp_python", "commands", "budget")}},
            metrics=manifest["quality"],
        ),
    )


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _digest(text: str | None) -> str | None:
    return hashlib.sha256(text.encode()).hexdigest() if text else None
