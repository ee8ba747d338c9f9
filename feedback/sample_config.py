"""What a sample is asked for and what it gives, shared by the chat and the classifier pipelines.

Contract
--------
* :class:`SampleConfig`: the options of ``tuneloop feedback sample`` (and of
  the loop's sample step), each with its help text; ``task`` (:data:`TASKS`)
  picks the pipeline: :mod:`tuneloop.feedback.sample` (chat) or
  :mod:`tuneloop.feedback.sample_classify` (classifiers).
* :class:`SampleResult`: the registered dataset(s) and the main data card.
* :func:`split_ids` / :func:`seeded_split`: the seeded, order-independent
  train/validation/test split both pipelines use; :func:`cfg_dict` is the
  config as recorded in a dataset's ``source``.

Pure data and functions: nothing here reads or writes the database.
:mod:`tuneloop.feedback.sample` re-exports the names, so callers import them from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from tuneloop.registry import DatasetRecord

TASKS = ("chat", "classification")
"""What a sample is for: chat models (SFT/DPO/KTO sets) or classifiers (a classification set)."""

Row = dict[str, Any]
Splits = dict[str, list[Row]]


@dataclass
class SampleConfig:
    """What to sample and how: the options of ``tuneloop feedback sample`` (and of the loop's sample step)."""

    name: str = field(
        default="production",
        metadata={"help": "Name of the dataset to write (the preference set gets '-pref', the KTO set '-kto')."},
    )
    task: str = field(
        default="chat",
        metadata={
            "help": "chat: SFT (+ DPO, KTO) sets from chat/completion traffic; classification: a classification "
            "set from classify traffic (feedback labels, confirmed predictions)."
        },
    )
    strategies: dict[str, float] = field(
        default_factory=lambda: {"feedback": 0.5, "stratified": 0.5},
        metadata={
            "help": "Strategy -> share of the sample (feedback, low-confidence (classification), drift, stratified, "
            "random); shares are normalised."
        },
    )
    limit: int = field(
        default=1000,
        metadata={
            "help": "Most production rows in the SFT set (before replay); also most thumbs-down rows read for KTO."
        },
    )
    since: datetime | None = field(default=None, metadata={"help": "Only requests received at or after this UTC time."})
    until: datetime | None = field(default=None, metadata={"help": "Only requests received before this UTC time."})
    window: str | None = field(
        default=None, metadata={"help": "Shorthand for since = now - window ('30m', '1h', '2d')."}
    )
    model_version: str | None = field(default=None, metadata={"help": "Only requests served by this version."})
    scrub_pii: bool = field(default=True, metadata={"help": "Replace emails, phones, card numbers and IPs."})
    dedup_against: list[str] | None = field(
        default=None,
        metadata={
            "help": "Datasets to dedup against; None = every registered dataset of the task's kind (SFT or "
            "classification), [] = none."
        },
    )
    replay_from: str | None = field(
        default=None, metadata={"help": "Dataset whose train rows are mixed back in against forgetting."}
    )
    replay_fraction: float = field(
        default=0.0,
        metadata={"help": "Share of the final train split drawn from replay_from (0..0.9), in the SFT and KTO sets."},
    )
    validation_fraction: float = field(
        default=0.1, metadata={"help": "Share of production rows held out for validation."}
    )
    test_fraction: float = field(
        default=0.1, metadata={"help": "Share of production rows held out for test (the gate's split)."}
    )
    topics: int = field(default=8, metadata={"help": "k of the k-means topic clusters used by 'stratified'."})
    preference: bool = field(default=True, metadata={"help": "Also write a DPO preference dataset from corrections."})
    kto: bool = field(
        default=True,
        metadata={
            "help": "Also write a KTO dataset (thumbs-up and corrections desirable, thumbs-down undesirable) when "
            "the sample has both."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of every random choice (sampling, clustering, split)."})
    from_parquet: str | None = field(
        default=None,
        metadata={
            "help": "Read requests and feedback from this folder (or URL) of Parquet exports of many replicas instead of the database."
        },
    )


@dataclass
class SampleResult:
    """The registered SFT dataset (task ``classification``: the classification dataset), the preference and KTO
    datasets (None when not written) and the main dataset's data card."""

    sft: DatasetRecord
    preference: DatasetRecord | None
    card: dict[str, Any]
    kto: DatasetRecord | None = None

    @property
    def dataset(self) -> DatasetRecord:
        """The main dataset: the SFT set, or the classification set."""
        return self.sft


def split_ids(ids: list[str], val: float, test: float, seed: int) -> dict[str, str]:
    """Seeded, order-independent assignment of ids to train/validation/test (each held-out split >= 1 row when n >= 3)."""
    ordered = sorted(ids)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    n = len(ordered)
    n_test = round(n * test)
    n_val = round(n * val)
    if n >= 3:
        n_test = max(n_test, 1) if test > 0 else 0
        n_val = max(n_val, 1) if val > 0 else 0
    out = {}
    for rank, j in enumerate(perm):
        out[ordered[j]] = "test" if rank < n_test else ("validation" if rank < n_test + n_val else "train")
    return out


def seeded_split(rows: list[Row], cfg: SampleConfig) -> Splits:
    """Rows into train/validation/test by :func:`split_ids`, each split ordered by row id."""
    assign = split_ids([r["id"] for r in rows], cfg.validation_fraction, cfg.test_fraction, cfg.seed)
    splits: Splits = {"train": [], "validation": [], "test": []}
    for r in sorted(rows, key=lambda r: r["id"]):
        splits[assign[r["id"]]].append(r)
    return splits


def cfg_dict(cfg: SampleConfig) -> dict[str, Any]:
    """``cfg`` as JSON values (times as text), as a dataset's ``source`` records it."""
    from tuneloop.config import to_dict

    return {k: (str(v) if isinstance(v, datetime) else v) for k, v in to_dict(cfg).items()}
