"""How alike a production prompt is to the prompts a model version was trained on (hashed bag of words).

Contract
--------
* :func:`hashed_bow` — L2-normalised hashed bag-of-words vectors (sublinear term frequency) of texts: cheap,
  dependency-free text vectors, the same for every caller.
* :func:`user_text` — the user turns of a prompt (system prompts left out), the text every measure here reads.
* :func:`training_prompts` — the user turns (or a classifier's input texts) of a version's training split,
  read from its recorded dataset; an empty list when the version has no dataset on record.
* :func:`unlikeness` — per text, ``1 - max cosine similarity`` to those training prompts (0: a training prompt
  again; 1: no word in common with any), or None for every text when the version has no training data. The
  feedback sampler's ``drift`` strategy, ``data synthesize --mode targeted`` and the console's ``drifted``
  annotation-queue rule all rank requests by it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

import numpy as np

from tuneloop.db import Database

_TOKEN = re.compile(r"[a-z0-9']+")


def hashed_bow(texts: list[str], dim: int = 1024) -> np.ndarray:
    """L2-normalised hashed bag-of-words vectors (sublinear tf), float32 ``(n, dim)``."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for i, t in enumerate(texts):
        for tok in _TOKEN.findall(t.lower()):
            j = int.from_bytes(hashlib.blake2b(tok.encode(), digest_size=4).digest(), "little") % dim
            out[i, j] += 1.0
    np.log1p(out, out=out)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return out / norms


def user_text(prompt: object) -> str:
    """The user turns of a logged or training prompt (a message list), joined by newlines; a plain prompt
    string as it is. System prompts are left out: they are the same on every request and say nothing about
    what users ask."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n".join(str(m.get("content") or "") for m in prompt if isinstance(m, dict) and m.get("role") == "user")
    return "" if prompt is None else str(prompt)


def training_prompts(db: Database, version: str | None) -> list[str]:
    """The user prompts (chat) or input texts (classification) of ``version``'s training split; [] if unknown."""
    from tuneloop.dataset_store import load_splits
    from tuneloop.registry import find_version

    found = find_version(db, version) if version else None
    if found is None or not found.dataset_id:
        return []
    dd = load_splits(db, found.dataset_id)
    split = dd["train"] if "train" in dd else next(iter(dd.values()))
    texts: list[str] = []
    for row in split:
        if isinstance(row.get("text"), str):  # a classification set: the input text
            texts.append(row["text"])
            continue
        texts.append(user_text(row.get("messages") or row.get("prompt") or []))
    return texts


def unlikeness(reference: list[str], texts: list[str]) -> list[float] | None:
    """Per text: 1 - its best cosine similarity (hashed bag of words) to any ``reference`` text; None when there
    is no reference."""
    if not reference:
        return None
    ref = hashed_bow(reference)
    q = hashed_bow(texts)
    best = np.zeros(len(texts), dtype=np.float32)
    for s in range(0, len(ref), 2048):
        best = np.maximum(best, (q @ ref[s : s + 2048].T).max(axis=1))
    return [float(1.0 - b) for b in best]


_STOP = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "can",
        "do",
        "does",
        "for",
        "from",
        "how",
        "i",
        "in",
        "is",
        "it",
        "me",
        "my",
        "of",
        "on",
        "or",
        "please",
        "the",
        "this",
        "to",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "you",
        "your",
    ]
)


def prompt_clusters(
    texts: list[str],
    reference: list[str],
    k: int = 6,
    seed: int = 0,
    vectors: Callable[[list[str]], np.ndarray] | None = None,
) -> list[dict[str, object]]:
    """Topic clusters of production prompts: k-means (scipy) over ``vectors(texts)`` (sentence embeddings, e.g.
    :class:`tuneloop.monitoring.embeddings.Embedder`; default :func:`hashed_bow`), largest first. Each cluster:
    ``size``, ``share`` of the texts, ``words`` (its most frequent words, stop words left out), ``unlikeness`` (the
    mean :func:`unlikeness` of its prompts to ``reference``, None without one) and up to 3 ``examples``. [] for no
    texts."""
    from collections import Counter

    from scipy.cluster.vq import kmeans2

    texts = [t for t in texts if t.strip()]
    if not texts:
        return []
    k = max(1, min(k, len(set(texts))))
    if k == 1:
        labels = [0] * len(texts)
    else:
        x = np.asarray((vectors or hashed_bow)(texts), dtype=np.float64)
        _, lab = kmeans2(x, k, minit="++", iter=20, rng=np.random.default_rng(seed))
        labels = [int(v) for v in lab]
    scores = unlikeness(reference, texts)
    out: list[dict[str, object]] = []
    for c in sorted(set(labels)):
        idx = [i for i, lab_ in enumerate(labels) if lab_ == c]
        words = Counter(w for i in idx for w in set(_TOKEN.findall(texts[i].lower())) if w not in _STOP)
        out.append(
            {
                "size": len(idx),
                "share": len(idx) / len(texts),
                "words": [w for w, _ in words.most_common(6)],
                "unlikeness": None if scores is None else float(np.mean([scores[i] for i in idx])),
                "examples": [texts[i][:200] for i in idx[:3]],
            }
        )
    out.sort(key=lambda d: -int(d["size"]))  # type: ignore[call-overload]
    return out
