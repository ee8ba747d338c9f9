"""Reference profiles: what a model version's training data looks like, for drift.

Contract
--------
* :func:`build_profile` profiles training rows (SFT ``messages`` or preference
  ``prompt``/``chosen``, the row schema of :mod:`tuneloop.dataset_store`) with the *serving* tokenizer: prompt length
  = tokens of ``render_prompt(messages[:-1], tools)`` (chat template + the row's
  tool definitions + generation prompt, the count the server logs in
  ``requests.prompt_tokens``), response
  length = answer tokens + EOS (what the engine generates when it stops), word
  counts of the prompt text (top ``vocab_size`` words kept; the rest count as
  out-of-vocabulary), the expected out-of-vocabulary share of new text from the
  same distribution (mass outside the kept vocabulary + the Good-Turing
  estimate N1/N of unseen words), finish-reason mix, empty-answer share and an
  optional embedding sample.
* :func:`compute_profile` ``(db, version_name, settings=None) -> Profile``
  profiles a registered version's dataset (train split) with its base model's
  tokenizer and stores it in ``reference_profiles`` (replacing an older one).
  The trainer calls it after registering a version; ``tuneloop drift profile
  VERSION`` calls it on demand. A version without a dataset is a UserError.
* :func:`load_profile` reads a stored one back (``None`` when absent).
* Storage, both backends: :func:`store_profile` replaces a version's row in
  one ``db.connect()`` transaction (DELETE + INSERT, portable SQL; a reader
  sees the old profile or the new one, never none). The profile dict is a JSON
  column; the embedding sample is float32 row-major bytes in a ``BLOB``
  (DuckDB) / ``BYTEA`` (PostgreSQL) column with its width in
  ``embedding_dim``, and reads back bit for bit on either.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tuneloop.chat import Tokenizer, completion_ids, render_prompt
from tuneloop.dataset_store import good_chat, row_tools
from tuneloop.db import Database, dumps, loads
from tuneloop.errors import UserError
from tuneloop.monitoring.drift import prompt_text, words
from tuneloop.store_monitoring import profile_row, replace_profile

if TYPE_CHECKING:
    from tuneloop.settings import DriftSettings


@dataclass
class Profile:
    model_version: str
    dataset_id: str | None
    profile: dict[str, Any]
    embeddings: np.ndarray | None = None


def _value_counts(values: Iterable[int]) -> list[list[int]]:
    return [[int(k), int(v)] for k, v in sorted(Counter(values).items())]


def build_profile(
    rows: Iterable[dict[str, Any]],
    tokenizer: Tokenizer,
    vocab_size: int = 10000,
    embedder: Callable[[list[str]], np.ndarray] | None = None,
    embedding_sample: int = 256,
    seed: int = 0,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """(profile dict, embedding sample or None) of training rows; see module doc."""
    prompt_lens, resp_lens, texts = [], [], []
    wc: Counter[str] = Counter()
    empty = n = 0
    for row in rows:
        chat = good_chat(row)  # None: a KTO row labelled undesirable is not what this version learned
        if chat is None or not chat[0]:
            continue
        prompt, answer = chat
        n += 1
        prompt_lens.append(len(render_prompt(tokenizer, prompt, row_tools(row))))
        resp_lens.append(len(completion_ids(tokenizer, answer)))
        empty += not answer.strip()
        t = prompt_text(prompt)
        texts.append(t)
        wc.update(words(t))
    if n == 0:
        raise UserError("no usable rows to profile (every row lacks a prompt)")
    total = sum(wc.values())
    top = wc.most_common(vocab_size)
    kept = sum(c for _, c in top)
    hapax_kept = sum(1 for _, c in top if c == 1)
    profile = {
        "n_rows": n,
        "prompt_length": _value_counts(prompt_lens),
        "response_length": _value_counts(resp_lens),
        "vocab": [w for w, _ in top],
        "vocab_counts": [c for _, c in top],
        "total_tokens": total,
        "oov_tokens": total - kept,
        "oov_expected": ((total - kept) + hapax_kept) / total if total else 0.0,
        "finish_mix": {"stop": n},  # training answers end with EOS
        "empty_share": empty / n,
        "tokenizer": getattr(tokenizer, "name_or_path", None),
    }
    profile["js_null"] = js_null(texts, vocab_size, np.random.default_rng(seed))
    emb = None
    if embedder is not None and texts:
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(texts), size=min(embedding_sample, len(texts)), replace=False)
        emb = np.asarray(embedder([texts[i] for i in sorted(pick)]), dtype=np.float32)
        profile["embedding_sample"] = len(emb)
    return profile, emb


JS_NULL_TOKENS = (100, 250, 500, 1000, 2500, 5000, 10000, 50000)


def js_null(
    texts: list[str], vocab_size: int, rng: np.random.Generator, draws: int = 50, q: float = 0.99, splits: int = 4
) -> list[list[float]]:
    """Vocabulary JS of same-distribution windows: ``[[tokens, q99 JS], ...]``.

    Words cluster by prompt, so token-level multinomial noise understates how much a window of
    real prompts moves the unigram distribution. This splits the rows 80/20, draws windows of
    whole prompts (with replacement) from the 20% and measures their JS against the 80%'s
    smoothed distribution, at several window sizes; drift compares a window against the
    ``q`` quantile at its size.
    """
    from tuneloop.monitoring.drift_stats import js_divergence

    if len(texts) < 20:
        return []
    vals: dict[int, list[float]] = {n: [] for n in JS_NULL_TOKENS}
    for _ in range(splits):  # several random splits, so one lucky split does not set the bar
        perm = rng.permutation(len(texts))
        cut = int(len(texts) * 0.8)
        a_words = [words(texts[i]) for i in perm[:cut]]
        b_words = [words(texts[i]) for i in perm[cut:]]
        wc: Counter[str] = Counter(w for ws in a_words for w in ws)
        top = wc.most_common(vocab_size)
        index = {w: i for i, (w, _) in enumerate(top)}
        total = sum(wc.values())
        kept = np.array([c for _, c in top], dtype=float)
        exp_oov = ((total - kept.sum()) + float(np.sum(kept == 1))) / total
        ref = np.append(kept / kept.sum() * (1 - exp_oov), exp_oov)
        oov = len(index)
        rows = [np.bincount([index.get(w, oov) for w in ws], minlength=oov + 1) for ws in b_words if ws]
        if not rows:
            return []
        mat = np.vstack(rows).astype(float)
        mean_tokens = mat.sum() / len(mat)
        for n_tok in JS_NULL_TOKENS:
            k = max(1, round(n_tok / mean_tokens))
            vals[n_tok] += [
                js_divergence(ref, np.bincount(rng.integers(0, len(mat), k), minlength=len(mat)) @ mat)
                for _ in range(draws)
            ]
    return [[float(n), float(np.quantile(v, q))] for n, v in vals.items()]


def store_profile(db: Database, p: Profile) -> None:
    """Store ``p`` in ``reference_profiles``, replacing the version's older one (see module doc)."""
    emb = p.embeddings
    replace_profile(
        db,
        p.model_version,
        p.dataset_id,
        dumps(p.profile),
        None if emb is None else np.ascontiguousarray(emb, dtype=np.float32).tobytes(),
        None if emb is None else int(emb.shape[1]),
    )


def load_profile(db: Database, version: str, con: Any | None = None) -> Profile | None:
    """The stored profile of ``version`` (``None`` when absent), read from ``db`` or from ``con`` (a connection of
    either backend, or a DuckDB connection a :class:`monitoring.sources.LogSource` copied the table onto)."""
    row = profile_row(db, version, con)
    if row is None:
        return None
    ds, prof, blob, dim = row
    emb = np.frombuffer(bytes(blob), dtype=np.float32).reshape(-1, dim) if blob is not None and dim else None
    return Profile(version, ds, loads(prof), emb)


def compute_profile(
    db: Database,
    version_name: str,
    settings: DriftSettings | None = None,
    embedder: Callable[[list[str]], np.ndarray] | None = None,
    progress: bool = False,
) -> Profile:
    """Profile ``version_name``'s training data with its serving tokenizer and store it (see module doc)."""
    from transformers import AutoTokenizer

    from tuneloop.dataset_store import load_splits
    from tuneloop.registry import get_version
    from tuneloop.settings import DriftSettings

    ds = settings or DriftSettings()
    v = get_version(db, version_name)
    if not v.dataset_id:
        raise UserError(
            f"version {version_name!r} has no training dataset to profile; drift needs one "
            "(versions registered by `tuneloop train` have one)"
        )
    splits = load_splits(db, v.dataset_id)
    rows = splits["train"]
    try:
        tok = AutoTokenizer.from_pretrained(v.base_model)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the serving tokenizer of {version_name!r} from {v.base_model}: {e}") from None
    if progress:
        from tqdm import tqdm

        rows = tqdm(rows, desc=f"profiling {version_name}", unit="row")
    if embedder is None and ds.embeddings:
        from tuneloop.monitoring.embeddings import Embedder

        embedder = Embedder()
    prof, emb = build_profile(rows, tok, ds.vocab_size, embedder if ds.embeddings else None, ds.embedding_sample)
    prof["base_model"] = v.base_model
    p = Profile(version_name, v.dataset_id, prof, emb)
    store_profile(db, p)
    return p
