"""What every ``tuneloop export model`` format shares: the budget, the result, the source folder, the quality
numbers, the manifest's hashes and the registration of a passing export.

Contract
--------
* :class:`ExportBudget`: the largest task-metric drop (token F1 on the test split), the largest relative
  perplexity rise and the largest drop of the golden prompts' pass rate an export may have against its unquantized
  parent; :meth:`ExportBudget.passes` judges a quality dict made by :func:`quality`.
* Golden prompts (:func:`tuneloop.trainer.evaluate.load_golden`: ``--golden FILE``, else ``deploy.gate_golden``)
  are answered by both sides with the same greedy budget and checked by their rules; :func:`golden_quality` gives
  both pass rates, the drop and each prompt's verdicts. Without golden prompts the golden part is skipped.
* :func:`source_folder`: the HF folder an export starts from: a merged or base version's own folder, or an adapter
  (LoRA and the other weight adapters) merged into its base in ``<out>/merged`` by
  :func:`tuneloop.trainer.merge.merge_folder` (logit parity checked). Prompt-learning adapters, which have no
  weights to merge, are a :class:`~tuneloop.errors.UserError`.
* :func:`quality`: the numbers of the manifest's ``quality`` from both sides' greedy answers, reference NLLs and
  decode speeds (see the keys there).
* :func:`register_export`: a passing export as a version of the given kind, parent the exported version, with the
  manifest's quality as its metrics. A failing export is never registered (the caller keeps its files, flagged).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.errors import UserError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from tuneloop.db import Database
    from tuneloop.registry import ModelVersion
    from tuneloop.settings import Settings


@dataclass
class ExportBudget:
    max_metric_drop: float = field(
        default=0.02,
        metadata={"help": "Largest drop of the task metric (token F1 on the test split, 0-1) against the parent."},
    )
    max_ppl_increase: float = field(
        default=0.05, metadata={"help": "Largest relative rise of the references' perplexity against the parent."}
    )
    max_golden_drop: float = field(
        default=0.0,
        metadata={"help": "Largest drop of the golden prompts' pass rate (0-1) against the parent (0: none may flip)."},
    )

    def passes(self, q: dict[str, Any]) -> bool:
        golden = q.get("golden")
        return bool(
            q["metric_drop"] <= self.max_metric_drop
            and q["ppl_ratio"] - 1 <= self.max_ppl_increase
            and (golden is None or golden["drop"] <= self.max_golden_drop)
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
            f"perplexity x{q['ppl_ratio']:.4f}, {q['tokens_per_s']:.1f} tokens/s in {q['runtime']}"
            + (
                f", golden prompts {q['golden']['pass_rate']:.0%} vs parent {q['golden']['parent_pass_rate']:.0%}"
                if q.get("golden")
                else ""
            )
            + f"; {verdict}"
        )


def open_export(
    db: Database, settings: Settings, version: str, fmt: str, formats: Iterable[str]
) -> tuple[ModelVersion, str, Path]:
    """(the version, the export's name ``<version>-<format>``, its folder ``<home>/exports/<name>``), after
    refusing, before any work, an unknown format, what cannot be exported and a name that is already a version."""
    from tuneloop.registry import RegistryError, get_version

    if fmt not in formats:
        raise UserError(f"unknown format {fmt!r}: choose one of {', '.join(formats)}")
    v = get_version(db, version)
    name = f"{version}-{fmt}"
    try:
        get_version(db, name)
    except RegistryError:
        pass
    else:
        raise UserError(f"version {name!r} is already registered; versions are immutable (delete its export first)")
    if v.kind in ("gguf", "quantized"):
        raise UserError(f"{v.name!r} is already an export ({v.kind}); export its parent {v.parent_version!r}")
    if v.task == "classification":
        raise UserError(f"{v.name!r} is a classifier; model export is for generative (chat) models")
    return v, name, settings.paths.sub("exports") / name


def source_folder(db: Database, settings: Settings, v: ModelVersion, out: Path, say: Callable[[str], None]) -> Path:
    """The HF folder to export: the version's own, or its adapter merged into the base (in ``out/merged``)."""
    from tuneloop.modelcache import resolve_model
    from tuneloop.registry import unservable_reason

    if v.kind != "adapter":
        return resolve_model(v.path, settings.paths.models_path, what=f"model folder of version {v.name!r}")
    from tuneloop.trainer.merge import MERGEABLE_PEFT_TYPES, _adapter_config, merge_folder, sample_prompts

    peft_type = str(_adapter_config(Path(v.path), v.name).get("peft_type", ""))
    if peft_type not in MERGEABLE_PEFT_TYPES:
        raise UserError(
            f"{v.name!r} is a {peft_type} adapter, which cannot be merged into weights, so it cannot be exported: "
            f"{unservable_reason(v.kind, v.path) or 'retrain it with method=lora'}"
        )
    dest = out / "merged"
    say(f"merging adapter {v.name} into {Path(v.base_model).name} (logit parity checked) ...")
    merge_folder(
        base_folder(settings, v),
        Path(v.path),
        dest,
        sample_prompts(db, v.dataset_id),
        1e-3,
        {"merged_from": v.name, "adapter_hash": v.content_hash, "for": "export"},
        what=repr(v.name),
    )
    return dest


def base_folder(settings: Settings, v: ModelVersion) -> Path:
    """The base model folder of an adapter version."""
    from tuneloop.modelcache import resolve_model

    own_tok = (Path(v.path) / "tokenizer_config.json").is_file()
    return resolve_model(v.base_model, settings.paths.models_path, what=f"base of {v.name!r}", tokenizer=not own_tok)


def quality(
    *,
    split: str,
    refs: list[str],
    answers: list[str],
    parent_answers: list[str],
    nll: list[tuple[float, int]],
    parent_nll: list[tuple[float, int]],
    tokens_per_s: float,
    parent_tokens_per_s: float,
    runtime: str,
) -> dict[str, Any]:
    """The manifest's ``quality``: token F1 of both against the references, perplexity of the references under
    both, how often the greedy answers agree, and both decode speeds."""
    from tuneloop.textmetrics import token_f1

    f1 = [token_f1(a, r) for a, r in zip(answers, refs)]
    pf1 = [token_f1(a, r) for a, r in zip(parent_answers, refs)]
    total, n = sum(x for x, _ in nll), sum(k for _, k in nll)
    ptotal, pn = sum(x for x, _ in parent_nll), sum(k for _, k in parent_nll)
    ppl, pppl = math.exp(total / max(n, 1)), math.exp(ptotal / max(pn, 1))
    return {
        "split": split,
        "examples": len(refs),
        "metric_name": "token_f1",
        "metric": sum(f1) / len(f1),
        "parent_metric": sum(pf1) / len(pf1),
        "metric_drop": sum(pf1) / len(pf1) - sum(f1) / len(f1),
        "perplexity": ppl,
        "parent_perplexity": pppl,
        "ppl_ratio": ppl / pppl,
        "answers_identical": sum(a == b for a, b in zip(answers, parent_answers)) / len(refs),
        "runtime": runtime,
        "tokens_per_s": tokens_per_s,
        "parent_tokens_per_s": parent_tokens_per_s,
    }


def golden_quality(golden: list[dict[str, Any]], answers: list[str], parent_answers: list[str]) -> dict[str, Any]:
    """Both sides' pass rates on the golden prompts, the drop, and each prompt's verdicts (module doc)."""
    results = []
    for g, a, pa in zip(golden, answers, parent_answers, strict=True):
        results.append(
            {"name": g["name"], "passed": g["rule"].check(a).passed, "parent_passed": g["rule"].check(pa).passed,
             "output": a, "parent_output": pa}
        )  # fmt: skip
    rate = sum(r["passed"] for r in results) / len(results)
    parent_rate = sum(r["parent_passed"] for r in results) / len(results)
    return {"pass_rate": rate, "parent_pass_rate": parent_rate, "drop": parent_rate - rate, "results": results}


def register_export(
    db: Database, v: ModelVersion, name: str, kind: str, path: Path, manifest: dict[str, Any], config: dict[str, Any]
) -> ModelVersion:
    from tuneloop.registry import ModelVersion, register_version

    return register_version(
        db,
        ModelVersion(
            name=name,
            kind=kind,
            base_model=v.base_model,
            path=str(path),
            content_hash=manifest["sha256"],
            parent_version=v.name,
            dataset_id=v.dataset_id,
            run_id=v.run_id,
            config={"export": config},
            metrics=manifest["quality"],
        ),
    )


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def sha256(p: Path) -> str:
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def digest(text: str | None) -> str | None:
    return hashlib.sha256(text.encode()).hexdigest() if text else None


def tokenizer_template(folder: Path) -> str | None:
    """The chat template the folder's tokenizer renders with (``chat_template.jinja`` or tokenizer_config.json)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    try:
        t = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        return None
    return t if isinstance(t, str) else None


def eval_rows(
    db: Database, dataset: str | None, limit: int, tok: Any
) -> tuple[str, list[list[int]], list[str], list[tuple[list[int], list[int]]]]:
    """The version's test split (at most ``limit`` rows): its split name, prompt token ids, reference answers and
    (prompt + answer ids, answer mask) sequences to score."""
    from tuneloop.chat import completion_ids, render_prompt, split_answer
    from tuneloop.trainer.evaluate import load_eval_rows

    if not dataset:
        raise UserError("the version has no dataset recorded: its test split is what the export is measured on")
    rows, _, split = load_eval_rows(db, dataset, limit)
    prompts, refs, scored = [], [], []
    for r in rows:
        msgs, answer = split_answer(r["messages"])
        ids = render_prompt(tok, msgs, r.get("tools"))
        prompts.append(ids)
        refs.append(answer)
        target = completion_ids(tok, answer)
        scored.append((ids + target, [0] * len(ids) + [1] * len(target)))
    return split, prompts, refs, scored
