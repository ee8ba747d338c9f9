"""Offline corpora from PyPI packages, as chat rows for the demo and the tests.

Contract
--------
* :func:`chatterbot_pairs` reads ``chatterbot_corpus/data/english/*.yml`` (the
  package is located with ``importlib.util.find_spec`` and never imported) and
  returns one chat row per consecutive (statement, reply) pair:
  ``{"messages": [user, assistant], "topic": <file stem>}`` (2,393 rows for
  chatterbot-corpus 1.3.3).
* :func:`chitchat_prompts` reads ``chitchat_dataset/dataset.json`` and returns
  the first user message of each conversation (a different distribution, used
  as drifting "production traffic").
* :func:`write_jsonl` writes rows as JSONL; :func:`prepare_corpus` turns a named
  corpus into a registered dataset through :func:`tuneloop.trainer.prepare.prepare`
  (stratified by topic) and returns its ``DatasetRecord``.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.errors import UserError

if TYPE_CHECKING:
    from tuneloop.db import Database
    from tuneloop.registry import DatasetRecord
    from tuneloop.settings import Settings

CORPORA = {
    "chatterbot": "chatterbot-corpus==1.3.3",
    "chitchat": "chitchat-dataset==0.9.0",
}
ALIASES = {
    "chatterbot-corpus": "chatterbot",
    "chatterbot_corpus": "chatterbot",
    "chitchat-dataset": "chitchat",
    "chitchat_dataset": "chitchat",
}


def corpus_name(name: str) -> str:
    n = ALIASES.get(name, name)
    if n not in CORPORA:
        raise UserError(f"unknown corpus {name!r}; known: chatterbot-corpus, chitchat-dataset")
    return n


def _package_dir(module: str, pip_spec: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise UserError(
            f"this corpus needs the PyPI package {pip_spec.split('==')[0]}: pip install --no-deps {pip_spec}"
        )
    return Path(spec.origin).parent


def chatterbot_pairs() -> list[dict[str, Any]]:
    """Every consecutive (statement, reply) pair of the English chatterbot corpus as a chat row with its topic."""
    import yaml

    root = _package_dir("chatterbot_corpus", CORPORA["chatterbot"]) / "data" / "english"
    rows: list[dict[str, Any]] = []
    for f in sorted(root.glob("*.yml")):
        data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in data.get("conversations") or []:
            texts = [str(t) for t in conv if t is not None]
            for q, a in itertools.pairwise(texts):
                rows.append(
                    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "topic": f.stem}
                )
    if not rows:
        raise UserError(f"no conversations found under {root}")
    return rows


def chitchat_prompts(limit: int | None = None) -> list[str]:
    """First user message of each chitchat-dataset conversation (non-empty, in file order)."""
    path = _package_dir("chitchat_dataset", CORPORA["chitchat"]) / "dataset.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    out: list[str] = []
    for conv in data.values():
        turns = conv.get("messages") or []
        if not turns:
            continue
        text = " ".join(m.get("text", "").strip() for m in turns[0] if m.get("text", "").strip())
        if text:
            out.append(text)
            if limit is not None and len(out) >= limit:
                break
    return out


def corpus_rows(name: str) -> list[dict[str, Any]]:
    """Rows of a named corpus: chat rows (chatterbot) or ``{"prompt": ...}`` rows (chitchat)."""
    n = corpus_name(name)
    if n == "chatterbot":
        return chatterbot_pairs()
    return [{"prompt": p} for p in chitchat_prompts()]


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> int:
    """Write ``rows`` as JSONL (atomically: temp file + rename); returns the row count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


def prepare_corpus(
    db: Database,
    settings: Settings,
    corpus: str,
    name: str | None = None,
    base: str | Path | None = None,
    progress: bool = True,
    **options: Any,
) -> DatasetRecord:
    """Prepare a named corpus (only ``chatterbot`` has answers) into a registered SFT dataset; returns the DatasetRecord.

    ``options`` are :class:`tuneloop.trainer.prepare.PrepareConfig` fields (seed, max_tokens ...); the split is stratified by topic.
    """
    from tuneloop.trainer.data_io import Record
    from tuneloop.trainer.prepare import PrepareConfig, prepare

    n = corpus_name(corpus)
    if n != "chatterbot":
        raise UserError(
            f"corpus {corpus!r} holds prompts without answers; only chatterbot-corpus can be prepared for training"
        )
    cfg = PrepareConfig(name=name or "chatterbot", stratify=options.pop("stratify", "topic"), **options)
    if base is not None:
        cfg.base = str(base)
    records = [Record(f"chatterbot-corpus#{i}", r) for i, r in enumerate(chatterbot_pairs(), 1)]
    return prepare(db, settings, cfg, records=records, source={"corpus": CORPORA[n]}, progress=progress)
