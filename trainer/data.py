"""Data preparation: raw files -> a cleaned, split, versioned and registered dataset.

Contract
--------
* :func:`read_inputs` reads JSONL/JSON, CSV and Hugging Face ``datasets`` folders
  (``save_to_disk``) into :class:`Record` s (source location + dict). A malformed
  JSONL line raises :class:`~tuneloop.errors.UserError` naming ``file:line`` and
  the reason, unless ``skip_invalid`` (then it is skipped and counted).
* :func:`detect_format` names the shape of the records: ``chat``
  (``messages``), ``prompt_completion``, ``alpaca`` (instruction/input/output) or
  ``preference`` (prompt/chosen/rejected). :func:`to_row` converts one record to
  the row schema of :mod:`tuneloop.dataset_store` (SFT or preference).
* :func:`prepare_records` runs the cleaning steps in order — normalise
  whitespace, drop empty/invalid rows, PII scrub, exact and near-duplicate
  removal, token-length filter (chat-template-rendered, base tokenizer),
  deterministic split — and returns ``(splits, card)``; every step is counted in
  the card. :func:`prepare` does all of it and registers the result through
  :func:`tuneloop.dataset_store.save_dataset` (atomic: on any error nothing is
  written and nothing registered).
* Row ids are content hashes of the cleaned conversation, so the same input
  gives the same ids and (same seed) the same split.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
import statistics
import string
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuneloop.errors import UserError

FORMATS = ("auto", "chat", "prompt_completion", "alpaca", "preference")
ROLES = ("system", "user", "assistant")


class DataError(UserError, ValueError):
    """Input data a user can fix (malformed line, unknown field, nothing left ...)."""


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


@dataclass
class Record:
    """One raw input record and where it came from (``file:line``)."""

    loc: str
    data: dict[str, Any]


# ---- reading -----------------------------------------------------------------------------------


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
    out, bad = [], []
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
    from datasets import Dataset, DatasetDict, load_from_disk

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
        out += [Record(f"{p}[{split}]#{i}" if split else f"{p}#{i}", dict(r)) for i, r in enumerate(d, 1)]
    return out


def apply_field_map(records: list[Record], field_map: dict[str, str]) -> None:
    """Rename fields in place; a field named in the map that no record has is an error."""
    if not field_map:
        return
    present = set().union(*(r.data.keys() for r in records)) if records else set()
    missing = [k for k in field_map if k not in present]
    if missing:
        raise DataError(
            f"--field-map names unknown field(s) {', '.join(missing)}; the input has: {', '.join(sorted(present)) or 'no fields'}"
        )
    for r in records:
        r.data = {field_map.get(k, k): v for k, v in r.data.items()}


# ---- formats -----------------------------------------------------------------------------------


def detect_format(records: list[Record]) -> str:
    """The record shape shared by the records (from the first one whose fields say it)."""
    for r in records:
        keys = set(r.data)
        if {"prompt", "chosen", "rejected"} <= keys:
            return "preference"
        if "messages" in keys:
            return "chat"
        if {"instruction", "output"} <= keys:
            return "alpaca"
        if {"prompt", "completion"} <= keys:
            return "prompt_completion"
    fields = sorted(set().union(*(r.data.keys() for r in records))) if records else []
    raise DataError(
        "cannot detect the record format from the fields "
        + (", ".join(fields) or "(none)")
        + ": expected messages (chat), prompt+completion, instruction+output (alpaca) or prompt+chosen+rejected "
        "(preference); rename fields with --field-map old=new or name --format"
    )


REQUIRED = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "preference": ("prompt", "chosen", "rejected"),
}


class InvalidRow(ValueError):
    """A record that parses but is not a usable example (dropped and counted)."""


def _messages(v: Any, what: str, default_role: str) -> list[dict[str, str]]:
    if isinstance(v, str):
        return [{"role": default_role, "content": v}]
    if not isinstance(v, list) or not v:
        raise InvalidRow(f"{what} must be a string or a non-empty list of messages")
    out = []
    for m in v:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise InvalidRow(f"{what}: every message needs a role ({'/'.join(ROLES)}) and a string content")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def to_row(fmt: str, data: dict[str, Any], system: str | None = None) -> dict[str, Any]:
    """One record as a dataset row (without id); raises :class:`InvalidRow`."""
    missing = [k for k in REQUIRED[fmt] if data.get(k) in (None, "")]
    if missing:
        raise InvalidRow(f"missing {', '.join(missing)}")
    if fmt == "preference":
        prompt = _messages(data["prompt"], "prompt", "user")
        chosen = _messages(data["chosen"], "chosen", "assistant")
        rejected = _messages(data["rejected"], "rejected", "assistant")
        if prompt[-1]["role"] != "user":
            raise InvalidRow("the prompt must end with a user message")
        if any(m["role"] != "assistant" for m in chosen + rejected):
            raise InvalidRow("chosen and rejected must be assistant messages")
        return {"prompt": _with_system(prompt, system), "chosen": chosen, "rejected": rejected}
    if fmt == "chat":
        msgs = _messages(data["messages"], "messages", "user")
    elif fmt == "prompt_completion":
        msgs = _messages(data["prompt"], "prompt", "user") + _messages(data["completion"], "completion", "assistant")
    else:  # alpaca
        inp = data.get("input")
        user = str(data["instruction"]) + (f"\n\n{inp}" if isinstance(inp, str) and inp.strip() else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": str(data["output"])}]
        if isinstance(data.get("system"), str) and data["system"].strip():
            msgs.insert(0, {"role": "system", "content": data["system"]})
    if msgs[-1]["role"] != "assistant":
        raise InvalidRow("the last message must be the assistant's answer")
    if not any(m["role"] == "user" for m in msgs):
        raise InvalidRow("no user message")
    return {"messages": _with_system(msgs, system)}


def _with_system(msgs: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    if system and msgs[0]["role"] != "system":
        return [{"role": "system", "content": system}, *msgs]
    return msgs


def _all_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" in row:
        return row["messages"]
    return row["prompt"] + row["chosen"] + row["rejected"]


# ---- cleaning steps ----------------------------------------------------------------------------

_WS = re.compile(r"[ \t\f\v\u00a0\u2000-\u200b\u3000]+")
_NL = re.compile(r"\n{3,}")
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}\u2018\u2019\u201c\u201d\u2026\u2013\u2014]")


def normalise_text(s: str) -> str:
    """Unify line ends, collapse runs of spaces, at most one blank line, strip."""
    s = s.replace("\r\n", "\n").replace("\r", "\n")
    s = "\n".join(_WS.sub(" ", line).strip() for line in s.split("\n"))
    return _NL.sub("\n\n", s).strip()


def near_key(row: dict[str, Any]) -> str:
    """Hash of the conversation lowercased, without punctuation, whitespace collapsed."""
    parts = []
    for m in _all_messages(row):
        t = _PUNCT.sub(" ", m["content"].lower())
        parts.append(m["role"] + ":" + " ".join(t.split()))
    return hashlib.sha256("\x1e".join(parts).encode()).hexdigest()


def exact_key(row: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _map_contents(row: dict[str, Any], fn: Callable[[str], str]) -> dict[str, Any]:
    return {k: [{"role": m["role"], "content": fn(m["content"])} for m in v] for k, v in row.items()}


def load_tokenizer(base_dir: str | Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(base_dir))
    except (OSError, ValueError) as e:
        raise DataError(
            f"cannot load the tokenizer of {base_dir}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    if not tok.chat_template:
        raise DataError(
            f"the tokenizer of {base_dir} has no chat template; pick a chat (instruct) base model with --base"
        )
    return tok


def token_lengths(tok, rows: list[dict[str, Any]], progress: bool = False, batch: int = 256) -> list[int]:
    """Tokens of each row rendered with the chat template (preference: prompt + the longer answer)."""
    from tqdm.auto import tqdm

    convs: list[tuple[int, list[dict[str, str]]]] = []
    for i, r in enumerate(rows):
        if "messages" in r:
            convs.append((i, r["messages"]))
        else:
            convs += [(i, r["prompt"] + r["chosen"]), (i, r["prompt"] + r["rejected"])]
    out = [0] * len(rows)
    bar = tqdm(total=len(convs), desc="tokenize", unit="conv", disable=not progress)
    for s in range(0, len(convs), batch):
        chunk = convs[s : s + batch]
        texts = [tok.apply_chat_template(c, tokenize=False) for _, c in chunk]
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        for (i, _), t in zip(chunk, ids):
            out[i] = max(out[i], len(t))
        bar.update(len(chunk))
    bar.close()
    return out


def split_rows(
    rows: list[dict[str, Any]], fractions: tuple[float, float, float], seed: int, strata: list[Any] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Deterministic split: rows sorted by id, shuffled with ``seed``, cut by fractions (per stratum)."""
    groups: dict[Any, list[int]] = {}
    for i, _ in enumerate(rows):
        groups.setdefault(strata[i] if strata else None, []).append(i)
    out: dict[str, list[dict[str, Any]]] = {"train": [], "validation": [], "test": []}
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


def prepare_records(
    records: list[Record], cfg: PrepareConfig, tokenizer, progress: bool = False
) -> tuple[str, dict[str, list[dict]], dict[str, Any]]:
    """Run every cleaning step on ``records``; returns ``(kind, splits, card)``. Raises DataError when nothing is left.

    ``tokenizer`` is a tokenizer or a zero-argument callable returning one: it is only called once the
    input has been validated and cleaned, so bad input fails fast without loading a model's tokenizer.
    """
    from tuneloop.pii import add_counts, scrub

    if cfg.format not in FORMATS:
        raise DataError(f"--format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    if len(cfg.split) != 3 or any(f < 0 for f in cfg.split) or abs(sum(cfg.split) - 1) > 1e-6 or cfg.split[0] <= 0:
        raise DataError(
            f"split fractions must be three non-negative numbers summing to 1 with train > 0, got {cfg.split}"
        )
    if cfg.min_tokens > cfg.max_tokens:
        raise DataError(f"--min-tokens ({cfg.min_tokens}) is larger than --max-tokens ({cfg.max_tokens})")
    apply_field_map(records, cfg.field_map)
    if not records:
        raise DataError("the input holds no records")
    if cfg.stratify and not any(cfg.stratify in r.data for r in records):
        fields = sorted(set().union(*(r.data.keys() for r in records)))
        raise DataError(f"--stratify names unknown field {cfg.stratify!r}; the input has: {', '.join(fields)}")
    fmt = detect_format(records) if cfg.format == "auto" else cfg.format
    if cfg.format != "auto":
        have = set().union(*(r.data.keys() for r in records))
        lacking = [k for k in REQUIRED[fmt] if k not in have]
        if lacking:
            raise DataError(
                f"--format {fmt} needs field(s) {', '.join(lacking)}; the input has: {', '.join(sorted(have))} (rename with --field-map old=new)"
            )
    kind = "preference" if fmt == "preference" else "sft"
    steps: dict[str, Any] = {"read": len(records)}
    invalid: list[str] = []

    # 1. convert + normalise whitespace; 2. drop empty / invalid
    rows, strata, n_ws, n_empty = [], [], 0, 0
    for r in records:
        try:
            row = to_row(fmt, r.data, cfg.system)
        except InvalidRow as e:
            invalid.append(f"{r.loc}: {e}")
            continue
        clean = _map_contents(row, normalise_text)
        n_ws += clean != row
        if any(not m["content"] for m in _all_messages(clean) if m["role"] != "system"):
            n_empty += 1
            continue
        rows.append(clean)
        strata.append(r.data.get(cfg.stratify) if cfg.stratify else None)
    steps["whitespace_normalised"] = n_ws
    steps["invalid"] = len(invalid)
    steps["empty"] = n_empty

    # 3. PII scrub
    pii: dict[str, int] = {}
    if cfg.scrub:
        rows_scrubbed = 0
        for i, row in enumerate(rows):
            found: dict[str, int] = {}

            def fn(text: str) -> str:
                out, c = scrub(text)
                add_counts(found, c)  # noqa: B023
                return out

            rows[i] = _map_contents(row, fn)
            rows_scrubbed += bool(found)
            add_counts(pii, found)
        steps["pii_rows_scrubbed"] = rows_scrubbed
    steps["pii"] = {k: pii.get(k, 0) for k in ("email", "phone", "credit_card", "ip")} if cfg.scrub else "disabled"

    # 4. exact and near duplicates (first occurrence wins)
    seen_exact, seen_near = set(), set()
    kept, kept_strata, n_exact, n_near = [], [], 0, 0
    for row, st in zip(rows, strata):
        ek = exact_key(row)
        if ek in seen_exact:
            n_exact += 1
            continue
        seen_exact.add(ek)
        if cfg.near_dedup:
            nk = near_key(row)
            if nk in seen_near:
                n_near += 1
                continue
            seen_near.add(nk)
        kept.append(row)
        kept_strata.append(st)
    steps["exact_duplicates"] = n_exact
    steps["near_duplicates"] = n_near if cfg.near_dedup else "disabled"

    # 5. token length (chat-template-rendered)
    if kept and callable(tokenizer) and not hasattr(tokenizer, "apply_chat_template"):
        tokenizer = tokenizer()
    tok = tokenizer() if callable(tokenizer) and not hasattr(tokenizer, "apply_chat_template") else tokenizer
    lengths = token_lengths(tok, kept, progress=progress) if kept else []
    final, final_strata, final_len, too_short, too_long = [], [], {}, 0, 0
    for row, st, n in zip(kept, kept_strata, lengths):
        if n < cfg.min_tokens:
            too_short += 1
            continue
        if n > cfg.max_tokens:
            too_long += 1
            continue
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
    splits = split_rows(final, cfg.split, cfg.seed, final_strata if cfg.stratify else None)
    card: dict[str, Any] = {
        "format": fmt,
        "kind": kind,
        "steps": steps,
        "invalid_examples": invalid[:20],
        "splits": {s: len(v) for s, v in splits.items()},
        "split_fractions": list(cfg.split),
        "seed": cfg.seed,
        "stratify": cfg.stratify,
        "tokens": {s: _length_stats([final_len[r["id"]] for r in v]) for s, v in splits.items()},
        "min_tokens": cfg.min_tokens,
        "max_tokens": cfg.max_tokens,
    }
    if cfg.stratify:
        strat_of = {r["id"]: s for r, s in zip(final, final_strata)}
        card["strata"] = {s: _count(strat_of[r["id"]] for r in v) for s, v in splits.items()}
    return kind, splits, card


def _count(values: Iterable[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items()))


def _steps_line(steps: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in steps.items() if k != "pii")


def prepare(
    db,
    settings,
    cfg: PrepareConfig,
    records: list[Record] | None = None,
    source: dict[str, Any] | None = None,
    progress: bool = True,
):
    """Read ``cfg.inputs`` (or take ``records``), clean, split and register; returns the DatasetRecord."""
    from tuneloop.dataset_store import save_dataset
    from tuneloop.trainer.bootstrap import resolve_base

    skipped: list[str] = []
    if records is None:
        records, skipped = read_inputs(cfg.inputs, cfg.skip_invalid)
    name = cfg.name or (Path(cfg.inputs[0]).stem if cfg.inputs else "")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name or ""):
        raise DataError(f"dataset name {name!r} must be letters, digits, '.', '_' or '-' (use --name)")
    base_dir = resolve_base(cfg.base, settings.paths.models_path)
    loaded: list[Any] = []

    def tokenizer():  # loaded (transformers + torch: seconds) only once the input has passed validation
        loaded.append(load_tokenizer(base_dir))
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
        "chat_template_sha256": hashlib.sha256(tok.chat_template.encode()).hexdigest()[:16],
    }
    src = source or {"inputs": [str(Path(p).resolve()) for p in cfg.inputs]}
    src = dict(src, options={k: v for k, v in asdict(cfg).items() if k != "inputs"})
    return save_dataset(db, settings.paths.home_path, name, splits, kind, card, src)


def summary_lines(rec) -> list[str]:
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
    tr = c.get("tokens", {}).get("train", {})
    if tr.get("count"):
        lines.append(
            f"  train tokens: min {tr['min']}, p50 {tr['p50']}, p95 {tr['p95']}, max {tr['max']}, total {tr['total']}"
        )
    return lines
