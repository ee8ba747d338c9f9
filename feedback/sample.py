"""The sampling pipeline: production traffic and feedback -> new, registered training sets.

Contract
--------
:func:`sample` reads the request log (``requests``) joined with ``feedback``
through :func:`tuneloop.monitoring.sources.log_source` — from the database, or,
with ``from_parquet``, from the Parquet exports of many replicas (``tuneloop
export logs``), which give the same rows and so the same dataset as one
database holding them all — in a time window and optionally for one model
version, and writes up to three datasets through
:func:`tuneloop.dataset_store.save_dataset` (always into the database), one per
training objective the feedback supports:

* an **SFT** dataset (``<name>``): one row per picked request, the prompt
  messages followed by the assistant answer — the user's *correction* when there
  is one, else the logged response. Positively rated responses (thumbs-up, 4-5
  stars) are trained on as answers (the ``feedback`` strategy picks them right
  after corrections). A **thumbs-down response without a correction never
  becomes an SFT answer**: :func:`~tuneloop.feedback.candidates.read_candidates`
  keeps it out of the candidates (counted as ``negative_feedback``), since
  training on it would teach the answer users rejected;
* a **preference** dataset (``<name>-pref``, DPO, only with corrections that
  differ from the served response): ``prompt`` / ``chosen`` = correction /
  ``rejected`` = logged response. No replay rows: a pair needs a rejected
  answer, which replayed rows lack; DPO's anchor against forgetting is its
  beta-weighted KL to the reference (base) model;
* a **KTO** dataset (``<name>-kto``, TRL's unpaired preference format: ``prompt``
  messages, ``completion`` = one assistant message, ``label`` bool): label True
  for the served response of a picked thumbs-up request and for every picked
  correction; label False for the served response of every thumbs-down request
  (corrected or not — uncorrected ones are read for this set only, deduplicated
  on prompt + response, at most ``limit``, and dropped where the same prompt +
  answer is also a desirable row). Replay rows (below) join its train split as
  desirable examples. Written only when its train split has both desirable and
  undesirable feedback rows (KTO needs both); otherwise the SFT card's
  ``kto_note`` says why (``preference_note`` likewise for the DPO set).

**Tool calling.** A logged chat request that carried tool definitions
(``params.tools``) becomes rows with a ``tools`` column (the definitions, JSON
text in the saved dataset, see :mod:`tuneloop.dataset_store`) in all three
sets; its prompt messages keep their ``tool_calls`` / ``tool_call_id``, and the
answer is the raw text the model generated (``requests.response``, e.g.
``<tool_call>{...}</tool_call>``; the parsed ``requests.tool_calls`` are not
what the model emitted) or the user's correction. Trained with its tools, the
row's prompt tokens are the ones the server rendered. Rows of requests without
tools have no ``tools`` value (the column is absent when no row has one).

Every row keeps ``request_id`` (also recorded in ``dataset_rows``), so lineage
runs both ways (:func:`tuneloop.lineage.lineage`). The SFT data card names the
other two sets (``preference_dataset``, ``kto_dataset``; their ids are known
before they are written) and counts the feedback behind them (``feedback``), so
the loop can choose an objective (:func:`choose_objective`) from the SFT set alone.

Steps, each counted in the data card:

1. **Filters** and 2. **PII scrub** (:mod:`tuneloop.feedback.candidates`).
3. **Dedup within the sample** on the normalised prompt and **against earlier
   training sets** on the normalised prompt + answer
   (:mod:`tuneloop.feedback.candidates`).
4. **Strategies with quotas** (:mod:`tuneloop.feedback.strategies`).
5. **Replay**: a share of rows from an earlier dataset's train split against
   forgetting (``replay_fraction`` of the final train rows), into the SFT and
   the KTO set (an SFT replay source gives its rows; a preference source its
   prompt + chosen; a KTO source its desirable rows).
6. **Deterministic split** (seeded): production rows into train/validation/test;
   replay rows only into train, so held-out numbers measure production. A
   preference or KTO row goes to the split its request's SFT row is in, so no
   request the gate holds out (the SFT test split) is trained on by DPO or KTO;
   thumbs-down rows not in the SFT set are split among themselves.

**Classifiers.** With ``task="classification"`` the pipeline reads the
``classify`` traffic instead and writes one ``classification`` dataset
(:mod:`tuneloop.feedback.sample_classify`); chat sampling reads every route
but ``classify``, so classifier traffic never becomes chat rows. The options
and the result (:class:`SampleConfig`, :class:`SampleResult`) and the seeded
split (:func:`split_ids`) live in :mod:`tuneloop.feedback.sample_config`, which
both pipelines share, and are re-exported here.

Everything is deterministic for a given database content and seed, so a rerun
produces the same content hash (and therefore the same dataset id). A request a
user can fix raises :class:`SampleError`.

**Both backends** (:mod:`tuneloop.db`): the reads of ``requests`` / ``feedback``
are DuckDB SQL run on the log source's DuckDB connection (on PostgreSQL, an
in-memory DuckDB holding copies of the rows, :meth:`~tuneloop.db.Database.analytics`);
everything else — the registry look-ups and the dataset registrations — is
portable SQL through ``db.connect()``. The same log rows therefore give the
same datasets (same ids) and data card counts in a DuckDB file and on a shared
PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

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
from tuneloop.feedback.sample_config import (
    TASKS,
    Row,
    SampleConfig,
    SampleResult,
    Splits,
    cfg_dict,
    seeded_split,
    split_ids,
)
from tuneloop.feedback.strategies import CLASSIFY_ONLY, SampleError, parse_strategies, pick, prepare
from tuneloop.monitoring.sources import log_source
from tuneloop.registry import DatasetRecord
from tuneloop.timeparse import parse_duration, utcnow

__all__ = [
    "OBJECTIVES",
    "TASKS",
    "SampleConfig",
    "SampleError",
    "SampleResult",
    "choose_objective",
    "sample",
    "split_ids",
]

OBJECTIVES = ("sft", "dpo", "kto")
"""The training objectives a sample can feed: its SFT, preference (DPO) and KTO sets."""


def choose_objective(pairs: int, desirable: int, undesirable: int, min_pairs: int) -> tuple[str, str]:
    """The objective ``auto`` trains on a sample, and why: ``dpo``, ``kto`` or ``sft``.

    * ``dpo`` when there are at least ``min_pairs`` preference pairs (a correction and the
      served response it replaces; at least 1 whatever ``min_pairs`` says);
    * else ``kto`` when there are both desirable (thumbs-up responses, corrections) and
      undesirable (thumbs-down responses) examples;
    * else ``sft``.

    The counts are those of the sample's train splits (the SFT card's ``feedback``:
    ``preference_pairs``, ``kto_desirable``, ``kto_undesirable``); pure, no I/O.
    """
    need = max(1, min_pairs)
    if pairs >= need:
        return "dpo", f"{pairs} preference pair(s) from corrections (>= {need})"
    short = f"{pairs} preference pair(s) (< {need})"
    if desirable > 0 and undesirable > 0:
        return "kto", f"{short}; {desirable} desirable and {undesirable} undesirable (thumbs-down) example(s)"
    missing = "thumbs-down" if desirable > 0 else ("thumbs-up or corrected" if undesirable > 0 else "rated")
    return "sft", f"{short} and no {missing} feedback for KTO"


# ---- main entry ---------------------------------------------------------------------------------


def sample(db: Database, home: Path, cfg: SampleConfig, progress: bool = True) -> SampleResult:
    """Run the pipeline of the module docstring and register the dataset(s)."""
    from tqdm import tqdm

    from tuneloop.dataset_store import dataset_id, save_dataset
    from tuneloop.registry import get_dataset

    if cfg.task not in TASKS:
        raise SampleError(f"task must be one of {', '.join(TASKS)}, got {cfg.task!r}")
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
    classify_only = [k for k in strategies if k in CLASSIFY_ONLY]
    if classify_only and cfg.task != "classification":
        raise SampleError(
            f"strategy {classify_only[0]} reads a classifier's class probabilities: use it with --task classification"
        )
    if cfg.window and cfg.since:
        raise SampleError("give either --window or --since, not both")
    until = cfg.until or utcnow()
    since = cfg.since or (until - _window(cfg.window) if cfg.window else datetime(1970, 1, 1))
    if since >= until:
        raise SampleError(f"empty time window: since {since} is not before until {until}")
    replay_rec = get_dataset(db, cfg.replay_from) if cfg.replay_from else None  # fail early on a bad name
    logs = log_source(db, cfg.from_parquet)  # a missing export folder fails early too
    if cfg.task == "classification":
        from tuneloop.feedback.sample_classify import sample_classification

        return sample_classification(db, home, cfg, strategies, since, until, replay_rec, logs, progress)
    steps = tqdm(total=6, desc="sample", unit="step", disable=not progress)

    counts: dict[str, int] = {}
    negatives: list[Candidate] | None = [] if cfg.kto else None  # uncorrected thumbs-down: KTO's only
    cands = read_candidates(logs, since, until, cfg.model_version, counts, negatives)
    counts["after_filters"] = len(cands)
    steps.update()
    neg_counts: dict[str, int] = {}
    if cfg.scrub_pii:
        scrub_candidates(cands, counts)
        if negatives:
            scrub_candidates(negatives, neg_counts)
    steps.update()
    cands, counts["duplicates_within"] = dedup_within(cands)
    keys, against = earlier_keys(db, cfg.dedup_against)
    before = len(cands)
    cands = [c for c in cands if example_key(c.messages, c.target, c.tools) not in keys]
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

    rows: list[Row] = []
    for i, _ in picked:
        c = cands[i]
        origin = "feedback" if (c.correction or c.feedback == "positive") else "production"
        rows.append(
            _with_tools(
                {
                    "id": f"req-{c.request_id}",
                    "messages": c.messages + [{"role": "assistant", "content": c.target}],
                    "request_id": c.request_id,
                    "origin": origin,
                },
                c.tools,
            )
        )
    splits = seeded_split(rows, cfg)
    split_of = {r["request_id"]: s for s, split_rows in splits.items() for r in split_rows}

    replay_src = _replay_source(db, replay_rec) if replay_rec is not None and cfg.replay_fraction > 0 else None
    replay_n = 0
    if replay_src is not None:
        replay = _replay_rows(replay_src, len(splits["train"]), cfg)
        splits["train"].extend(replay)
        replay_n = len(replay)
    steps.update()

    picked_cands = [cands[i] for i, _ in picked]
    pref_splits, pref_note = _preference_splits(picked_cands, split_of, cfg)
    kto_splits, kto_info, kto_note = (
        _kto_splits(picked_cands, negatives or [], split_of, replay_src, cfg)
        if cfg.kto
        else (None, {}, "disabled (kto=False)")
    )

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
        "thumbs_down_not_sft_answers": counts["negative_feedback"],
        "feedback": {
            "thumbs_up": sum(1 for c in picked_cands if c.feedback == "positive" and not c.correction),
            "corrections": sum(1 for c in picked_cands if c.correction),
            "thumbs_down": counts["negative_feedback"]
            + sum(1 for c in picked_cands if c.feedback == "negative" and c.correction),
            "preference_pairs": len(pref_splits["train"]) if pref_splits else 0,
            "kto_desirable": kto_info.get("train_desirable_feedback", 0) if kto_splits else 0,
            "kto_undesirable": kto_info.get("train_undesirable", 0) if kto_splits else 0,
        },
        "preference_dataset": dataset_id(f"{cfg.name}-pref", pref_splits, "preference") if pref_splits else None,
        "preference_note": pref_note,
        "kto_dataset": dataset_id(f"{cfg.name}-kto", kto_splits, "kto") if kto_splits else None,
        "kto_note": kto_note,
    }
    source = {
        "requests": {
            "since": str(since),
            "until": str(until),
            "model_version": cfg.model_version,
            "from_parquet": logs.parquet,
        },
        "config": cfg_dict(cfg),
        "replay_from": replay_rec.id if replay_rec else None,
    }
    parents = [replay_rec.id] if replay_rec else []
    sft = save_dataset(db, home, cfg.name, splits, "sft", card, source, parents)

    pref: DatasetRecord | None = None
    if pref_splits:
        pcard = {
            "kind": "preference",
            "built_by": "tuneloop feedback sample",
            "window": card["window"],
            "pairs": sum(len(v) for v in pref_splits.values()),
            "splits": {k: len(v) for k, v in pref_splits.items()},
            "chosen": "the user's correction",
            "rejected": "the logged response",
            "split_rule": "each pair in the split of its request's SFT row",
            "replay": "none: a pair needs a rejected answer; DPO's KL to the reference model is its anchor",
            "pii_scrubbed": cfg.scrub_pii,
            "seed": cfg.seed,
            "sft_dataset": sft.id,
        }
        pref = save_dataset(db, home, f"{cfg.name}-pref", pref_splits, "preference", pcard, source, [sft.id])
    kto: DatasetRecord | None = None
    if kto_splits:
        kcard = {
            "kind": "kto",
            "built_by": "tuneloop feedback sample",
            "window": card["window"],
            **kto_info,
            "splits": {k: len(v) for k, v in kto_splits.items()},
            "label_true": "the served response of a thumbs-up request, a user's correction, or a replayed answer",
            "label_false": "the served response of a thumbs-down request",
            "split_rule": "rows of a sampled request in the split of its SFT row; other thumbs-down rows split "
            "among themselves (seeded); replay rows only in train",
            "pii_scrubbed": cfg.scrub_pii,
            "pii": neg_counts,
            "seed": cfg.seed,
            "sft_dataset": sft.id,
            "replay_from": replay_rec.id if replay_rec else None,
        }
        kto = save_dataset(db, home, f"{cfg.name}-kto", kto_splits, "kto", kcard, source, [sft.id, *parents])
    steps.update()
    steps.close()
    return SampleResult(sft=sft, preference=pref, card=card, kto=kto)


def _with_tools(row: Row, tools: Any) -> Row:
    """``row`` with a ``tools`` value when its request had tool definitions (rows without keep their shape)."""
    if tools:
        row["tools"] = tools
    return row


def _aligned(rows: list[Row], split_of: dict[str, str]) -> Splits:
    """Rows into the split their request's SFT row is in, each split ordered by row id."""
    splits: Splits = {"train": [], "validation": [], "test": []}
    for r in sorted(rows, key=lambda r: r["id"]):
        splits[split_of[r["request_id"]]].append(r)
    return splits


def _replay_source(db: Database, rec: DatasetRecord) -> Sequence[Row]:
    """The train split of ``rec`` as rows with ``messages``: SFT rows as they are, preference rows as
    prompt + chosen, KTO rows with label True as prompt + completion."""
    from tuneloop.dataset_store import kind_of_columns, load_splits

    src = load_splits(db, rec.id)
    train = src["train"] if "train" in src else next(iter(src.values()))
    kind = kind_of_columns(train.column_names)
    if kind == "sft":
        return cast("Sequence[Row]", train)
    out: list[Row] = []
    for r in train:
        if kind == "preference":
            out.append({**r, "messages": r["prompt"] + r["chosen"]})
        elif kind == "kto" and r["label"]:
            out.append({**r, "messages": r["prompt"] + r["completion"]})
    return out


def _replay_rows(train: Sequence[Row], n_train: int, cfg: SampleConfig) -> list[Row]:
    """A seeded draw from ``train`` (see :func:`_replay_source`), sized so it is ``replay_fraction`` of the final train rows."""
    want = round(n_train * cfg.replay_fraction / (1 - cfg.replay_fraction))
    want = min(want, len(train))
    idx = (
        sorted(np.random.default_rng(cfg.seed + 1).choice(len(train), size=want, replace=False).tolist())
        if want
        else []
    )
    out: list[Row] = []
    for j in idx:
        row = train[int(j)]
        out.append(
            _with_tools(
                {
                    "id": f"replay-{row.get('id') or j}",
                    "messages": row["messages"],
                    "request_id": row.get("request_id"),
                    "origin": "replay",
                },
                row.get("tools"),
            )
        )
    return out


def _preference_splits(
    picked: list[Candidate], split_of: dict[str, str], cfg: SampleConfig
) -> tuple[Splits | None, str | None]:
    """``<name>-pref``'s rows (prompt / chosen = correction / rejected = logged response), or None and why not."""
    if not cfg.preference:
        return None, "disabled (preference=False)"
    pairs = [
        c for c in picked if c.correction and c.response.strip() and normalise(c.correction) != normalise(c.response)
    ]
    if not pairs:
        return None, "no correction that differs from the served response"
    prow: list[Row] = [
        _with_tools(
            {
                "id": f"pref-{c.request_id}",
                "prompt": c.messages,
                "chosen": [{"role": "assistant", "content": c.correction}],
                "rejected": [{"role": "assistant", "content": c.response}],
                "request_id": c.request_id,
                "origin": "feedback",
            },
            c.tools,
        )
        for c in pairs
    ]
    psplits = _aligned(prow, split_of)
    if not psplits["train"]:
        return None, f"all {len(prow)} pair(s) belong to requests held out for validation/test"
    return psplits, None


def _kto_splits(
    picked: list[Candidate],
    negatives: list[Candidate],
    split_of: dict[str, str],
    replay_src: Sequence[Row] | None,
    cfg: SampleConfig,
) -> tuple[Splits | None, dict[str, Any], str | None]:
    """``<name>-kto``'s rows (see the module docstring), counts for its card, and why it is not written (or None)."""

    def row(c: Candidate, completion: str, label: bool) -> Row:
        return _with_tools(
            {
                "id": f"kto-{c.request_id}-{'d' if label else 'u'}",
                "prompt": c.messages,
                "completion": [{"role": "assistant", "content": completion}],
                "label": label,
                "request_id": c.request_id,
                "origin": "feedback",
            },
            c.tools,
        )

    aligned: list[Row] = []
    des = {"thumbs_up": 0, "corrections": 0, "replay": 0}
    und = {"thumbs_down_corrected": 0, "thumbs_down": 0}
    info: dict[str, Any] = {"desirable": des, "undesirable": und}
    desirable_keys: set[str] = set()
    for c in picked:
        if c.correction or c.feedback == "positive":
            aligned.append(row(c, c.target, True))
            des["corrections" if c.correction else "thumbs_up"] += 1
            desirable_keys.add(example_key(c.messages, c.target, c.tools))
        if (
            c.feedback == "negative"
            and c.correction
            and c.response.strip()
            and normalise(c.correction) != normalise(c.response)
        ):
            aligned.append(row(c, c.response, False))
            und["thumbs_down_corrected"] += 1
    # uncorrected thumbs-down: one per prompt + response (the newest), none that is also a desirable answer
    newest: dict[str, Candidate] = {}
    for c in sorted(negatives, key=lambda c: (c.received_at, c.request_id)):
        newest[example_key(c.messages, c.response, c.tools)] = c
    dropped = {"duplicates": len(negatives) - len(newest), "also_desirable": 0, "over_limit": 0}
    neg = [c for k, c in newest.items() if k not in desirable_keys]
    dropped["also_desirable"] = len(newest) - len(neg)
    neg.sort(key=lambda c: c.request_id)
    if len(neg) > cfg.limit:
        keep = np.random.default_rng(cfg.seed + 2).choice(len(neg), size=cfg.limit, replace=False)
        dropped["over_limit"] = len(neg) - cfg.limit
        neg = [neg[int(j)] for j in sorted(keep.tolist())]
    und["thumbs_down"] = len(neg)
    info["thumbs_down_dropped"] = dropped
    splits = _aligned(aligned, split_of)
    for split, rows in seeded_split([row(c, c.response, False) for c in neg], cfg).items():
        splits[split] = sorted(splits[split] + rows, key=lambda r: r["id"])
    n_des = sum(r["label"] for r in splits["train"])
    n_und = len(splits["train"]) - n_des
    info["train_desirable_feedback"], info["train_undesirable"] = n_des, n_und
    if n_des == 0 or n_und == 0:
        have = f"{des['thumbs_up']} thumbs-up, {des['corrections']} correction(s), {und['thumbs_down'] + und['thumbs_down_corrected']} thumbs-down"
        lacks = "desirable (thumbs-up or corrected)" if n_des == 0 else "undesirable (thumbs-down)"
        return None, info, f"KTO needs both labels and the train split has no {lacks} example ({have} in the sample)"
    if replay_src is not None:
        replay = _replay_rows(replay_src, len(splits["train"]), cfg)
        splits["train"].extend(
            _with_tools(
                {
                    "id": r["id"],
                    "prompt": r["messages"][:-1],
                    "completion": r["messages"][-1:],
                    "label": True,
                    "request_id": r["request_id"],
                    "origin": "replay",
                },
                r.get("tools"),
            )
            for r in replay
            if len(r["messages"]) > 1 and r["messages"][-1].get("role") == "assistant"
        )
        des["replay"] = len(splits["train"]) - n_des - n_und
    return splits, info, None


def _window(text: str) -> timedelta:
    """``--window`` as a timedelta; bad text is a :class:`SampleError` like every other bad sampling input."""
    try:
        return parse_duration(text)
    except UserError as e:
        raise SampleError(str(e)) from None


def _fmt_counts(counts: dict[str, int]) -> str:
    keys = (*FILTERS, "duplicates_within", "duplicates_of_earlier_sets")
    return ", ".join(f"{k}={counts[k]}" for k in keys if counts.get(k))
