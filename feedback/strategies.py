"""Sampling strategies: which candidates become training rows, and how many each strategy picks.

Contract
--------
* :data:`STRATEGIES` is the fixed application order: ``feedback`` (corrections
  first, then positive ratings — thumbs-up responses become SFT answers this way;
  an uncorrected thumbs-down never reaches a picker, see
  :mod:`tuneloop.feedback.candidates`; for classify traffic: labels given first, then
  confirmed predictions), ``low-confidence`` (classify traffic only: the lowest
  confidence, i.e. largest class probability, first — the examples the classifier
  is least sure of), ``drift`` (weighted towards requests far from the
  serving version's training data, by nearest-neighbour cosine distance of hashed
  bag-of-words vectors), ``stratified`` (balanced, hierarchically: model versions
  alternate, within a version length terciles alternate, within those topic
  clusters — topics by k-means on hashed bag-of-words; for classify traffic, within a
  version the classes to train on alternate, then length terciles), ``random``.
* :func:`parse_strategies` turns ``NAME[=SHARE]`` items into shares that add up
  to 1; :func:`allocate` turns shares into row quotas (largest remainder).
* :func:`prepare` computes what the chosen strategies need (strata, drift
  scores); :func:`pick` runs them in order, each picking from what the previous
  ones left, and a strategy that cannot fill its quota passes the rest on.
  ``drift`` (a classifier's training rows count by their ``text``) looks up each version's training set with one
  portable SELECT on
  ``model_versions`` and reads the set from disk, so it scores the same on a
  DuckDB file and on PostgreSQL.

Every choice is seeded, so the same candidates and seed give the same picks.
Bad input raises :class:`SampleError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tuneloop.db import Database
from tuneloop.errors import UserError
from tuneloop.feedback.candidates import Candidate
from tuneloop.monitoring.likeness import hashed_bow, training_prompts, unlikeness

STRATEGIES = ("feedback", "low-confidence", "drift", "stratified", "random")  # application order
#: strategies that only classify traffic supports (they read the logged class probabilities)
CLASSIFY_ONLY = ("low-confidence",)


class SampleError(UserError, ValueError):
    """A sampling request a user can fix (bad window, unknown strategy, nothing to sample ...)."""


def parse_strategies(items: list[str] | None) -> dict[str, float]:
    """``["feedback=0.6", "random"]`` -> shares normalised to 1 (a bare name takes an equal share)."""
    if not items:
        return {"feedback": 0.5, "stratified": 0.5}
    raw: dict[str, float | None] = {}
    for item in items:
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            name, _, share = part.partition("=")
            name = name.strip()
            if name not in STRATEGIES:
                raise SampleError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
            try:
                value = float(share) if share else None
            except ValueError:
                raise SampleError(f"strategy {name}: share must be a number, got {share!r}") from None
            if value is not None and value < 0:
                raise SampleError(f"strategy {name}: share must be >= 0")
            raw[name] = value
    given = sum(v for v in raw.values() if v is not None)
    bare = [k for k, v in raw.items() if v is None]
    rest = max(0.0, 1.0 - given) if given <= 1 else 0.0
    fill = (rest / len(bare) if given > 0 else 1.0 / len(bare)) if bare else 0.0
    shares = {k: fill if v is None else v for k, v in raw.items()}
    total = sum(shares.values())
    if total <= 0:
        raise SampleError("strategy shares add up to 0")
    return {k: v / total for k, v in shares.items()}


def allocate(strategies: dict[str, float], limit: int) -> dict[str, int]:
    """Row quota per strategy (largest remainder, total = limit)."""
    raw = {k: strategies[k] * limit for k in STRATEGIES if k in strategies}
    out = {k: math.floor(v) for k, v in raw.items()}
    rest = limit - sum(out.values())
    for k in sorted(raw, key=lambda k: raw[k] - out[k], reverse=True)[:rest]:
        out[k] += 1
    return out


# ---- what the strategies need ---------------------------------------------------------------


@dataclass
class PickContext:
    """Per-candidate inputs of the strategies (by candidate index) and notes for the data card."""

    # version, length tercile, topic (classify traffic: version, class, length tercile)
    strata: dict[int, tuple[str, str, int | str]] = field(default_factory=dict)
    drift_scores: dict[int, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def length_terciles(tokens: list[int]) -> list[str]:
    """``short``/``medium``/``long`` per token count, by the counts' own terciles."""
    if not tokens:
        return []
    lo, hi = np.quantile(np.array(tokens, dtype=float), [1 / 3, 2 / 3])
    return ["short" if t <= lo else ("medium" if t <= hi else "long") for t in tokens]


def topic_clusters(texts: list[str], k: int, seed: int) -> list[int]:
    """k-means (scipy) over hashed bag-of-words; k is capped by the number of distinct texts."""
    from scipy.cluster.vq import kmeans2

    k = max(1, min(k, len(set(texts))))
    if k == 1 or len(texts) < 2:
        return [0] * len(texts)
    x = hashed_bow(texts).astype(np.float64)
    _, labels = kmeans2(x, k, minit="++", iter=20, rng=np.random.default_rng(seed))
    return [int(v) for v in labels]


def drift_scores(db: Database, cands: list[Candidate], notes: list[str]) -> list[float]:
    """Per candidate: 1 - max cosine similarity (hashed BoW) to the user prompts its version was trained on
    (:func:`tuneloop.monitoring.likeness.unlikeness`); 1.0 for a version with no training data on record."""
    scores = [1.0] * len(cands)
    by_version: dict[str | None, list[int]] = {}
    for i, c in enumerate(cands):
        by_version.setdefault(c.model_version, []).append(i)
    for version, idx in by_version.items():
        found = unlikeness(training_prompts(db, version), [cands[i].prompt_text() for i in idx])
        if found is None:
            notes.append(f"drift: no training data recorded for version {version!r}; its requests are weighted equally")
            continue
        for j, i in enumerate(idx):
            scores[i] = found[j]
    return scores


def prepare(
    db: Database,
    cands: list[Candidate],
    strategies: dict[str, float],
    topics: int,
    seed: int,
    by_label: bool = False,
) -> PickContext:
    """Strata (for ``stratified``) and drift scores (for ``drift``) of the candidates, when those strategies run.
    ``by_label`` (classify traffic): the strata are version, class to train on (the candidate's target) and
    length tercile, instead of version, length tercile and topic."""
    ctx = PickContext()
    if "stratified" in strategies:
        terc = length_terciles([c.tokens for c in cands])
        if by_label:
            ctx.strata = {i: (c.model_version or "-", c.target, terc[i]) for i, c in enumerate(cands)}
        else:
            clusters = topic_clusters([c.prompt_text() for c in cands], topics, seed)
            ctx.strata = {i: (cands[i].model_version or "-", terc[i], clusters[i]) for i in range(len(cands))}
    if "drift" in strategies:
        ctx.drift_scores = dict(enumerate(drift_scores(db, cands, ctx.notes)))
    return ctx


# ---- the pickers: (candidates, pool of indices, how many, rng, context) -> picked indices ----------------

Picker = Callable[[list[Candidate], list[int], int, np.random.Generator, PickContext], list[int]]


def _pick_feedback(
    cands: list[Candidate], pool: list[int], n: int, rng: np.random.Generator, ctx: PickContext
) -> list[int]:
    corrected = [i for i in pool if cands[i].correction]
    positive = [i for i in pool if not cands[i].correction and cands[i].feedback == "positive"]
    rng.shuffle(corrected)
    rng.shuffle(positive)
    return (corrected + positive)[:n]


def _pick_low_confidence(
    cands: list[Candidate], pool: list[int], n: int, rng: np.random.Generator, ctx: PickContext
) -> list[int]:
    """Lowest confidence first (ties in a seeded order); candidates without scores last."""
    order = list(pool)
    rng.shuffle(order)

    def confidence(i: int) -> float:
        c = cands[i].confidence
        return 2.0 if c is None else c

    order.sort(key=confidence)
    return order[:n]


def _pick_random(
    cands: list[Candidate], pool: list[int], n: int, rng: np.random.Generator, ctx: PickContext
) -> list[int]:
    if n >= len(pool):
        return list(pool)
    return [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]


def _pick_drift(
    cands: list[Candidate], pool: list[int], n: int, rng: np.random.Generator, ctx: PickContext
) -> list[int]:
    if n >= len(pool):
        return list(pool)
    w = np.array([max(ctx.drift_scores[i], 1e-6) for i in pool], dtype=np.float64)
    # Efraimidis-Spirakis weighted sampling without replacement: keys u^(1/w)
    keys = rng.random(len(pool)) ** (1.0 / (w / w.max()))
    order = np.argsort(-keys, kind="stable")[:n]
    return [pool[i] for i in order]


def _pick_stratified(
    cands: list[Candidate], pool: list[int], n: int, rng: np.random.Generator, ctx: PickContext
) -> list[int]:
    """Hierarchical round-robin: alternate model versions, within one alternate length terciles, then topics."""
    tree: dict[Any, Any] = {}
    for i in pool:
        node = tree
        for level in ctx.strata[i][:-1]:
            node = node.setdefault(level, {})
        node.setdefault(ctx.strata[i][-1], []).append(i)

    def shuffled(node: dict[Any, Any] | list[int]) -> None:
        if isinstance(node, list):
            rng.shuffle(node)
            return
        for k in sorted(node, key=str):
            shuffled(node[k])

    def rr(node: dict[Any, Any] | list[int]) -> Iterator[int]:
        if isinstance(node, list):
            yield from node
            return
        its = [rr(node[k]) for k in sorted(node, key=str)]
        while its:
            for it in list(its):
                try:
                    yield next(it)
                except StopIteration:
                    its.remove(it)

    shuffled(tree)
    picked: list[int] = []
    for i in rr(tree):
        if len(picked) >= n:
            break
        picked.append(i)
    return picked


PICKERS: dict[str, Picker] = {
    "feedback": _pick_feedback,
    "low-confidence": _pick_low_confidence,
    "drift": _pick_drift,
    "stratified": _pick_stratified,
    "random": _pick_random,
}


def pick(
    cands: list[Candidate], strategies: dict[str, float], limit: int, ctx: PickContext, seed: int
) -> tuple[list[tuple[int, str]], dict[str, dict[str, int]]]:
    """Run the strategies in :data:`STRATEGIES` order with their quotas of ``min(limit, len(cands))`` rows.

    Returns the picked ``(candidate index, strategy)`` pairs in pick order, and per strategy its
    ``quota``, the shortfall ``carried_in`` from the previous strategies and how many it ``picked``.
    """
    rng = np.random.default_rng(seed)
    quotas = allocate(strategies, min(limit, len(cands)))
    pool = list(range(len(cands)))
    picked: list[tuple[int, str]] = []
    per_strategy: dict[str, dict[str, int]] = {}
    carry = 0
    for name in STRATEGIES:
        if name not in quotas:
            continue
        want = quotas[name] + carry
        got = PICKERS[name](cands, pool, want, rng, ctx)
        taken = set(got)
        pool = [i for i in pool if i not in taken]
        picked.extend((i, name) for i in got)
        per_strategy[name] = {"quota": quotas[name], "carried_in": carry, "picked": len(got)}
        carry = want - len(got)
    return picked, per_strategy
