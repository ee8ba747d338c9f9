"""Merge a PEFT weight adapter into its base weights, with a logits parity check.

Contract
--------
``merge(version, db, settings, name=None, tolerance=1e-3, prompts=None) -> (ModelVersion, max_abs_diff)``
``merge_folder(base_dir, adapter_dir, dest, prompts, tolerance, provenance) -> max_abs_diff``

* ``version`` must be a registered ``adapter`` version whose adapter PEFT can merge
  (:data:`MERGEABLE_PEFT_TYPES`: LoRA from ``lora``, ``qlora``, ``dpo``, ``kto``
  runs, DoRA, AdaLoRA, IA3, LoHa, LoKr, OFT); prompt- and prefix-tuning adapters
  cannot be merged.
* :func:`merge_folder` does the work, for ``merge`` and for
  :func:`tuneloop.trainer.train.train` (which merges the methods vLLM cannot serve
  as adapters right after training, :mod:`tuneloop.trainer.peft_methods`). The base
  is loaded in float32 (for QLoRA too: the adapter is merged into full-precision
  weights, not into the 4-bit ones) and the adapter applied with PEFT;
  ``merge_and_unload`` gives plain weights saved with the tokenizer and chat
  template as an HF folder that vLLM serves (``merge``: ``<home>/models/<name>``).
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

DEFAULT_PROMPTS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Tell me a joke about computers."}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Hello, how are you?"}],
]


MERGEABLE_PEFT_TYPES = ("LORA", "ADALORA", "IA3", "LOHA", "LOKR", "OFT")
"""Adapter types PEFT's ``merge_and_unload`` folds into the base weights (prompt learning cannot be merged)."""


class MergeParityError(UserError):
    """The merged weights do not reproduce base+adapter within the tolerance."""


def sample_prompts(db: Database, dataset_id: str | None, n: int = 4) -> list[list[dict[str, Any]]]:
    """Parity prompts: the prompts of up to ``n`` held-out rows (test, else validation) of the dataset, then
    the fixed prompts. Read with :mod:`tuneloop.dataset_store` (not the evaluator: training imports this)."""
    prompts: list[list[dict[str, Any]]] = []
    if dataset_id:
        from tuneloop.dataset_store import good_chat, load_splits

        try:
            dd = load_splits(db, dataset_id)
        except (OSError, ValueError, UserError):
            dd = None
        split = next((s for s in ("test", "validation") if dd is not None and s in dd and len(dd[s])), None)
        if dd is not None and split is not None:
            rows = dd[split].select(range(min(n, len(dd[split]))))
            prompts = [chat[0] for chat in map(good_chat, rows) if chat is not None and chat[0]]
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


def merge_folder(
    base_dir: Path,
    adapter_dir: Path,
    dest: Path,
    prompts: list[list[dict[str, Any]]],
    tolerance: float,
    provenance: dict[str, Any],
    what: str = "the adapter",
) -> float:
    """Merge the PEFT adapter in ``adapter_dir`` into the float32 base ``base_dir`` and save the plain model and the
    tokenizer (the adapter's own, else the base's) at ``dest`` (replaced if present), with ``tuneloop-merge.json``
    (``provenance`` + the parity numbers). Returns the largest absolute logit difference between base+adapter and the
    reloaded folder on ``prompts``; above ``tolerance`` nothing is left at ``dest`` and :class:`MergeParityError`
    is raised. ``what`` names the adapter in errors."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.chat import render_prompt

    tok_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    samples = [render_prompt(tok, p) for p in prompts]
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    except (TypeError, ValueError, KeyError, RuntimeError) as e:  # a config PEFT refuses, mismatched shapes
        raise UserError(f"cannot load the adapter of {what} from {adapter_dir}: {e}") from None
    model.eval()
    ref = _logits(model, samples)
    merged = model.merge_and_unload()
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
            json.dumps({**provenance, "parity_max_abs_diff": diff, "parity_prompts": len(samples)}, indent=2)
        )
    return diff


def merge(
    version: str,
    db: Database,
    settings: Settings,
    name: str | None = None,
    tolerance: float = 1e-3,
    prompts: list[list[dict[str, Any]]] | None = None,
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
    peft_type = str(_adapter_config(Path(v.path), version).get("peft_type", ""))
    if peft_type not in MERGEABLE_PEFT_TYPES:
        raise UserError(
            f"{version!r} is a {peft_type or 'non-LoRA'} adapter; only weight adapters ({', '.join(MERGEABLE_PEFT_TYPES)}:"
            " methods lora, qlora, dpo, kto, dora, adalora, ia3, loha, lokr, oft) can be merged into weights, and "
            "vLLM cannot serve it either: evaluate it with `tuneloop eval` (it generates with transformers), or "
            "retrain with method=lora to merge or serve it"
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
    dest = settings.paths.sub("models") / name
    if dest.exists():
        raise UserError(f"{dest} already exists; pick another --name or remove it")
    diff = merge_folder(
        base_dir,
        Path(v.path),
        dest,
        prompts or sample_prompts(db, v.dataset_id),
        tolerance,
        {"merged_from": v.name, "adapter_hash": v.content_hash, "base_model": v.base_model},
        what=repr(version),
    )
    from tuneloop.ids import hash_path

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
