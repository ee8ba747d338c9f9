"""Versioned training datasets on disk, registered in the database.

Contract
--------
* :func:`save_dataset` writes ``<home>/datasets/<name>-<hash12>/`` holding
  ``data/`` (a ``datasets.DatasetDict`` saved with ``save_to_disk``, splits
  ``train``/``validation``/``test``, each possibly empty) and ``card.json``,
  atomically (temporary folder + rename: a crash leaves no half dataset). The
  id is ``<name>@<hash12>`` where the hash is sha256 over the canonical JSON
  of the rows per split, so the same rows give the same id (idempotent). It
  registers the dataset in ``datasets`` and one ``dataset_rows`` row per row
  (row id, split, request id, origin) in one transaction, on either backend
  (:mod:`tuneloop.db`): the registration is ``INSERT ... ON CONFLICT (id) DO
  NOTHING``, so saving the same rows again — or from two processes at once on a
  shared PostgreSQL — registers them once and returns the one record; the rows
  go in as an Arrow scan on DuckDB and by ``COPY`` on PostgreSQL, with the same
  result.
* Row schema — SFT: ``{"id", "messages": [{"role","content"}...], "request_id", "origin"}``, plus an
  optional ``check`` (a :mod:`tuneloop.checks` rule as JSON) that evaluation scores as task success, and an
  optional ``provenance`` (JSON text: how a generated row was made, ``tuneloop data synthesize``);
  preference (DPO): ``{"id", "prompt": [...], "chosen": [...], "rejected": [...], "request_id", "origin"}``;
  kto (TRL's unpaired preference format): ``{"id", "prompt": [...], "completion": [one assistant message],
  "label": bool, "request_id", "origin"}``, ``label`` saying whether the completion is desirable;
  classification: ``{"id", "text", "label": str (the class name, non-empty), "request_id", "origin"}``
  (its card lists ``label_names``, the sorted label order of a model trained on it, and ``labels``,
  the count per label in train).
  :data:`KINDS` lists the kinds; :func:`kind_of_columns` names a dataset's kind from its columns.
* **Synthetic rows are training rows only**: a row whose ``origin`` is ``synthetic`` in a validation or
  test split is refused (:class:`~tuneloop.errors.UserError`), whoever writes it, so no evaluation,
  gate or canary ever measures a model on generated data.
* Tool calling (rows of any kind): a message may also carry ``name``, ``tool_calls`` (OpenAI shape,
  ``[{"id", "type", "function": {"name", "arguments": JSON text}}]``; content may then be null) and
  ``tool_call_id`` (role ``tool``), and a row may carry ``tools``, the OpenAI function definitions its
  prompt was rendered with, stored as **JSON text** (a list of arbitrary JSON schemas has no fixed Arrow
  type; TRL's DPO/KTO trainers read such a column the same way). Datasets whose rows use none of this
  have exactly the columns and message fields above; otherwise every message has the extra fields
  (null where unset) and rows without tools have ``tools`` null. :func:`chat_message` gives a stored
  message back without the null fields, :func:`row_tools` a row's definitions as a list (None when none).
* :func:`dataset_id` is the id :func:`save_dataset` will give the rows, so a caller can name
  a dataset in another's card before writing either.
* :func:`load_splits` loads a DatasetDict from a registered id/name or a path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.db import Database, dumps, utcnow
from tuneloop.errors import UserError
from tuneloop.registry import DatasetRecord, get_dataset
from tuneloop.staging import staged_folder

if TYPE_CHECKING:
    from datasets import DatasetDict, Features

SPLITS = ("train", "validation", "test")
KINDS = ("sft", "preference", "kto", "classification")
_KEYS = {
    "sft": ("id", "messages", "request_id", "origin"),
    "preference": ("id", "prompt", "chosen", "rejected", "request_id", "origin"),
    "kto": ("id", "prompt", "completion", "label", "request_id", "origin"),
    "classification": ("id", "text", "label", "request_id", "origin"),
}


def kind_of_columns(columns: Iterable[str]) -> str | None:
    """``preference`` (prompt/chosen/rejected), ``kto`` (prompt/completion/label), ``sft`` (messages),
    ``classification`` (text/label) or None."""
    cols = set(columns)
    if {"prompt", "chosen", "rejected"} <= cols:
        return "preference"
    if {"prompt", "completion", "label"} <= cols:
        return "kto"
    if "messages" in cols:
        return "sft"
    if {"text", "label"} <= cols:
        return "classification"
    return None


_EXTRA_KEYS = ("name", "tool_calls", "tool_call_id")  # optional message fields (OpenAI tool calling)


def chat_message(m: dict[str, Any]) -> dict[str, Any]:
    """``m`` in the row schema: role and content, plus ``name`` / ``tool_calls`` / ``tool_call_id`` when set
    (a loaded dataset has them null on every other message); tool-call ``arguments`` as JSON text."""
    out: dict[str, Any] = {"role": m["role"], "content": m.get("content")}
    for k in _EXTRA_KEYS:
        v = m.get(k)
        if v is None or (k == "tool_calls" and not v):
            continue
        out[k] = [_tool_call(c) for c in v] if k == "tool_calls" else str(v)
    return out


def _tool_call(c: dict[str, Any]) -> dict[str, Any]:
    fn = c.get("function") or {}
    args = fn.get("arguments")
    if args is not None and not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return {
        "id": None if c.get("id") is None else str(c["id"]),
        "type": str(c.get("type") or "function"),
        "function": {"name": None if fn.get("name") is None else str(fn["name"]), "arguments": args},
    }


def row_tools(row: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The tool definitions of a row (its ``tools``: JSON text or a list), None when it has none."""
    tools = row.get("tools")
    if isinstance(tools, str):
        tools = json.loads(tools) if tools.strip() else None
    return list(tools) if tools else None


def good_chat(row: dict[str, Any]) -> tuple[list[dict[str, str]], str] | None:
    """(prompt messages, the answer to learn) of a row of any kind; None for a KTO row labelled undesirable.

    SFT: the messages up to the last assistant turn and that turn ('' when the chat ends with the user);
    preference: prompt and chosen; kto: prompt and completion when ``label`` is true. Evaluation, retention
    sets and drift reference profiles read rows through this, so every kind means the same there. Messages
    are as :func:`chat_message` gives them (tool calls kept); the row's tools are :func:`row_tools`.
    """
    if row.get("messages"):
        msgs = [chat_message(m) for m in row["messages"]]
        if msgs[-1]["role"] == "assistant":
            return msgs[:-1], msgs[-1]["content"] or ""
        return msgs, ""
    if row.get("prompt") is None:
        raise UserError(f"dataset row {row.get('id', '?')!r} has neither messages nor prompt")
    prompt = [chat_message(m) for m in row["prompt"]]
    if "label" in row and "completion" in row:
        if not row["label"]:
            return None
        answer = row["completion"] or [{}]
    else:
        answer = row.get("chosen") or [{}]
    return prompt, (answer[-1] or {}).get("content") or ""


def content_hash(splits: dict[str, list[dict]]) -> str:
    h = hashlib.sha256()
    for split in SPLITS:
        h.update(split.encode() + b"\0")
        for row in splits.get(split, []):
            h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n")
    return h.hexdigest()


_MESSAGE_COLUMNS = ("messages", "prompt", "chosen", "rejected", "completion")


def _features(kind: str, extra_keys: bool = False) -> Features:
    """The columns of ``kind``; ``extra_keys``: messages also have name / tool_calls / tool_call_id."""
    from datasets import Features, Value

    fields: dict[str, Any] = {"role": Value("string"), "content": Value("string")}
    if extra_keys:
        fn = {"name": Value("string"), "arguments": Value("string")}
        call = {"id": Value("string"), "type": Value("string"), "function": fn}
        fields.update(name=Value("string"), tool_calls=[call], tool_call_id=Value("string"))
    msg = [fields]
    types: dict[str, Any] = {"id": Value("string"), "request_id": Value("string"), "origin": Value("string")}
    types.update(messages=msg, prompt=msg, chosen=msg, rejected=msg, completion=msg, label=Value("bool"))
    if kind == "classification":
        types.update(text=Value("string"), label=Value("string"))
    return Features({k: types[k] for k in _KEYS[kind]})


def _normalise(kind: str, row: dict[str, Any]) -> dict[str, Any]:
    keys = _KEYS[kind]
    missing = [k for k in keys if k not in ("request_id", "origin") and k not in row]
    if missing:
        raise UserError(f"dataset row {row.get('id', '?')!r} lacks {', '.join(missing)} (kind {kind})")
    out = {k: row.get(k) for k in keys}
    for k in _MESSAGE_COLUMNS:
        msgs = out.get(k)
        if isinstance(msgs, list):
            out[k] = [chat_message(m) if isinstance(m, dict) and "role" in m else m for m in msgs]
    tools = row_tools(row)
    if tools:  # JSON text, key order kept: templates print the definitions as given
        out["tools"] = json.dumps(tools, ensure_ascii=False)
    if kind == "sft" and row.get("provenance"):  # how a synthetic row was made, as JSON text
        prov = row["provenance"]
        out["provenance"] = prov if isinstance(prov, str) else json.dumps(prov, sort_keys=True)
    if kind == "sft" and row.get("check"):  # a checkable rule for task success (tuneloop.checks), as JSON
        chk = row["check"]
        out["check"] = chk if isinstance(chk, str) else json.dumps(chk, sort_keys=True)
    out["origin"] = out["origin"] or "file"
    out["id"] = str(out["id"])
    if kind == "kto" and not isinstance(out["label"], bool):
        raise UserError(f"dataset row {out['id']!r}: label must be true or false, got {out['label']!r}")
    if kind == "classification" and (not isinstance(out["label"], str) or not out["label"].strip()):
        raise UserError(f"dataset row {out['id']!r}: label must be a non-empty class name, got {out['label']!r}")
    return out


def _rows(kind: str, splits: dict[str, list[dict]]) -> dict[str, list[dict[str, Any]]]:
    """The rows of each split in the row schema of ``kind`` (raises UserError on a bad kind, split or row)."""
    if kind not in KINDS:
        raise UserError(f"dataset kind must be one of {KINDS}, got {kind!r}")
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise UserError(f"unknown split(s) {sorted(unknown)}; splits are {SPLITS}")
    out = {s: [_normalise(kind, r) for r in splits.get(s, [])] for s in SPLITS}
    for s in SPLITS:
        if s != "train" and any(r["origin"] == "synthetic" for r in out[s]):
            raise UserError(f"synthetic rows are training data only; the {s} split has some (module doc)")
    return out


def dataset_id(name: str, splits: dict[str, list[dict]], kind: str) -> str:
    """The id (``<name>@<hash12>``) :func:`save_dataset` gives these rows, computed without writing anything."""
    return f"{name}@{content_hash(_rows(kind, splits))[:12]}"


def save_dataset(
    db: Database,
    home: str | os.PathLike,
    name: str,
    splits: dict[str, list[dict]],
    kind: str,
    card: dict[str, Any],
    source: dict[str, Any],
    parent_ids: Iterable[str] = (),
) -> DatasetRecord:
    """Write, hash and register a dataset (see module doc). Raises UserError if it has no training rows."""
    from datasets import Dataset, DatasetDict

    rows = _rows(kind, splits)
    if not rows["train"]:
        raise UserError(f"dataset {name!r} has no training rows")
    digest = content_hash(rows)
    ds_id = f"{name}@{digest[:12]}"
    root = Path(home) / "datasets"
    root.mkdir(parents=True, exist_ok=True)
    dest = root / f"{name}-{digest[:12]}"
    card = dict(card, id=ds_id, name=name, kind=kind, content_hash=digest, rows={s: len(rows[s]) for s in SPLITS})
    if not (dest / "card.json").is_file():
        with staged_folder(dest) as tmp:
            every = [r for split in rows.values() for r in split]
            extra = any(len(m) > 2 for r in every for k in _MESSAGE_COLUMNS if isinstance(r.get(k), list) for m in r[k])
            feats = _features(kind, extra)
            from datasets import Value

            if any("check" in r for r in every):
                feats["check"] = Value("string")
            if any("tools" in r for r in every):
                feats["tools"] = Value("string")
            if any("provenance" in r for r in every):
                feats["provenance"] = Value("string")
            dd = DatasetDict(
                {s: Dataset.from_dict({k: [r.get(k) for r in rows[s]] for k in feats}, features=feats) for s in SPLITS}
            )
            # one shard per split: datasets 5.x cannot reload an empty split saved with the default sharding
            with _quiet_datasets():  # per-split "Saving the dataset" bars are noise next to the callers' own
                dd.save_to_disk(str(tmp / "data"), num_shards=dict.fromkeys(SPLITS, 1))
            (tmp / "card.json").write_text(json.dumps(card, indent=2, default=str))
    rec = DatasetRecord(
        id=ds_id,
        name=name,
        content_hash=digest,
        kind=kind,
        path=str(dest),
        rows_train=len(rows["train"]),
        rows_validation=len(rows["validation"]),
        rows_test=len(rows["test"]),
        source=source,
        card=card,
        parent_ids=list(parent_ids),
        created_at=utcnow(),
    )
    with db.connect() as con:
        # ON CONFLICT, not "look, then insert": two processes saving the same rows at once on a shared
        # PostgreSQL register it once; the loser's INSERT returns no row and it reads the winner's record
        inserted = con.execute(
            "INSERT INTO datasets (id, name, content_hash, kind, path, source, card, rows_train, rows_validation, rows_test, parent_ids, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING RETURNING id",
            [
                rec.id,
                rec.name,
                rec.content_hash,
                rec.kind,
                rec.path,
                dumps(rec.source),
                dumps(rec.card),
                rec.rows_train,
                rec.rows_validation,
                rec.rows_test,
                dumps(rec.parent_ids),
                rec.created_at,
            ],
        ).fetchall()
        if not inserted:
            return get_dataset(db, ds_id, con=con)
        _insert_rows(db, con, ds_id, rows)
    return rec


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _insert_rows(db: Database, con: Any, ds_id: str, rows: dict[str, list[dict]]) -> None:
    """One ``dataset_rows`` row per dataset row, in ``con``'s transaction: DuckDB reads them from an Arrow table
    registered on the connection, PostgreSQL takes them by ``COPY`` (no Arrow scan on its side)."""
    cols = ("dataset_id", "row_id", "split", "request_id", "origin")
    values = [(ds_id, r["id"], s, _str_or_none(r.get("request_id")), r.get("origin")) for s in SPLITS for r in rows[s]]
    if db.backend == "postgres":
        con.copy_rows("dataset_rows", cols, values)
        return
    import pyarrow as pa

    table = pa.table({c: pa.array([v[k] for v in values], pa.string()) for k, c in enumerate(cols)})
    con.register("_tl_rows", table)
    try:
        con.execute(f"INSERT INTO dataset_rows ({', '.join(cols)}) SELECT {', '.join(cols)} FROM _tl_rows")
    finally:
        con.unregister("_tl_rows")


def _str_or_none(v: Any) -> str | None:
    return None if v is None else str(v)


def row_origins(db: Database, ds_id: str) -> list[dict[str, Any]]:
    """Rows of dataset ``ds_id`` per split and origin: ``[{"split", "origin", "rows"}]`` (lineage rows)."""
    rows = db.query(
        "SELECT split, origin, count(*) AS n FROM dataset_rows WHERE dataset_id = ?"
        " GROUP BY split, origin ORDER BY split, origin",
        [ds_id],
    )
    return [{"split": o["split"], "origin": o["origin"], "rows": o["n"]} for o in rows]


def dataset_dir(db: Database | None, ref: str | os.PathLike) -> Path:
    """Folder of a dataset given its id/name (registry) or a path."""
    p = Path(ref)
    if (p / "data").is_dir():
        return p
    if p.name == "data" and p.is_dir():
        return p.parent
    if db is None:
        raise UserError(f"{ref} is not a dataset folder")
    return Path(get_dataset(db, str(ref)).path)


def load_splits(db: Database | None, ref: str | os.PathLike) -> DatasetDict:
    """The ``datasets.DatasetDict`` of a registered dataset (id, name) or of a dataset folder."""
    data = dataset_dir(db, ref) / "data"  # an unknown dataset is refused before `datasets` is imported (~0.5 s)
    from datasets import DatasetDict, load_from_disk

    dd = load_from_disk(str(data))
    if not isinstance(dd, DatasetDict):
        raise UserError(f"{data} holds a single dataset, not the train/validation/test splits of a tuneloop dataset")
    return dd


def load_card(db: Database | None, ref: str | os.PathLike) -> dict[str, Any]:
    return json.loads((dataset_dir(db, ref) / "card.json").read_text())
