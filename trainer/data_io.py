"""Reading raw training examples: files and folders -> :class:`Record` s.

Contract
--------
* :func:`read_inputs` reads JSONL (any other suffix), ``.json`` (a list of
  objects, a mapping holding one, or a single chat object), ``.csv`` (a header
  row; cells holding a JSON list, e.g. ``messages``, are decoded) and Hugging
  Face ``datasets`` folders written with ``save_to_disk`` (every split; a
  ``ClassLabel`` column is read as its class names, -1 as no label). It
  returns the records in input order, each with its source location
  (``file:line``, ``file:#n`` or ``folder[split]#n``), and the locations of
  skipped malformed lines.
* A malformed JSONL line (invalid JSON, not an object) raises
  :class:`DataError` naming ``file:line`` and the reason, unless
  ``skip_invalid`` (then it is skipped and reported). Non-UTF-8 text, malformed
  CSV, a missing path or no input at all raise :class:`DataError`.
* Records are returned as read: no field is renamed or validated here
  (:mod:`tuneloop.trainer.data_formats` does that).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloop.errors import UserError


class DataError(UserError, ValueError):
    """Input data a user can fix (malformed line, unknown field, nothing left ...)."""


@dataclass
class Record:
    """One raw input record and where it came from (``file:line``)."""

    loc: str
    data: dict[str, Any]


def read_inputs(paths: Iterable[str | Path], skip_invalid: bool = False) -> tuple[list[Record], list[str]]:
    """All records of ``paths`` and the locations of skipped malformed lines."""
    records: list[Record] = []
    skipped: list[str] = []
    paths = list(paths)
    if not paths:
        raise DataError("no input given: name one or more files (JSONL, JSON, CSV) or a datasets folder")
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"{p}: no such file or folder")
        if p.is_dir():
            records += _read_hf(p)
        elif p.suffix.lower() == ".csv":
            records += _read_csv(p)
        elif p.suffix.lower() == ".json":
            records += _read_json(p)
        else:
            recs, bad = _read_jsonl(p, skip_invalid)
            records += recs
            skipped += bad
    return records, skipped


def _read_jsonl(p: Path, skip_invalid: bool) -> tuple[list[Record], list[str]]:
    out: list[Record] = []
    bad: list[str] = []
    with p.open(encoding="utf-8-sig", errors="strict") as f:
        try:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                loc = f"{p}:{i}"
                try:
                    obj = json.loads(line)
                    if not isinstance(obj, dict):
                        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                except ValueError as e:
                    reason = (
                        f"invalid JSON ({e.msg} at column {e.colno})" if isinstance(e, json.JSONDecodeError) else str(e)
                    )
                    if not skip_invalid:
                        raise DataError(f"{loc}: {reason} (use --skip-invalid to skip such lines)") from None
                    bad.append(f"{loc}: {reason}")
                    continue
                out.append(Record(loc, obj))
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text ({e.reason})") from None
    return out, bad


def _read_json(p: Path) -> list[Record]:
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: not valid JSON ({e})") from None
    if isinstance(obj, dict):
        obj = next((v for v in obj.values() if isinstance(v, list)), [obj]) if "messages" not in obj else [obj]
    if not isinstance(obj, list) or not all(isinstance(o, dict) for o in obj):
        raise DataError(f"{p}: expected a JSON list of objects")
    return [Record(f"{p}:#{i}", o) for i, o in enumerate(obj, 1)]


def _read_csv(p: Path) -> list[Record]:
    try:
        return _read_csv_rows(p)
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text ({e.reason})") from None
    except csv.Error as e:
        raise DataError(f"{p}: malformed CSV ({e})") from None


def _read_csv_rows(p: Path) -> list[Record]:
    with p.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise DataError(f"{p}: empty CSV (no header row)")
        out = []
        for i, row in enumerate(reader, 2):
            if None in row:
                raise DataError(f"{p}:{i}: more values than header columns")
            out.append(Record(f"{p}:{i}", {k: _maybe_json(v) for k, v in row.items()}))
    return out


def _maybe_json(v: Any) -> Any:
    """CSV cells holding JSON lists (messages) are decoded; everything else stays text."""
    if isinstance(v, str) and v.lstrip().startswith("["):
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def _read_hf(p: Path) -> list[Record]:
    from datasets import ClassLabel, Dataset, DatasetDict, load_from_disk

    try:
        ds = load_from_disk(
            str(p / "data") if (p / "data").is_dir() and not (p / "dataset_dict.json").exists() else str(p)
        )
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{p}: not a Hugging Face datasets folder saved with save_to_disk ({e})") from None
    parts = ds.items() if isinstance(ds, DatasetDict) else [("", ds)]
    out = []
    for split, d in parts:
        assert isinstance(d, Dataset)
        names = {c: f for c, f in d.features.items() if isinstance(f, ClassLabel)}
        for i, r in enumerate(d, 1):
            row = dict(r)
            for c, f in names.items():  # a ClassLabel column holds ints: give its class names (-1 = no label)
                if isinstance(row.get(c), int):
                    row[c] = f.int2str(row[c]) if row[c] >= 0 else None
            out.append(Record(f"{p}[{split}]#{i}" if split else f"{p}#{i}", row))
    return out
