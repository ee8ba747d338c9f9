"""The data-preparation pipeline: raw records -> a cleaned, split, versioned and registered dataset.

Contract
--------
* :class:`PrepareConfig` holds the options of ``tuneloop data prepare`` (one
  field per flag).
* :func:`prepare_records` validates the options, renames fields, detects the
  shape (:mod:`tuneloop.trainer.data_formats`) and runs the cleaning steps
  (:mod:`tuneloop.trainer.data_clean`) in order — convert and normalise
  whitespace, drop empty/invalid rows, PII scrub, exact and near-duplicate
  removal, token-length filter (chat-template-rendered, base tokenizer) — then
  splits deterministically (:func:`split_rows`). Classification records
  (``text`` + ``label``) give a ``classification`` dataset: the same steps on
  the text (duplicates by text, token length of the raw text, no chat template
  needed), the split stratified by label unless ``stratify`` names another
  field, and the card records ``label_names`` (sorted: the label order a model
  trained on it uses), ``labels`` (count per label in train) and
  ``label_counts`` (per split). An empty or unconvertible label is a
  ``DataError`` naming the record. Rows keep their ``tools``
  and tool-call messages through every step; a malformed tool definition,
  tool call or tool message is a ``DataError`` naming the record
  (:class:`~tuneloop.trainer.data_formats.ToolSchemaError`), not a dropped row. It returns ``(kind, splits,
  card)``; every step is counted in ``card["steps"]``. Nothing left raises
  :class:`~tuneloop.trainer.data_io.DataError`.
* Row ids are content hashes of the cleaned row, so the same input gives the
  same ids and (same seed) the same split.
* :func:`prepare` reads ``cfg.inputs`` (:mod:`tuneloop.trainer.data_io`) or
  takes given records, runs :func:`prepare_records` with the base model's
  tokenizer (loaded only once the input has been validated), adds the source,
  the options and the tokenizer to the card and registers the result through
  :func:`tuneloop.dataset_store.save_dataset` (atomic: on any error nothing is
  written and nothing registered). :func:`summary_lines` is the printed summary.
"""

from __future__ import annotations

import hashlib
import random
import re
import statistics
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.chat import Tokenizer
from tuneloop.trainer.data_clean import (
    dedup_rows,
    exact_key,
    has_empty_turn,
    length_filter,
    load_tokenizer,
    normalise_row,
    require_chat_template,
    scrub_rows,
    token_lengths,
)
from tuneloop.trainer.data_formats import (
    FORMATS,
    REQUIRED,
    InvalidRow,
    LabelError,
    ToolSchemaError,
    apply_field_map,
    detect_format,
    to_row,
)
from tuneloop.trainer.data_io import DataError, Record, read_inputs

if TYPE_CHECKING:
    from tuneloop.db import Database
    from tuneloop.registry import DatasetRecord
    from tuneloop.settings import Settings

Row = dict[str, Any]


@dataclass
class PrepareConfig:
    """Options of ``tuneloop data prepare`` (one field per flag)."""

    inputs: list[str] = field(
        default_factory=list,
        metadata={"help": "Input files/folders: .jsonl/.json, .csv or a Hugging Face datasets folder."},
    )
    name: str = field(default="", metadata={"help": "Dataset name (default: stem of the first input)."})
    format: str = field(
        default="auto",
        metadata={"help": f"Record shape, one of {', '.join(FORMATS)}; auto detects it from the fields."},
    )
    base: str = field(
        default="smollm2-135m-instruct",
        metadata={"help": "Base model (folder or known name) whose tokenizer and chat template measure lengths."},
    )
    min_tokens: int = field(
        default=1,
        metadata={"help": "Drop conversations shorter than this many tokens (rendered with the chat template)."},
    )
    max_tokens: int = field(
        default=2048,
        metadata={"help": "Drop conversations longer than this many tokens (rendered with the chat template)."},
    )
    split: tuple[float, float, float] = field(
        default=(0.8, 0.1, 0.1), metadata={"help": "Train/validation/test fractions."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the deterministic split."})
    stratify: str | None = field(
        default=None,
        metadata={"help": "Input field whose values are split in the same proportions (e.g. a topic column)."},
    )
    scrub: bool = field(
        default=True, metadata={"help": "Replace emails, phone numbers, card numbers and IPs with placeholders."}
    )
    near_dedup: bool = field(
        default=True,
        metadata={
            "help": "Also drop near duplicates (same text after lowercasing, removing punctuation, collapsing spaces)."
        },
    )
    skip_invalid: bool = field(default=False, metadata={"help": "Skip (and count) malformed lines instead of failing."})
    field_map: dict[str, str] = field(
        default_factory=dict, metadata={"help": "Rename input fields before detection (old -> new)."}
    )
    system: str | None = field(
        default=None, metadata={"help": "System prompt prepended to conversations that have none."}
    )


def split_rows(
    rows: list[Row], fractions: tuple[float, float, float], seed: int, strata: list[Any] | None = None
) -> dict[str, list[Row]]:
    """Deterministic split: rows sorted by id, shuffled with ``seed``, cut by fractions (per stratum)."""
    groups: dict[Any, list[int]] = {}
    for i, _ in enumerate(rows):
        groups.setdefault(strata[i] if strata else None, []).append(i)
    out: dict[str, list[Row]] = {"train": [], "validation": [], "test": []}
    for key in sorted(groups, key=str):
        idx = sorted(groups[key], key=lambda i: rows[i]["id"])
        random.Random(f"{seed}:{key}").shuffle(idx)
        n = len(idx)
        n_test = round(n * fractions[2])
        n_val = round(n * fractions[1])
        if n_test + n_val >= n:  # keep at least one training row per stratum
            n_test, n_val = min(n_test, max(n - 1, 0)), max(0, min(n_val, n - 1 - min(n_test, n - 1)))
        out["test"] += [rows[i] for i in idx[:n_test]]
        out["validation"] += [rows[i] for i in idx[n_test : n_test + n_val]]
        out["train"] += [rows[i] for i in idx[n_test + n_val :]]
    for s in out:
        out[s].sort(key=lambda r: r["id"])
    return out


def _length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {"count": 0}
    s = sorted(lengths)
    return {
        "count": len(s),
        "min": s[0],
        "mean": round(statistics.fmean(s), 2),
        "p50": s[len(s) // 2],
        "p95": s[min(len(s) - 1, int(0.95 * len(s)))],
        "max": s[-1],
        "total": sum(s),
    }


def _check_options(cfg: PrepareConfig) -> None:
    if cfg.format not in FORMATS:
        raise DataError(f"--format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    if len(cfg.split) != 3 or any(f < 0 for f in cfg.split) or abs(sum(cfg.split) - 1) > 1e-6 or cfg.split[0] <= 0:
        raise DataError(
            f"split fractions must be three non-negative numbers summing to 1 with train > 0, got {cfg.split}"
        )
    if cfg.min_tokens > cfg.max_tokens:
        raise DataError(f"--min-tokens ({cfg.min_tokens}) is larger than --max-tokens ({cfg.max_tokens})")


def prepare_records(
    records: list[Record],
    cfg: PrepareConfig,
    tokenizer: Tokenizer | Callable[[], Tokenizer],
    progress: bool = False,
) -> tuple[str, dict[str, list[Row]], dict[str, Any]]:
    """Run every cleaning step on ``records``; returns ``(kind, splits, card)``. Raises DataError when nothing is left.

    ``tokenizer`` is a tokenizer or a zero-argument callable returning one: it is only called once the
    input has been validated and cleaned, so bad input fails fast without loading a model's tokenizer.
    """
    _check_options(cfg)
    apply_field_map(records, cfg.field_map)
    if not records:
        raise DataError("the input holds no records")
    if cfg.stratify and not any(cfg.stratify in r.data for r in records):
        fields = sorted(set().union(*(r.data.keys() for r in records)))
        raise DataError(f"--stratify names unknown field {cfg.stratify!r}; the input has: {', '.join(fields)}")
    fmt = detect_format(records) if cfg.format == "auto" else cfg.format
    if cfg.format != "auto":
        have: set[str] = set().union(*(r.data.keys() for r in records))
        lacking = [k for k in REQUIRED[fmt] if k not in have]
        if lacking:
            raise DataError(
                f"--format {fmt} needs field(s) {', '.join(lacking)}; the input has: {', '.join(sorted(have))} (rename with --field-map old=new)"
            )
    kind = {"preference": "preference", "classification": "classification"}.get(fmt, "sft")
    by_label = kind == "classification" and not cfg.stratify  # classification splits keep each label's share
    steps: dict[str, Any] = {"read": len(records)}
    invalid: list[str] = []

    # 1. convert + normalise whitespace; 2. drop empty / invalid
    rows: list[Row] = []
    strata: list[Any] = []
    n_ws = n_empty = 0
    for r in records:
        try:
            row = to_row(fmt, r.data, cfg.system)
        except (ToolSchemaError, LabelError) as e:  # malformed tool calls and labels are fixed, not dropped
            raise DataError(f"{r.loc}: {e}") from None
        except InvalidRow as e:
            invalid.append(f"{r.loc}: {e}")
            continue
        clean = normalise_row(row)
        n_ws += clean != row
        if has_empty_turn(clean):
            n_empty += 1
            continue
        rows.append(clean)
        strata.append(clean["label"] if by_label else r.data.get(cfg.stratify) if cfg.stratify else None)
    steps["whitespace_normalised"] = n_ws
    steps["invalid"] = len(invalid)
    steps["empty"] = n_empty

    # 3. PII scrub
    pii: dict[str, int] = {}
    if cfg.scrub:
        rows, steps["pii_rows_scrubbed"], pii = scrub_rows(rows)
    steps["pii"] = {k: pii.get(k, 0) for k in ("email", "phone", "credit_card", "ip")} if cfg.scrub else "disabled"

    # 4. exact and near duplicates (first occurrence wins)
    kept, kept_strata, n_exact, n_near = dedup_rows(rows, strata, cfg.near_dedup)
    steps["exact_duplicates"] = n_exact
    steps["near_duplicates"] = n_near if cfg.near_dedup else "disabled"

    # 5. token length (chat-template-rendered)
    tok = tokenizer() if callable(tokenizer) and not hasattr(tokenizer, "apply_chat_template") else tokenizer
    if kind != "classification":  # conversations are measured rendered with the chat template
        require_chat_template(tok, getattr(tok, "name_or_path", "") or "the base model")
    lengths = token_lengths(tok, kept, progress=progress) if kept else []
    within, too_short, too_long = length_filter(kept, kept_strata, lengths, cfg.min_tokens, cfg.max_tokens)
    final: list[Row] = []
    final_strata: list[str | None] = []
    final_len: dict[str, int] = {}
    for row, st, n in within:
        row = {"id": exact_key(row)[:16], **row, "request_id": None, "origin": "file"}
        final.append(row)
        final_strata.append(None if st is None else str(st))
        final_len[row["id"]] = n
    steps["too_short"] = too_short
    steps["too_long"] = too_long
    steps["kept"] = len(final)
    if not final:
        first = f"; first invalid: {invalid[0]}" if invalid else ""
        raise DataError(f"no rows left after cleaning ({_steps_line(steps)}{first}); nothing was written")

    # 6. split
    splits = split_rows(final, cfg.split, cfg.seed, list(final_strata) if cfg.stratify or by_label else None)
    card: dict[str, Any] = {
        "format": fmt,
        "kind": kind,
        "steps": steps,
        "invalid_examples": invalid[:20],
        "splits": {s: len(v) for s, v in splits.items()},
        "split_fractions": list(cfg.split),
        "seed": cfg.seed,
        "stratify": "label" if by_label else cfg.stratify,
        "tokens": {s: _length_stats([final_len[r["id"]] for r in v]) for s, v in splits.items()},
        "min_tokens": cfg.min_tokens,
        "max_tokens": cfg.max_tokens,
    }
    if cfg.stratify:
        strat_of = {r["id"]: s for r, s in zip(final, final_strata)}
        card["strata"] = {s: _count(strat_of[r["id"]] for r in v) for s, v in splits.items()}
    if kind == "classification":
        card.update(label_card(splits))
    return kind, splits, card


def label_card(splits: dict[str, list[Row]]) -> dict[str, Any]:
    """The label part of a classification dataset's card: ``label_names`` (sorted, every split's labels: the label
    order of a model trained on it), ``labels`` (count per label in train, 0 included) and ``label_counts`` per split."""
    names = sorted({str(r["label"]) for rows in splits.values() for r in rows})
    counts = {s: _count(r["label"] for r in rows) for s, rows in splits.items()}
    return {
        "label_names": names,
        "labels": {n: counts.get("train", {}).get(n, 0) for n in names},
        "label_counts": counts,
    }


def _count(values: Iterable[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items()))


def _steps_line(steps: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in steps.items() if k != "pii")


def prepare(
    db: Database,
    settings: Settings,
    cfg: PrepareConfig,
    records: list[Record] | None = None,
    source: dict[str, Any] | None = None,
    progress: bool = True,
) -> DatasetRecord:
    """Read ``cfg.inputs`` (or take ``records``), clean, split and register; returns the DatasetRecord."""
    from tuneloop.dataset_store import save_dataset
    from tuneloop.modelcache import resolve_model

    skipped: list[str] = []
    if records is None:
        records, skipped = read_inputs(cfg.inputs, cfg.skip_invalid)
    name = cfg.name or (Path(cfg.inputs[0]).stem if cfg.inputs else "")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name or ""):
        raise DataError(f"dataset name {name!r} must be letters, digits, '.', '_' or '-' (use --name)")
    base_dir = resolve_model(cfg.base, settings.paths.models_path)
    loaded: list[Tokenizer] = []

    def tokenizer() -> Tokenizer:  # loaded (transformers + torch: seconds) only once the input has passed validation
        loaded.append(load_tokenizer(base_dir, chat_template=False))  # prepare_records requires one for chats
        return loaded[0]

    kind, splits, card = prepare_records(records, cfg, tokenizer, progress=progress)
    tok = loaded[0]
    card["steps"] = {
        "read": card["steps"]["read"] + len(skipped),
        "malformed_skipped": len(skipped),
        **{k: v for k, v in card["steps"].items() if k != "read"},
    }
    card["malformed_examples"] = skipped[:20]
    card["tokenizer"] = {
        "base": cfg.base,
        "path": str(base_dir),
        "chat_template_sha256": hashlib.sha256(tok.chat_template.encode()).hexdigest()[:16]
        if tok.chat_template
        else None,
    }
    src = source or {"inputs": [str(Path(p).resolve()) for p in cfg.inputs]}
    src = dict(src, options={k: v for k, v in asdict(cfg).items() if k != "inputs"})
    return save_dataset(db, settings.paths.home_path, name, splits, kind, card, src)


def summary_lines(rec: DatasetRecord) -> list[str]:
    """Human summary of a prepared dataset's card."""
    c = rec.card
    st = c.get("steps", {})
    lines = [f"dataset {rec.id} ({c.get('format')}, {rec.kind}) at {rec.path}"]
    order = [
        "read",
        "malformed_skipped",
        "invalid",
        "empty",
        "whitespace_normalised",
        "pii_rows_scrubbed",
        "exact_duplicates",
        "near_duplicates",
        "too_short",
        "too_long",
        "kept",
    ]
    lines.append("  steps: " + ", ".join(f"{k}={st[k]}" for k in order if k in st))
    if isinstance(st.get("pii"), dict):
        lines.append("  pii scrubbed: " + ", ".join(f"{k}={v}" for k, v in st["pii"].items()))
    else:
        lines.append("  pii scrub: disabled")
    lines.append("  splits: " + ", ".join(f"{k}={v}" for k, v in c.get("splits", {}).items()))
    if c.get("labels"):
        lines.append("  labels (train): " + ", ".join(f"{k}={v}" for k, v in c["labels"].items()))
    tr = c.get("tokens", {}).get("train", {})
    if tr.get("count"):
        lines.append(
            f"  train tokens: min {tr['min']}, p50 {tr['p50']}, p95 {tr['p95']}, max {tr['max']}, total {tr['total']}"
        )
    return lines
