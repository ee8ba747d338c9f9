"""The sampling pipeline: production traffic and feedback -> new, registered training sets.

Contract
--------
:func:`sample` reads the request log (``requests``) joined with ``feedback``
from the database — or, with ``from_parquet``, from the Parquet exports of many
replicas (``tuneloop export logs``) read through
:func:`tuneloop.monitoring.sources.log_source`, which gives the same rows and so
the same dataset as one database holding them all — in a time window and
optionally for one model version, and writes up to two datasets through
:func:`tuneloop.dataset_store.save_dataset` (always into the database):

* an SFT dataset (``<name>``): one row per picked request, the prompt messages
  followed by the assistant answer — the user's *correction* when there is one,
  else the logged response;
* a preference dataset (``<name>-pref``, DPO, only when corrections exist):
  ``prompt`` / ``chosen`` = correction / ``rejected`` = logged response.

Every row keeps ``request_id`` (also recorded in ``dataset_rows``), so lineage
runs both ways (:func:`tuneloop.lineage.lineage`).

Steps, each counted in the data card:

1. **Filters** and 2. **PII scrub** (:mod:`tuneloop.feedback.candidates`).
3. **Dedup within the sample** on the normalised prompt and **against earlier
   training sets** on the normalised prompt + answer
   (:mod:`tuneloop.feedback.candidates`).
4. **Strategies with quotas** (:mod:`tuneloop.feedback.strategies`).
5. **Replay**: a share of rows from an earlier dataset's train split against
   forgetting (``replay_fraction`` of the final train rows).
6. **Deterministic split** (seeded): production rows into train/validation/test;
   replay rows only into train, so held-out numbers measure production.

Everything is deterministic for a given database content and seed, so a rerun
produces the same content hash (and therefore the same dataset id). A request a
user can fix raises :class:`SampleError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from tuneloop.db import Database
from tuneloop.errors import UserError
from tuneloop.feedback.candidates import (
    FILTERS,
    Candidate,
    dedup_within,
    earlier_keys,
    example_key,
    normalise,
    read_candidates,
    scrub_candidates,
)
from tuneloop.feedback.strategies import SampleError, parse_strategies, pick, prepare
from tuneloop.monitoring.sources import log_source
from tuneloop.registry import DatasetRecord
from tuneloop.timeparse import parse_duration, utcnow

__all__ = ["SampleConfig", "SampleError", "SampleResult", "sample", "split_ids"]


@dataclass
class SampleConfig:
    """What to sample and how: the options of ``tuneloop feedback sample`` (and of the loop's sample step)."""

    name: str = field(
        default="production", metadata={"help": "Name of the dataset to write (the preference set gets '-pref')."}
    )
    strategies: dict[str, float] = field(
        default_factory=lambda: {"feedback": 0.5, "stratified": 0.5},
        metadata={
            "help": "Strategy -> share of the sample (feedback, drift, stratified, random); shares are normalised."
        },
    )
    limit: int = field(default=1000, metadata={"help": "Most production rows in the SFT set (before replay)."})
    since: datetime | None = field(default=None, metadata={"help": "Only requests received at or after this UTC time."})
    until: datetime | None = field(default=None, metadata={"help": "Only requests received before this UTC time."})
    window: str | None = field(
        default=None, metadata={"help": "Shorthand for since = now - window ('30m', '1h', '2d')."}
    )
    model_version: str | None = field(default=None, metadata={"help": "Only requests served by this version."})
    scrub_pii: bool = field(default=True, metadata={"help": "Replace emails, phones, card numbers and IPs."})
    dedup_against: list[str] | None = field(
        default=None, metadata={"help": "Datasets to dedup against; None = every registered SFT dataset, [] = none."}
    )
    replay_from: str | None = field(
        default=None, metadata={"help": "Dataset whose train rows are mixed back in against forgetting."}
    )
    replay_fraction: float = field(
        default=0.0, metadata={"help": "Share of the final train split drawn from replay_from (0..0.9)."}
    )
    validation_fraction: float = field(
        default=0.1, metadata={"help": "Share of production rows held out for validation."}
    )
    test_fraction: float = field(
        default=0.1, metadata={"help": "Share of production rows held out for test (the gate's split)."}
    )
    topics: int = field(default=8, metadata={"help": "k of the k-means topic clusters used by 'stratified'."})
    preference: bool = field(default=True, metadata={"help": "Also write a DPO preference dataset from corrections."})
    seed: int = field(default=0, metadata={"help": "Seed of every random choice (sampling, clustering, split)."})
    from_parquet: str | None = field(
        default=None,
        metadata={
            "help": "Read requests and feedback from this folder (or URL) of Parquet exports of many replicas instead of the database."
        },
    )


@dataclass
class SampleResult:
    """The registered SFT dataset, the preference dataset (None without corrections) and the SFT data card."""

    sft: DatasetRecord
    preference: DatasetRecord | None
    card: dict[str, Any]


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


# ---- main entry ---------------------------------------------------------------------------------


def sample(db: Database, home: Path, cfg: SampleConfig, progress: bool = True) -> SampleResult:
    """Run the pipeline of the module docstring and register the dataset(s)."""
    from tqdm import tqdm

    from tuneloop.dataset_store import save_dataset
    from tuneloop.registry import get_dataset

    if cfg.limit <= 0:
        raise SampleError("limit must be > 0")
    if not 0 <= cfg.replay_fraction < 1:
        raise SampleError("replay fraction must be in [0, 1)")
    if cfg.replay_fraction > 0 and not cfg.replay_from:
        raise SampleError("--replay-fraction needs --replay-from DATASET")
    if cfg.validation_fraction < 0 or cfg.test_fraction < 0 or cfg.validation_fraction + cfg.test_fraction >= 1:
        raise SampleError("validation and test fractions must be >= 0 and add up to less than 1")
    strategies = (
        parse_strategies([f"{k}={v}" for k, v in cfg.strategies.items()]) if cfg.strategies else parse_strategies(None)
    )
    if cfg.window and cfg.since:
        raise SampleError("give either --window or --since, not both")
    until = cfg.until or utcnow()
    since = cfg.since or (until - _window(cfg.window) if cfg.window else datetime(1970, 1, 1))
    if since >= until:
        raise SampleError(f"empty time window: since {since} is not before until {until}")
    replay_rec = get_dataset(db, cfg.replay_from) if cfg.replay_from else None  # fail early on a bad name
    logs = log_source(db, cfg.from_parquet)  # a missing export folder fails early too
    steps = tqdm(total=6, desc="sample", unit="step", disable=not progress)

    counts: dict[str, int] = {}
    cands = read_candidates(logs, since, until, cfg.model_version, counts)
    counts["after_filters"] = len(cands)
    steps.update()
    if cfg.scrub_pii:
        scrub_candidates(cands, counts)
    steps.update()
    cands, counts["duplicates_within"] = dedup_within(cands)
    keys, against = earlier_keys(db, cfg.dedup_against)
    before = len(cands)
    cands = [c for c in cands if example_key(c.messages, c.target) not in keys]
    counts["duplicates_of_earlier_sets"] = before - len(cands)
    counts["eligible"] = len(cands)
    steps.update()
    if not cands:
        steps.close()
        raise SampleError(
            f"nothing to sample: {counts['requests_in_window']} request(s) between {since:%Y-%m-%d %H:%M:%S} and "
            f"{until:%Y-%m-%d %H:%M:%S} UTC, none left after filters and dedup ({_fmt_counts(counts)})"
        )

    ctx = prepare(db, cands, strategies, cfg.topics, cfg.seed)
    picked, per_strategy = pick(cands, strategies, cfg.limit, ctx, cfg.seed)
    steps.update()

    rows: list[dict[str, Any]] = []
    for i, _ in picked:
        c = cands[i]
        origin = "feedback" if (c.correction or c.feedback == "positive") else "production"
        rows.append(
            {
                "id": f"req-{c.request_id}",
                "messages": c.messages + [{"role": "assistant", "content": c.target}],
                "request_id": c.request_id,
                "origin": origin,
            }
        )
    splits = _split(rows, cfg)

    replay_n = 0
    if replay_rec is not None and cfg.replay_fraction > 0:
        replay = _replay_rows(db, replay_rec, len(splits["train"]), cfg)
        splits["train"].extend(replay)
        replay_n = len(replay)
    steps.update()

    origins: dict[str, int] = {}
    for split_rows in splits.values():
        for r in split_rows:
            origins[r["origin"]] = origins.get(r["origin"], 0) + 1
    card = {
        "kind": "sft",
        "built_by": "tuneloop feedback sample",
        "window": {"since": str(since), "until": str(until)},
        "model_version": cfg.model_version,
        "strategies": strategies,
        "per_strategy": per_strategy,
        "counts": {**counts, "picked": len(rows), "replay": replay_n},
        "origins": origins,
        "splits": {k: len(v) for k, v in splits.items()},
        "dedup_against": against,
        "pii_scrubbed": cfg.scrub_pii,
        "seed": cfg.seed,
        "notes": ctx.notes,
    }
    source = {
        "requests": {
            "since": str(since),
            "until": str(until),
            "model_version": cfg.model_version,
            "from_parquet": logs.parquet,
        },
        "config": _cfg_dict(cfg),
        "replay_from": replay_rec.id if replay_rec else None,
    }
    parents = [replay_rec.id] if replay_rec else []
    sft = save_dataset(db, home, cfg.name, splits, "sft", card, source, parents)

    pref: DatasetRecord | None = None
    picked_cands = [cands[i] for i, _ in picked]
    pairs = [
        c
        for c in picked_cands
        if c.correction and c.response.strip() and normalise(c.correction) != normalise(c.response)
    ]
    if cfg.preference and pairs:
        pref = _preference_dataset(db, home, pairs, cfg, card, source, sft)
        card["preference_dataset"] = pref.id
    steps.update()
    steps.close()
    return SampleResult(sft=sft, preference=pref, card=card)


def _split(rows: list[dict[str, Any]], cfg: SampleConfig) -> dict[str, list[dict[str, Any]]]:
    """Rows into train/validation/test by :func:`split_ids`, each split ordered by row id."""
    assign = split_ids([r["id"] for r in rows], cfg.validation_fraction, cfg.test_fraction, cfg.seed)
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "validation": [], "test": []}
    for r in sorted(rows, key=lambda r: r["id"]):
        splits[assign[r["id"]]].append(r)
    return splits


def _replay_rows(db: Database, rec: DatasetRecord, n_train: int, cfg: SampleConfig) -> list[dict[str, Any]]:
    """A seeded draw from ``rec``'s train split, sized so it is ``replay_fraction`` of the final train rows."""
    from tuneloop.dataset_store import load_splits

    src = load_splits(db, rec.id)
    train = src["train"] if "train" in src else next(iter(src.values()))
    want = round(n_train * cfg.replay_fraction / (1 - cfg.replay_fraction))
    want = min(want, len(train))
    idx = (
        sorted(np.random.default_rng(cfg.seed + 1).choice(len(train), size=want, replace=False).tolist())
        if want
        else []
    )
    out: list[dict[str, Any]] = []
    for j in idx:
        row = train[int(j)]
        out.append(
            {
                "id": f"replay-{row.get('id') or j}",
                "messages": row["messages"],
                "request_id": row.get("request_id"),
                "origin": "replay",
            }
        )
    return out


def _preference_dataset(
    db: Database,
    home: Path,
    pairs: list[Candidate],
    cfg: SampleConfig,
    card: dict[str, Any],
    source: dict[str, Any],
    sft: DatasetRecord,
) -> DatasetRecord:
    """Write and register ``<name>-pref``: prompt / chosen = correction / rejected = logged response."""
    from tuneloop.dataset_store import save_dataset

    prow: list[dict[str, Any]] = [
        {
            "id": f"pref-{c.request_id}",
            "prompt": c.messages,
            "chosen": [{"role": "assistant", "content": c.correction}],
            "rejected": [{"role": "assistant", "content": c.response}],
            "request_id": c.request_id,
            "origin": "feedback",
        }
        for c in pairs
    ]
    psplits = _split(prow, cfg)
    pcard = {
        "kind": "preference",
        "built_by": "tuneloop feedback sample",
        "window": card["window"],
        "pairs": len(prow),
        "splits": {k: len(v) for k, v in psplits.items()},
        "chosen": "the user's correction",
        "rejected": "the logged response",
        "pii_scrubbed": cfg.scrub_pii,
        "seed": cfg.seed,
        "sft_dataset": sft.id,
    }
    return save_dataset(db, home, f"{cfg.name}-pref", psplits, "preference", pcard, source, [sft.id])


def _window(text: str) -> timedelta:
    """``--window`` as a timedelta; bad text is a :class:`SampleError` like every other bad sampling input."""
    try:
        return parse_duration(text)
    except UserError as e:
        raise SampleError(str(e)) from None


def _cfg_dict(cfg: SampleConfig) -> dict[str, Any]:
    from tuneloop.config import to_dict

    return {k: (str(v) if isinstance(v, datetime) else v) for k, v in to_dict(cfg).items()}


def _fmt_counts(counts: dict[str, int]) -> str:
    keys = (*FILTERS, "duplicates_within", "duplicates_of_earlier_sets")
    return ", ".join(f"{k}={counts[k]}" for k in keys if counts.get(k))
