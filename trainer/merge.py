"""Merge a LoRA / QLoRA adapter version into its base weights, with a logits parity check.

Contract
--------
``merge(version, db, settings, name=None, tolerance=1e-3, prompts=None) -> (ModelVersion, max_abs_diff)``

* ``version`` must be a registered ``adapter`` version whose adapter is LoRA
  (``lora``, ``qlora`` or ``dpo`` runs); prompt-tuning adapters cannot be merged.
* The base is loaded in float32 (for QLoRA too: the adapter is merged into
  full-precision weights, not into the 4-bit ones) and the adapter applied with
  PEFT; ``merge_and_unload`` gives plain weights saved with the tokenizer and
  chat template as an HF folder under ``<home>/models/<name>`` that vLLM serves.
* Parity: the saved folder is reloaded and its logits on
  sample prompts (the version's test rows rendered by the server's chat code,
  else fixed prompts) are compared with base+adapter. If the largest absolute
  difference exceeds ``tolerance`` the folder is deleted, nothing is registered
  and :class:`MergeParityError` (a UserError, exit 2) is raised.
* Success registers kind ``merged`` with ``parent_version`` = the adapter
  version, its dataset and run, and the folder's content hash. Writing happens
  in a temporary folder renamed into place: a crash leaves no half model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.errors import UserError

if TYPE_CHECKING:
    import torch

    from tuneloop.db import Database
    from tuneloop.registry import ModelVersion
    from tuneloop.settings import Settings

DEFAULT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Tell me a joke about computers."}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Hello, how are you?"}],
]


class MergeParityError(UserError):
    """The merged weights do not reproduce base+adapter within the tolerance."""


def _sample_prompts(db: Database, version: ModelVersion, n: int = 4) -> list[list[dict[str, str]]]:
    prompts: list[list[dict[str, str]]] = []
    if version.dataset_id:
        try:
            from tuneloop.trainer.evaluate import load_eval_rows

            rows, _, _ = load_eval_rows(db, version.dataset_id, n)
            prompts = [r["messages"][:-1] for r in rows if len(r["messages"]) > 1]
        except UserError:
            prompts = []
    return prompts + DEFAULT_PROMPTS


def _logits(model: Any, batches: list[list[int]]) -> list[torch.Tensor]:
    import torch

    out = []
    with torch.no_grad():
        for ids in batches:
            out.append(model(input_ids=torch.tensor([ids])).logits[0].float())
    return out


def merge(
    version: str,
    db: Database,
    settings: Settings,
    name: str | None = None,
    tolerance: float = 1e-3,
    prompts: list[list[dict[str, str]]] | None = None,
) -> tuple[ModelVersion, float]:
    """Merge, check parity, register (see module doc). Returns ``(ModelVersion, max_abs_diff)``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.chat import render_prompt
    from tuneloop.ids import hash_path
    from tuneloop.registry import ModelVersion, RegistryError, get_version, register_version

    if tolerance < 0:
        raise UserError(f"--tolerance must be >= 0, got {tolerance}")
    v = get_version(db, version)
    if v.kind != "adapter":
        raise UserError(f"{version!r} is a {v.kind} version; only adapter versions can be merged")
    cfg_file = Path(v.path) / "adapter_config.json"
    if not cfg_file.is_file():
        raise UserError(f"{v.path} has no adapter_config.json; is the adapter folder intact?")
    peft_type = json.loads(cfg_file.read_text()).get("peft_type", "")
    if peft_type != "LORA":
        raise UserError(
            f"{version!r} is a {peft_type or 'non-LoRA'} adapter; only LoRA/QLoRA adapters can be merged into weights"
        )
    name = name or f"{version}-merged"
    try:
        get_version(db, name)
        raise UserError(f"model version {name!r} already exists; pick another --name")
    except RegistryError:
        pass

    tok_dir = Path(v.path) if (Path(v.path) / "tokenizer_config.json").is_file() else Path(v.base_model)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    samples = [render_prompt(tok, p) for p in (prompts or _sample_prompts(db, v))]

    base = AutoModelForCausalLM.from_pretrained(v.base_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, v.path)
    model.eval()
    ref = _logits(model, samples)
    merged = model.merge_and_unload()

    root = settings.paths.sub("models")
    dest = root / name
    if dest.exists():
        raise UserError(f"{dest} already exists; pick another --name or remove it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        del merged, model, base
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32)
        reloaded.eval()
        got = _logits(reloaded, samples)
        diff = max(float((a - b).abs().max()) for a, b in zip(ref, got))
        del reloaded
        if not diff <= tolerance:  # also catches NaN
            raise MergeParityError(
                f"merged weights differ from base+adapter by up to {diff:.3e} in logits (tolerance {tolerance:g}) "
                f"on {len(samples)} prompts; nothing registered"
            )
        (tmp / "tuneloop-merge.json").write_text(
            json.dumps(
                {
                    "merged_from": v.name,
                    "adapter_hash": v.content_hash,
                    "base_model": v.base_model,
                    "parity_max_abs_diff": diff,
                    "parity_prompts": len(samples),
                },
                indent=2,
            )
        )
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    digest = hash_path(dest)
    mv = register_version(
        db,
        ModelVersion(
            name=name,
            kind="merged",
            base_model=v.base_model,
            path=str(dest),
            content_hash=digest,
            parent_version=v.name,
            dataset_id=v.dataset_id,
            run_id=v.run_id,
            config={"merged_from": v.name, "adapter_hash": v.content_hash, "tolerance": tolerance},
            metrics={**(v.metrics or {}), "parity_max_abs_diff": diff},
        ),
    )
    return mv, diff
