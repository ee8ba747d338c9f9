"""Sampling classifier traffic: logged ``classify`` requests and their feedback -> a ``classification`` dataset.

Contract
--------
:func:`sample_classification` is :func:`tuneloop.feedback.sample.sample` with
``task="classification"`` (which validates the options, resolves the window,
the replay source and the log source, and calls it). It reads the
``classify`` requests of the window (optionally of one model version) with
their newest feedback (:func:`~tuneloop.feedback.candidates.read_classify_candidates`)
and writes one dataset of kind ``classification`` (rows ``{id, text, label,
request_id, origin}``, :mod:`tuneloop.dataset_store`) through
:func:`~tuneloop.dataset_store.save_dataset`:

* a request with a feedback ``label`` becomes ``{text, label}`` with that
  label, origin ``feedback`` (a label equal to the predicted one confirms
  the prediction; either way the label is what the user said);
* a thumbs-up (or 4-5 stars) without a label confirms the prediction: the
  predicted label (``requests.response``), origin ``production``;
* a thumbs-down without a label is excluded (the prediction was wrong and
  the right class is unknown), and so is an unrated (or 3-star), unlabelled request:
  each counted in the card (``counts.negative_feedback``,
  ``counts.unrated``; ``excluded`` repeats both).

Steps, each counted in the data card's ``counts``: filters, PII scrub of the
text (labels are class names and are left alone), dedup within the sample on
the normalised text (labelled > thumbs-up, then the newest) and against earlier
classification sets on text + label (default: every registered
``classification`` dataset), strategies with quotas
(:mod:`tuneloop.feedback.strategies`: ``feedback``, ``low-confidence`` —
the smallest largest-class-probability first —, ``drift``, ``stratified``
over version x class x length tercile, ``random``), replay of an earlier
classification set's train rows (origin ``replay``, train split only) and the
seeded split of :func:`~tuneloop.feedback.sample.split_ids`.

The card also has the label part a classification card has
(:func:`tuneloop.trainer.prepare.label_card`): ``label_names`` (the sorted
classes: those of the rows and those of the classifiers whose requests were
picked, so a class the sample has no row of keeps its place in a model
trained on it), ``labels`` (rows per class in the train split, 0 included)
and ``label_counts`` (per split); ``feedback`` (labels given / confirmed / corrected,
thumbs-up confirmations) and ``confidence`` (min / mean largest probability
of the picked rows). Deterministic for a given log content and seed, like
the chat sample; no preference or KTO set is written.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from tuneloop.db import Database
from tuneloop.feedback.candidates import (
    CLASSIFY_FILTERS,
    dedup_within,
    earlier_keys,
    example_key,
    read_classify_candidates,
    scrub_candidates,
)
from tuneloop.feedback.sample_config import SampleConfig, SampleResult, cfg_dict, seeded_split
from tuneloop.feedback.strategies import SampleError, pick, prepare
from tuneloop.monitoring.sources import LogSource
from tuneloop.registry import DatasetRecord

KIND = "classification"
Row = dict[str, Any]


def sample_classification(
    db: Database,
    home: Path,
    cfg: SampleConfig,
    strategies: dict[str, float],
    since: datetime,
    until: datetime,
    replay_rec: DatasetRecord | None,
    logs: LogSource,
    progress: bool = True,
) -> SampleResult:
    """Run the pipeline of the module docstring and register the classification dataset."""
    from tqdm import tqdm

    from tuneloop.dataset_store import save_dataset

    if replay_rec is not None and replay_rec.kind != KIND:
        raise SampleError(
            f"--replay-from {replay_rec.id} is a {replay_rec.kind} dataset; a classifier replays a {KIND} one"
        )
    steps = tqdm(total=6, desc="sample", unit="step", disable=not progress)
    counts: dict[str, int] = {}
    cands = read_classify_candidates(logs, since, until, cfg.model_version, counts)
    counts["after_filters"] = len(cands)
    steps.update()
    if cfg.scrub_pii:
        scrub_candidates(cands, counts, answers=False)
    steps.update()
    cands, counts["duplicates_within"] = dedup_within(cands)
    keys, against = earlier_keys(db, cfg.dedup_against, kind=KIND)
    before = len(cands)
    cands = [c for c in cands if example_key(c.messages, c.target) not in keys]
    counts["duplicates_of_earlier_sets"] = before - len(cands)
    counts["eligible"] = len(cands)
    steps.update()
    if not cands:
        steps.close()
        raise SampleError(
            f"nothing to sample: {counts['requests_in_window']} classify request(s) between "
            f"{since:%Y-%m-%d %H:%M:%S} and {until:%Y-%m-%d %H:%M:%S} UTC, none with a label or a thumbs-up left "
            f"after filters and dedup ({_fmt_counts(counts)})"
        )

    ctx = prepare(db, cands, strategies, cfg.topics, cfg.seed, by_label=True)
    picked, per_strategy = pick(cands, strategies, cfg.limit, ctx, cfg.seed)
    steps.update()
    picked_cands = [cands[i] for i, _ in picked]
    rows: list[Row] = [
        {
            "id": f"req-{c.request_id}",
            "text": c.text,
            "label": c.target,
            "request_id": c.request_id,
            "origin": "feedback" if c.correction else "production",
        }
        for c in picked_cands
    ]
    splits = seeded_split(rows, cfg)
    replay_n = 0
    if replay_rec is not None and cfg.replay_fraction > 0:
        replay = _replay_rows(db, replay_rec, len(splits["train"]), cfg.replay_fraction, cfg.seed)
        splits["train"].extend(replay)
        replay_n = len(replay)
    steps.update()

    origins: dict[str, int] = {}
    for split_rows in splits.values():
        for r in split_rows:
            origins[r["origin"]] = origins.get(r["origin"], 0) + 1
    label_counts = {
        s: dict(sorted(Counter(r["label"] for r in split_rows).items())) for s, split_rows in splits.items()
    }
    names = sorted(
        {r["label"] for split_rows in splits.values() for r in split_rows}.union(*(c.label_set for c in picked_cands))
    )
    confidences = [c.confidence for c in picked_cands if c.confidence is not None]
    labelled = [c for c in picked_cands if c.correction]
    card = {
        "kind": KIND,
        "task": "classification",
        "built_by": "tuneloop feedback sample --task classification",
        "window": {"since": str(since), "until": str(until)},
        "model_version": cfg.model_version,
        "strategies": strategies,
        "per_strategy": per_strategy,
        "counts": {**counts, "picked": len(rows), "replay": replay_n},
        "excluded": {"thumbs_down_without_label": counts["negative_feedback"], "unrated": counts["unrated"]},
        "origins": origins,
        "splits": {k: len(v) for k, v in splits.items()},
        "label_names": names,
        "labels": {n: label_counts["train"].get(n, 0) for n in names},
        "label_counts": label_counts,
        "feedback": {
            "labels_given": len(labelled),
            "labels_confirmed": sum(1 for c in labelled if c.correction == c.response),
            "labels_corrected": sum(1 for c in labelled if c.correction != c.response),
            "thumbs_up": sum(1 for c in picked_cands if not c.correction),
        },
        "confidence": {
            "min": min(confidences) if confidences else None,
            "mean": float(np.mean(confidences)) if confidences else None,
        },
        "dedup_against": against,
        "pii_scrubbed": cfg.scrub_pii,
        "seed": cfg.seed,
        "notes": ctx.notes,
    }
    source = {
        "requests": {
            "route": "classify",
            "since": str(since),
            "until": str(until),
            "model_version": cfg.model_version,
            "from_parquet": logs.parquet,
        },
        "config": cfg_dict(cfg),
        "replay_from": replay_rec.id if replay_rec else None,
    }
    parents = [replay_rec.id] if replay_rec else []
    rec = save_dataset(db, home, cfg.name, splits, KIND, card, source, parents)
    steps.update()
    steps.close()
    return SampleResult(sft=rec, preference=None, card=card)


def _replay_rows(db: Database, rec: DatasetRecord, n_train: int, fraction: float, seed: int) -> list[Row]:
    """A seeded draw of ``rec``'s train rows, ``fraction`` of the final train split, as origin ``replay``."""
    from tuneloop.dataset_store import load_splits

    src = load_splits(db, rec.id)
    train: Sequence[Row] = src["train"] if "train" in src else next(iter(src.values()))
    want = min(round(n_train * fraction / (1 - fraction)), len(train))
    idx = sorted(np.random.default_rng(seed + 1).choice(len(train), size=want, replace=False).tolist()) if want else []
    return [
        {
            "id": f"replay-{train[int(j)].get('id') or j}",
            "text": train[int(j)]["text"],
            "label": train[int(j)]["label"],
            "request_id": train[int(j)].get("request_id"),
            "origin": "replay",
        }
        for j in idx
    ]


def _fmt_counts(counts: dict[str, int]) -> str:
    keys = (*CLASSIFY_FILTERS, "duplicates_within", "duplicates_of_earlier_sets")
    return ", ".join(f"{k}={counts[k]}" for k in keys if counts.get(k))
