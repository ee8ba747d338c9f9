"""What a training run reads: the base weights, the dataset, replay rows and tokenized SFT rows.

Contract
--------
* :func:`resolve_base_model` turns a ``base=`` reference (a HF model folder, a
  known or hub model name, or a registered version) into the folder of base
  weights; a registered adapter resolves to its own base model.
* :func:`load_dataset_ref` loads a registered dataset or a dataset folder as a
  ``DatasetDict`` with its dataset id (from the data card or the registry, None
  when unknown) and its kind: ``sft`` (a ``messages`` column) or ``preference``
  (``prompt``/``chosen``/``rejected``).
* :func:`mix_replay` adds shuffled rows of a replay split so that they make up
  ``fraction`` of the training rows (seeded, so a rerun mixes the same rows);
  rows with and without tool calling mix (the columns and message fields are
  widened to the union).
* :func:`tokenize_sft` tokenizes SFT rows with :func:`tuneloop.chat.training_example`
  (the server's prompt rendering + answer + EOS, loss on the answer only), the
  messages as :func:`tuneloop.dataset_store.chat_message` gives them (tool calls
  kept, unset fields dropped) and the row's ``tools`` handed to the template, so
  a logged tool-calling request trains on the tokens the server rendered.

Nothing here writes anything; bad references raise :class:`~tuneloop.errors.UserError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.errors import UserError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

    from tuneloop.chat import Tokenizer
    from tuneloop.db import Database
    from tuneloop.settings import Settings


def resolve_base_model(db: Database, settings: Settings, ref: str) -> Path:
    """Folder of the base weights: a registered version's (an adapter's base, a merged or base version's own
    folder), else what :func:`tuneloop.modelcache.resolve_model` makes of ``ref`` (a model folder, a known base,
    a hub id from the model cache)."""
    from tuneloop.modelcache import resolve_model
    from tuneloop.modelfiles import looks_like_path
    from tuneloop.registry import RegistryError, get_version

    models = settings.paths.models_path
    v = None
    if not (looks_like_path(ref) or "/" in ref or Path(ref).exists()):  # version names have no slash
        try:
            v = get_version(db, ref)
        except RegistryError:
            v = None
    if v is None:
        return resolve_model(ref, models, versions=True)
    if v.kind in ("merged", "base"):
        return resolve_model(v.path, models, what=f"model folder of version {v.name!r}")
    return resolve_model(v.base_model, models, what=f"base model of version {v.name!r}")


def load_dataset_ref(db: Database, ref: str) -> tuple[DatasetDict, str | None, str]:
    """(DatasetDict, dataset id or None, kind) of a registered dataset or a dataset folder."""
    from tuneloop.dataset_store import load_splits
    from tuneloop.registry import RegistryError, get_dataset

    try:
        dd = load_splits(db, ref)
    except (FileNotFoundError, RegistryError, UserError) as e:
        raise UserError(f"cannot load dataset {ref!r}: {e}") from None
    from tuneloop.dataset_store import load_card

    try:  # the id is in the data card, for registered refs and dataset folders alike
        ds_id = load_card(db, ref).get("id")
    except (OSError, ValueError, RegistryError):
        ds_id = None
    if ds_id is None and not Path(ref).exists():
        try:
            ds_id = get_dataset(db, ref).id
        except RegistryError:
            pass
    cols = set(dd["train"].column_names)
    kind = "preference" if {"prompt", "chosen", "rejected"} <= cols else "sft" if "messages" in cols else None
    if kind is None:
        raise UserError(
            f"dataset {ref!r} has columns {sorted(cols)}: expected 'messages' (sft) or prompt/chosen/rejected (preference)"
        )
    return dd, ds_id, kind


def mix_replay(train_ds: Dataset, replay_ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, int]:
    """``train_ds`` plus rows of ``replay_ds`` so that they make up ``fraction`` of the result."""
    from datasets import concatenate_datasets

    if fraction <= 0 or len(replay_ds) == 0:
        return train_ds, 0
    n = min(len(replay_ds), max(1, round(len(train_ds) * fraction / (1 - fraction))))
    picked = replay_ds.shuffle(seed=seed).select(range(n))
    if "tools" in picked.column_names and "tools" not in train_ds.column_names:
        train_ds = _with_null_column(train_ds, "tools")
    cols = [c for c in train_ds.column_names if c in picked.column_names]
    if "tools" in train_ds.column_names and "tools" not in cols:
        picked, cols = _with_null_column(picked, "tools"), [*cols, "tools"]
    left, right = train_ds.select_columns(cols), picked.select_columns(cols)
    feats = _wider(left.features, right.features)
    mixed = concatenate_datasets([left.cast(feats), right.cast(feats)])
    return mixed.shuffle(seed=seed), n


def _with_null_column(ds: Dataset, name: str) -> Dataset:
    from datasets import Value

    return ds.add_column(name, [None] * len(ds), feature=Value("string"))


def _wider(a: Any, b: Any) -> Any:
    """Features ``a`` with every struct (a message) widened by the fields only ``b`` has."""
    from datasets import Features, List

    if isinstance(a, dict) and isinstance(b, dict):
        out = {k: _wider(v, b[k]) if k in b else v for k, v in a.items()}
        out.update({k: v for k, v in b.items() if k not in a})
        return Features(out) if isinstance(a, Features) else out
    if isinstance(a, List) and isinstance(b, List):
        return List(_wider(a.feature, b.feature))
    return a


def tokenize_sft(ds: Dataset, tokenizer: Tokenizer, max_length: int) -> Dataset:
    """SFT rows -> ``input_ids`` + ``completion_mask`` via :func:`tuneloop.chat.training_example`."""
    from tuneloop.chat import training_example
    from tuneloop.dataset_store import chat_message, row_tools

    return ds.map(
        lambda r: training_example(tokenizer, [chat_message(m) for m in r["messages"]], max_length, row_tools(r)),
        remove_columns=ds.column_names,
        desc="tokenizing",
    )
