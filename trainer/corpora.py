"""Offline corpora from PyPI packages, as chat rows for the demo and the tests.

Contract
--------
* :func:`chatterbot_pairs` reads ``chatterbot_corpus/data/english/*.yml`` (the
  package is located with ``importlib.util.find_spec`` and never imported) and
  returns one chat row per consecutive (statement, reply) pair:
  ``{"messages": [user, assistant], "topic": <file stem>}`` (2,393 rows for
  chatterbot-corpus 1.3.3).
* :func:`chatterbot_topics` reads the same files as labelled classification
  rows: the opening statement of each conversation (the question) as
  ``{"text": ..., "label": <file stem>}``, optionally only some ``topics``
  (corpus ``chatterbot-topics``: a real labelled set that installs offline).
* :func:`chitchat_prompts` reads ``chitchat_dataset/dataset.json`` and returns
  the first user message of each conversation (a different distribution, used
  as drifting "production traffic").
* :func:`write_jsonl` writes rows as JSONL; :func:`prepare_corpus` turns a named
  corpus into a registered dataset through :func:`tuneloop.trainer.prepare.prepare`
  (chat rows stratified by topic; topic rows a classification dataset,
  stratified by label) and returns its ``DatasetRecord``.
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
    "chatterbot-topics": "chatterbot-corpus==1.3.3",
    "chitchat": "chitchat-dataset==0.9.0",
}
ALIASES = {
    "chatterbot-corpus": "chatterbot",
    "chatterbot_corpus": "chatterbot",
    "chitchat-dataset": "chitchat",
    "chitchat_dataset": "chitchat",
    "chatterbot-corpus-topics": "chatterbot-topics",
}


def corpus_name(name: str) -> str:
    n = ALIASES.get(name, name)
    if n not in CORPORA:
        raise UserError(f"unknown corpus {name!r}; known: chatterbot-corpus, chatterbot-topics, chitchat-dataset")
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


def chatterbot_topics(topics: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The opening statement of every English chatterbot conversation labelled by its topic file:
    ``{"text": question, "label": topic}`` (only ``topics`` when given; an unknown topic is a UserError)."""
    import yaml

    root = _package_dir("chatterbot_corpus", CORPORA["chatterbot"]) / "data" / "english"
    files = {f.stem: f for f in sorted(root.glob("*.yml"))}
    wanted = list(topics) if topics is not None else list(files)
    unknown = [t for t in wanted if t not in files]
    if unknown:
        raise UserError(f"unknown chatterbot topic(s) {', '.join(unknown)}; topics: {', '.join(files)}")
    rows: list[dict[str, Any]] = []
    for t in wanted:
        data = yaml.safe_load(files[t].read_text(encoding="utf-8")) or {}
        for conv in data.get("conversations") or []:
            if conv and conv[0] is not None and str(conv[0]).strip():
                rows.append({"text": str(conv[0]), "label": t})
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
    """Rows of a named corpus: chat rows (chatterbot), ``{"text", "label"}`` rows (chatterbot-topics) or
    ``{"prompt": ...}`` rows (chitchat)."""
    n = corpus_name(name)
    if n == "chatterbot":
        return chatterbot_pairs()
    if n == "chatterbot-topics":
        return chatterbot_topics()
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
    """Prepare a named corpus into a registered dataset; returns the DatasetRecord. ``chatterbot`` gives an SFT
    dataset (split stratified by topic), ``chatterbot-topics`` a classification dataset (stratified by label;
    ``topics=[...]`` keeps only those topic files); chitchat has no answers and is refused.

    ``options`` are :class:`tuneloop.trainer.prepare.PrepareConfig` fields (seed, max_tokens, split ...).
    """
    from tuneloop.trainer.data_io import Record
    from tuneloop.trainer.prepare import PrepareConfig, prepare

    n = corpus_name(corpus)
    if n == "chatterbot-topics":
        topics = options.pop("topics", None)
        cfg = PrepareConfig(name=name or "chatterbot-topics", stratify=options.pop("stratify", None), **options)
        if base is not None:
            cfg.base = str(base)
        records = [Record(f"chatterbot-topics#{i}", r) for i, r in enumerate(chatterbot_topics(topics), 1)]
        source = {"corpus": CORPORA[n], "topics": topics}
        return prepare(db, settings, cfg, records=records, source=source, progress=progress)
    if n != "chatterbot":
        raise UserError(
            f"corpus {corpus!r} holds prompts without answers; only chatterbot-corpus (chat) and chatterbot-topics "
            "(classification) can be prepared for training"
        )
    cfg = PrepareConfig(name=name or "chatterbot", stratify=options.pop("stratify", "topic"), **options)
    if base is not None:
        cfg.base = str(base)
    records = [Record(f"chatterbot-corpus#{i}", r) for i, r in enumerate(chatterbot_pairs(), 1)]
    return prepare(db, settings, cfg, records=records, source={"corpus": CORPORA[n]}, progress=progress)
