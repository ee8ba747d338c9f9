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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.errors import UserError
from tuneloop.modelfiles import read_json_object
from tuneloop.staging import staged_folder

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


def _adapter_config(folder: Path, version: str) -> dict[str, Any]:
    """The adapter's ``adapter_config.json`` as a mapping; UserError when it is missing or malformed."""
    cfg_file = folder / "adapter_config.json"
    if not cfg_file.is_file():
        raise UserError(f"{folder} has no adapter_config.json; is the adapter folder of {version!r} intact?")
    doc = read_json_object(cfg_file, str(cfg_file), f"restore it from the run folder or retrain {version!r}")
    for key, kind in (("peft_type", str), ("r", int), ("target_modules", (list, str))):
        if key in doc and not isinstance(doc[key], kind):
            raise UserError(f"{cfg_file}: {key!r} has the wrong type ({doc[key]!r}); restore it or retrain {version!r}")
    return doc


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
    from tuneloop.modelcache import resolve_model
    from tuneloop.registry import ModelVersion, RegistryError, get_version, register_version

    # every refusal (arguments, registry, files) comes before torch, transformers and peft are imported (seconds)
    if tolerance < 0:
        raise UserError(f"--tolerance must be >= 0, got {tolerance}")
    v = get_version(db, version)
    if v.kind != "adapter":
        raise UserError(f"{version!r} is a {v.kind} version; only adapter versions can be merged")
    peft_type = _adapter_config(Path(v.path), version).get("peft_type", "")
    if peft_type != "LORA":
        raise UserError(
            f"{version!r} is a {peft_type or 'non-LoRA'} adapter; only LoRA adapters (methods lora, qlora, dpo, kto) "
            "can be merged into weights, and vLLM cannot serve it either: evaluate it with `tuneloop eval` "
            "(it generates with transformers), or retrain with method=lora to merge or serve it"
        )
    name = name or f"{version}-merged"
    try:
        get_version(db, name)
        raise UserError(f"model version {name!r} already exists; pick another --name")
    except RegistryError:
        pass

    own_tok = (Path(v.path) / "tokenizer_config.json").is_file()
    base_dir = resolve_model(
        v.base_model, settings.paths.models_path, what=f"base model of version {version!r}", tokenizer=not own_tok
    )

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.chat import render_prompt
    from tuneloop.ids import hash_path

    tok_dir = Path(v.path) if own_tok else base_dir
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    samples = [render_prompt(tok, p) for p in (prompts or _sample_prompts(db, v))]

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    try:
        model = PeftModel.from_pretrained(base, v.path)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:  # a config PEFT refuses, mismatched shapes
        raise UserError(f"cannot load the adapter of {version!r} from {v.path}: {e}") from None
    model.eval()
    ref = _logits(model, samples)
    merged = model.merge_and_unload()

    root = settings.paths.sub("models")
    dest = root / name
    if dest.exists():
        raise UserError(f"{dest} already exists; pick another --name or remove it")
    with staged_folder(dest) as tmp:
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
