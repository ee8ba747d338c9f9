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
  widened to the union; optional columns, ``tools`` and ``check``, are null
  where a side lacks them).
* :func:`parse_mix` reads ``train datasets=`` entries (``ref:weight``; a
  weight > 0; either every entry has a weight or none has, none = equal
  weights, so a single entry without a weight is 1.0) into :class:`MixEntry`
  values whose ``share`` (weight / sum of weights) sums to 1; a bad entry is a
  :class:`~tuneloop.errors.UserError` naming it.
* :func:`mix_datasets` mixes loaded datasets by those shares (:data:`MIX_RULE`):
  the train split holds :func:`mix_counts` rows of each input, a seeded random
  sample without repetition, so that each input's share of the rows is its
  weight's share (to the nearest row; at least one row of each); the dataset
  that is scarcest for its weight is used in full, and no row is repeated.
  The validation and test splits are the inputs' validation and test rows
  concatenated in full, in ``datasets=`` order. Every row id becomes
  ``<input dataset id>/<row id>`` (ids stay unique across inputs and say which
  input a row came from). It returns the splits and one :class:`MixShare` per
  input (dataset id, weight, share, rows available and drawn), which the run
  config and the mixed dataset's data card record.
* :func:`tokenize_sft` tokenizes SFT rows with :func:`tuneloop.chat.training_example`
  (the server's prompt rendering + answer + EOS, loss on the answer only), the
  messages as :func:`tuneloop.dataset_store.chat_message` gives them (tool calls
  kept, unset fields dropped) and the row's ``tools`` handed to the template, so
  a logged tool-calling request trains on the tokens the server rendered.

Nothing here writes anything; bad references raise :class:`~tuneloop.errors.UserError`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
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
    if v.kind in ("merged", "base", "quantized"):
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
    if fraction <= 0 or len(replay_ds) == 0:
        return train_ds, 0
    n = min(len(replay_ds), max(1, round(len(train_ds) * fraction / (1 - fraction))))
    picked = replay_ds.shuffle(seed=seed).select(range(n))
    return _union([train_ds, picked]).shuffle(seed=seed), n


# ---- multi-task mixing (train datasets=) ---------------------------------------------------------------

MIX_RULE = (
    "train rows: a seeded sample without repetition of each input, sized so that each input's share of the rows "
    "is its weight's share (nearest row, at least 1); the input scarcest for its weight is used in full. "
    "validation and test: every input's rows, concatenated in datasets= order. Row ids: <input id>/<row id>."
)
"""How :func:`mix_datasets` mixes (recorded in the data card of a mixed dataset)."""


@dataclass(frozen=True)
class MixEntry:
    """One ``datasets=`` entry: the dataset reference, its weight as given and its normalised share."""

    ref: str
    weight: float
    share: float


@dataclass(frozen=True)
class MixShare:
    """What one input contributed to a mix (recorded in the run config and the data card)."""

    dataset: str
    ref: str
    weight: float
    share: float
    rows_available: int
    rows_drawn: int
    validation_rows: int
    test_rows: int


def parse_mix(entries: Sequence[str]) -> list[MixEntry]:
    """``datasets=`` entries (``ref:weight`` or ``ref``) -> :class:`MixEntry` values with shares summing to 1.

    The weight follows the last ``:``; it must be a finite number > 0. Either every entry has a weight or none
    has (equal weights; one entry alone is weight 1.0). A weight without a name, a bad number, a mix of weighted
    and unweighted entries or a dataset named twice is a :class:`UserError` naming the entry."""
    raw = [str(e).strip() for e in entries if str(e).strip()]
    if not raw:
        raise UserError("datasets= names no dataset: pass datasets=<ref>:<weight>,<ref>:<weight>")
    parsed: list[tuple[str, float | None]] = []
    for e in raw:
        ref, sep, w = e.rpartition(":")
        if not sep:
            parsed.append((e, None))
            continue
        ref = ref.strip()
        if not ref:
            raise UserError(f"datasets= entry {e!r} has a weight but no dataset name (write <ref>:<weight>)")
        try:
            weight = float(w)
        except ValueError:
            raise UserError(f"datasets= entry {e!r}: weight {w.strip()!r} is not a number") from None
        if not math.isfinite(weight) or weight <= 0:
            raise UserError(f"datasets= entry {e!r}: the weight must be a number > 0, got {w.strip()}")
        parsed.append((ref, weight))
    weighted = [e for e, (_, w) in zip(raw, parsed, strict=True) if w is not None]
    if weighted and len(weighted) != len(parsed):
        bare = [e for e, (_, w) in zip(raw, parsed, strict=True) if w is None]
        raise UserError(
            f"datasets= entry {bare[0]!r} has no weight while {weighted[0]!r} has one: give every entry a weight "
            "(<ref>:<weight>) or none (equal weights)"
        )
    refs = [r for r, _ in parsed]
    dup = next((r for i, r in enumerate(refs) if r in refs[:i]), None)
    if dup is not None:
        raise UserError(f"datasets= names {dup!r} twice: give each dataset one entry")
    weights = [w if w is not None else 1.0 for _, w in parsed]
    total = sum(weights)
    return [MixEntry(r, w, w / total) for r, w in zip(refs, weights, strict=True)]


def mix_counts(sizes: Sequence[int], shares: Sequence[float]) -> list[int]:
    """Rows to draw from inputs of ``sizes`` rows so that they make up ``shares`` of the mix (see :data:`MIX_RULE`).

    The mix has ``floor(min(size / share))`` rows: the most that needs no input row twice; input ``i`` gives
    ``round(total * share_i)`` of them (at least 1, at most its size)."""
    if not sizes or any(n < 1 for n in sizes):
        raise UserError(f"every mixed dataset needs training rows, got {list(sizes)}")
    total = math.floor(min(n / s for n, s in zip(sizes, shares, strict=True)) + 1e-9)
    return [min(n, max(1, math.floor(total * s + 0.5))) for n, s in zip(sizes, shares, strict=True)]


def mix_datasets(parts: Sequence[tuple[MixEntry, str, DatasetDict]], seed: int) -> tuple[DatasetDict, list[MixShare]]:
    """Mix ``(entry, dataset id, splits)`` inputs by their shares (module doc, :data:`MIX_RULE`), seeded.

    Returns the mixed ``train`` (shuffled), ``validation`` and ``test`` splits and one :class:`MixShare` per
    input, in input order."""
    from datasets import DatasetDict

    counts = mix_counts([len(dd["train"]) for _, _, dd in parts], [e.share for e, _, _ in parts])
    drawn, shares = [], []
    held: dict[str, list[Dataset]] = {"validation": [], "test": []}
    for (entry, ds_id, dd), n in zip(parts, counts, strict=True):
        drawn.append(_prefixed(dd["train"].shuffle(seed=seed).select(range(n)), ds_id))
        for split, dss in held.items():
            if split in dd:
                dss.append(_prefixed(dd[split], ds_id))
        shares.append(
            MixShare(
                dataset=ds_id,
                ref=entry.ref,
                weight=entry.weight,
                share=entry.share,
                rows_available=len(dd["train"]),
                rows_drawn=n,
                validation_rows=len(dd["validation"]) if "validation" in dd else 0,
                test_rows=len(dd["test"]) if "test" in dd else 0,
            )
        )
    train = _union(drawn).shuffle(seed=seed)
    out = {"train": train}
    for split, dss in held.items():
        out[split] = _union(dss) if dss else train.select([])
    return DatasetDict(out), shares


def _prefixed(ds: Dataset, prefix: str) -> Dataset:
    """``ds`` with every row id ``<prefix>/<id>``."""
    if "id" not in ds.column_names or len(ds) == 0:
        return ds
    return ds.map(lambda r: {"id": f"{prefix}/{r['id']}"}, desc="mix row ids")


_OPTIONAL_COLUMNS = ("tools", "check", "provenance")  # JSON-text columns a dataset has only when some row uses them


def _union(parts: Sequence[Dataset]) -> Dataset:
    """``parts`` concatenated: the columns all of them have, plus the optional columns any has (null where a
    part lacks them); message structs widened to every field any part has."""
    from datasets import concatenate_datasets

    first = parts[0].column_names
    optional = [c for c in _OPTIONAL_COLUMNS if any(c in p.column_names for p in parts)]
    cols = [c for c in first if all(c in p.column_names for p in parts)]
    cols += [c for c in optional if c not in cols]
    parts = [
        _with_null_columns(p, [c for c in optional if c not in p.column_names]).select_columns(cols) for p in parts
    ]
    feats = parts[0].features
    for p in parts[1:]:
        feats = _wider(feats, p.features)
    return concatenate_datasets([p.cast(feats) for p in parts])


def _with_null_columns(ds: Dataset, names: Sequence[str]) -> Dataset:
    from datasets import Value

    for name in names:
        ds = ds.add_column(name, [None] * len(ds), feature=Value("string"))
    return ds


def _wider(a: Any, b: Any) -> Any:
    """Features ``a`` with every struct (a message) widened by the fields only ``b`` has."""
    from datasets import Features, List, Value

    if isinstance(a, Value) and a.dtype == "null":  # a column that is null in every row of ``a`` takes b's type
        return b
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
