"""Sample production traffic and feedback into new, registered training sets.

Contract
--------
:func:`sample` reads the request log (``requests``) joined with ``feedback``
from the database — or, with ``from_parquet``, from the Parquet exports of many
replicas (``tuneloop export logs``) read through
:func:`monitoring.sources.log_source`, which gives the same rows and so the
same dataset as one database holding them all — in a time window and
optionally for one model version, and writes up to two datasets through
:func:`tuneloop.dataset_store.save_dataset` (always into the database):

* an SFT dataset (``<name>``): one row per picked request, the prompt messages
  followed by the assistant answer — the user's *correction* when there is one,
  else the logged response;
* a preference dataset (``<name>-pref``, DPO, only when corrections exist):
  ``prompt`` / ``chosen`` = correction / ``rejected`` = logged response.

Every row keeps ``request_id`` (also recorded in ``dataset_rows``), so lineage
runs both ways (:func:`lineage`).

Pipeline, each step counted in the data card:

1. **Filters**: errors (HTTP status >= 400), client aborts (499), truncated
   answers (``finish_reason = length``, unless corrected), redacted prompts,
   empty answers, thumbs-down without a correction.
2. **PII scrub** of every message (:func:`tuneloop.pii.scrub`).
3. **Dedup within the sample** on the normalised prompt (the best row wins:
   corrected > positively rated > unrated, then the newest) and **against
   earlier training sets** on the normalised prompt + answer.
4. **Strategies with quotas**, applied in a fixed order, each picking from what
   the previous ones left; a strategy that cannot fill its quota passes the rest
   on: ``feedback`` (corrections first, then positive ratings), ``drift``
   (weighted towards requests far from the serving version's training data, by
   nearest-neighbour cosine distance of hashed bag-of-words vectors),
   ``stratified`` (balanced, hierarchically: model versions alternate, within a
   version length terciles alternate, within those topic clusters — topics by
   k-means on hashed bag-of-words), ``random``.
5. **Replay**: a share of rows from an earlier dataset's train split against
   forgetting (``replay_fraction`` of the final train rows).
6. **Deterministic split** (seeded): production rows into train/validation/test;
   replay rows only into train, so held-out numbers measure production.

Everything is deterministic for a given database content and seed, so a rerun
produces the same content hash (and therefore the same dataset id).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from tuneloop.db import Database, loads, utcnow
from tuneloop.errors import UserError
from tuneloop.monitoring.sources import LogSource, log_source

STRATEGIES = ("feedback", "drift", "stratified", "random")  # application order


class SampleError(UserError, ValueError):
    """A sampling request a user can fix (bad window, unknown strategy, nothing to sample ...)."""


@dataclass
class SampleConfig:
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
class Candidate:
    request_id: str
    received_at: datetime
    model_version: str | None
    messages: list[dict[str, str]]
    response: str
    correction: str | None
    feedback: str | None  # positive | negative | neutral | None
    tokens: int
    pii: dict[str, int] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return self.correction if self.correction else self.response

    @property
    def priority(self) -> int:
        return 2 if self.correction else (1 if self.feedback == "positive" else 0)

    def prompt_text(self) -> str:
        return "\n".join(m["content"] for m in self.messages if m.get("role") == "user")


@dataclass
class SampleResult:
    sft: Any  # tuneloop.registry.DatasetRecord
    preference: Any | None
    card: dict[str, Any]


# ---- parsing helpers ------------------------------------------------------------

_DUR = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    """``'30m'``, ``'1h'``, ``'2d'`` -> timedelta."""
    m = _DUR.match(text or "")
    if not m:
        raise SampleError(f"bad duration {text!r}: use a number and a unit s/m/h/d/w, e.g. 30m or 1h")
    return timedelta(seconds=float(m.group(1)) * _UNIT[m.group(2)])


def parse_time(text: str) -> datetime:
    """An ISO-8601 time (UTC if no zone) or ``-1h``-style offset from now -> naive UTC datetime."""
    t = text.strip()
    if t.startswith("-"):
        return utcnow() - parse_duration(t[1:])
    try:
        d = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise SampleError(f"bad time {text!r}: use ISO-8601 (2026-11-02T10:00) or an offset like -1h") from None
    if d.tzinfo is not None:
        d = d.astimezone(UTC).replace(tzinfo=None)
    return d


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
                raw[name] = float(share) if share else None
            except ValueError:
                raise SampleError(f"strategy {name}: share must be a number, got {share!r}") from None
            if raw[name] is not None and raw[name] < 0:
                raise SampleError(f"strategy {name}: share must be >= 0")
    given = sum(v for v in raw.values() if v is not None)
    bare = [k for k, v in raw.items() if v is None]
    rest = max(0.0, 1.0 - given) if given <= 1 else 0.0
    for k in bare:
        raw[k] = rest / len(bare) if given > 0 else 1.0 / len(bare)
    total = sum(raw.values())  # type: ignore[arg-type]
    if total <= 0:
        raise SampleError("strategy shares add up to 0")
    return {k: float(v) / total for k, v in raw.items()}  # type: ignore[arg-type]


# ---- normalisation and hashing -----------------------------------------------------

_WS = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s<>]")
_TOKEN = re.compile(r"[a-z0-9']+")


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed (the dedup key's text)."""
    return _WS.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


def prompt_key(messages: list[dict[str, str]]) -> str:
    """Hash of the normalised non-assistant-final conversation (role + content)."""
    h = hashlib.sha256()
    for m in messages:
        h.update(f"{m.get('role')}\0{normalise(m.get('content') or '')}\0".encode())
    return h.hexdigest()


def example_key(messages: list[dict[str, str]], answer: str) -> str:
    """Hash of the normalised prompt and answer (dedup against earlier training sets)."""
    return hashlib.sha256((prompt_key(messages) + "\0" + normalise(answer)).encode()).hexdigest()


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


# ---- reading candidates ----------------------------------------------------------------

_SQL = """
SELECT r.id, r.received_at, r.route, r.model_version, r.prompt, r.response, r.finish_reason, r.status,
       r.prompt_tokens, r.completion_tokens, f.correction, f.rating, f.rating_kind
FROM requests r
LEFT JOIN (
    SELECT request_id,
           arg_max(correction, created_at) FILTER (WHERE correction IS NOT NULL AND trim(correction) <> '') AS correction,
           arg_max(rating, created_at) FILTER (WHERE rating IS NOT NULL) AS rating,
           arg_max(rating_kind, created_at) FILTER (WHERE rating IS NOT NULL) AS rating_kind
    FROM feedback GROUP BY request_id
) f ON f.request_id = r.id
WHERE r.received_at >= ? AND r.received_at < ? {version}
ORDER BY r.received_at, r.id
"""


def rating_label(rating: float | None, kind: str | None) -> str | None:
    """-1/+1 thumbs or 1..5 stars -> positive | negative | neutral (None without a rating)."""
    if rating is None:
        return None
    kind = (kind or "").lower()
    if kind == "stars" or (kind != "thumbs" and rating > 1):
        return "positive" if rating >= 4 else ("negative" if rating <= 2 else "neutral")
    return "positive" if rating > 0 else ("negative" if rating < 0 else "neutral")


def prompt_messages(prompt: Any) -> list[dict[str, str]] | None:
    """The logged ``requests.prompt`` (messages list, ``{"messages": ...}`` or completion text) as chat messages."""
    p = loads(prompt) if isinstance(prompt, str) else prompt
    if isinstance(p, str):
        try:  # a JSON column can hold a JSON string holding JSON
            p2 = json.loads(p)
            p = p2 if isinstance(p2, (list, dict)) else p
        except ValueError:
            pass
    if isinstance(p, dict):
        p = p.get("messages", p.get("prompt"))
    if isinstance(p, str):
        return [{"role": "user", "content": p}] if p.strip() else None
    if isinstance(p, list) and p and all(isinstance(m, dict) for m in p):
        out = []
        for m in p:
            content = m.get("content")
            if isinstance(content, list):  # OpenAI content parts
                content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
            out.append({"role": str(m.get("role", "user")), "content": str(content or "")})
        while out and out[-1]["role"] == "assistant":  # a trailing assistant prefill is not part of the prompt
            out.pop()
        return out or None
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        return [{"role": "user", "content": p[0]}]
    return None


def read_candidates(
    db: Database | LogSource, since: datetime, until: datetime, model_version: str | None, counts: dict[str, int]
) -> list[Candidate]:
    """Requests in the window that survive the filters; ``counts`` gets one entry per filter.

    ``db`` is anything with ``query(sql, params)``: the database, or a log source over Parquet exports.
    """
    sql = _SQL.format(version="AND r.model_version = ?" if model_version else "")
    params: list[Any] = [since, until] + ([model_version] if model_version else [])
    rows = db.query(sql, params)
    counts["requests_in_window"] = len(rows)
    for k in ("error", "aborted", "truncated", "redacted", "empty", "negative_feedback"):
        counts.setdefault(k, 0)
    out: list[Candidate] = []
    for r in rows:
        status = int(r["status"])
        correction = (r["correction"] or "").strip() or None
        label = rating_label(r["rating"], r["rating_kind"])
        if status == 499:
            counts["aborted"] += 1
            continue
        if status >= 400:
            counts["error"] += 1
            continue
        if r["finish_reason"] == "length" and not correction:
            counts["truncated"] += 1
            continue
        msgs = prompt_messages(r["prompt"])
        if not msgs:
            counts["redacted"] += 1
            continue
        response = r["response"] or ""
        if not response.strip() and not correction:
            counts["empty"] += 1
            continue
        if label == "negative" and not correction:
            counts["negative_feedback"] += 1
            continue
        tokens = int(r["prompt_tokens"] or 0) + int(r["completion_tokens"] or 0)
        if tokens == 0:
            tokens = (sum(len(m["content"]) for m in msgs) + len(response)) // 4
        out.append(Candidate(r["id"], r["received_at"], r["model_version"], msgs, response, correction, label, tokens))
    return out


def scrub_candidates(cands: list[Candidate], counts: dict[str, int]) -> None:
    """Scrub PII in place from every prompt message, response and correction; add totals to ``counts``."""
    from tuneloop.pii import scrub

    total: dict[str, int] = {}

    def s(text: str, c: Candidate) -> str:
        clean, found = scrub(text)
        for k, v in found.items():
            if v:
                total[k] = total.get(k, 0) + v
                c.pii[k] = c.pii.get(k, 0) + v
        return clean

    for c in cands:
        c.messages = [{"role": m["role"], "content": s(m["content"], c)} for m in c.messages]
        c.response = s(c.response, c)
        if c.correction:
            c.correction = s(c.correction, c)
    counts.update({f"pii_{k}": v for k, v in sorted(total.items())})
    counts["rows_with_pii"] = sum(1 for c in cands if c.pii)


def dedup_within(cands: list[Candidate]) -> tuple[list[Candidate], int]:
    """One row per normalised prompt: corrected > positive > unrated, then newest."""
    best: dict[str, Candidate] = {}
    for c in cands:
        k = prompt_key(c.messages)
        b = best.get(k)
        if b is None or (c.priority, c.received_at, c.request_id) > (b.priority, b.received_at, b.request_id):
            best[k] = c
    kept = sorted(best.values(), key=lambda c: (c.received_at, c.request_id))
    return kept, len(cands) - len(kept)


def earlier_keys(db: Database, refs: list[str] | None) -> tuple[set[str], list[str]]:
    """Example keys of every row of the given datasets (None = every registered SFT dataset)."""
    from tuneloop.dataset_store import load_splits
    from tuneloop.registry import get_dataset, list_datasets

    if refs is None:
        recs = [d for d in list_datasets(db) if d.kind == "sft"]
    else:
        recs = [get_dataset(db, r) for r in refs]
    keys: set[str] = set()
    for rec in recs:
        dd = load_splits(db, rec.id)
        for split in dd:
            for row in dd[split]:
                msgs = row.get("messages") or []
                if msgs and msgs[-1].get("role") == "assistant":
                    keys.add(example_key(msgs[:-1], msgs[-1].get("content") or ""))
    return keys, [r.id for r in recs]


# ---- strategies ------------------------------------------------------------------------------


def _pick_feedback(cands: list[Candidate], pool: list[int], n: int, rng: np.random.Generator, ctx) -> list[int]:
    corrected = [i for i in pool if cands[i].correction]
    positive = [i for i in pool if not cands[i].correction and cands[i].feedback == "positive"]
    rng.shuffle(corrected)
    rng.shuffle(positive)
    return (corrected + positive)[:n]


def _pick_random(cands, pool, n, rng, ctx) -> list[int]:
    if n >= len(pool):
        return list(pool)
    return [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]


def _pick_drift(cands, pool, n, rng, ctx) -> list[int]:
    if n >= len(pool):
        return list(pool)
    w = np.array([max(ctx.drift_scores[i], 1e-6) for i in pool], dtype=np.float64)
    # Efraimidis-Spirakis weighted sampling without replacement: keys u^(1/w)
    keys = rng.random(len(pool)) ** (1.0 / (w / w.max()))
    order = np.argsort(-keys, kind="stable")[:n]
    return [pool[i] for i in order]


def _pick_stratified(cands, pool, n, rng, ctx) -> list[int]:
    """Hierarchical round-robin: alternate model versions, within one alternate length terciles, then topics."""
    tree: dict = {}
    for i in pool:
        node = tree
        for level in ctx.strata[i][:-1]:
            node = node.setdefault(level, {})
        node.setdefault(ctx.strata[i][-1], []).append(i)

    def shuffled(node):
        if isinstance(node, list):
            rng.shuffle(node)
            return
        for k in sorted(node, key=str):
            shuffled(node[k])

    def rr(node):
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


_PICKERS = {"feedback": _pick_feedback, "drift": _pick_drift, "stratified": _pick_stratified, "random": _pick_random}


@dataclass
class _Ctx:
    strata: dict[int, tuple] = field(default_factory=dict)
    drift_scores: dict[int, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def length_terciles(tokens: list[int]) -> list[str]:
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
    """Per candidate: 1 - max cosine similarity (hashed BoW) to the user prompts its version was trained on."""
    from tuneloop.dataset_store import load_splits

    scores = [1.0] * len(cands)
    by_version: dict[str | None, list[int]] = {}
    for i, c in enumerate(cands):
        by_version.setdefault(c.model_version, []).append(i)
    for version, idx in by_version.items():
        ref_texts: list[str] = []
        rows = db.query("SELECT dataset_id FROM model_versions WHERE name = ?", [version]) if version else []
        if rows and rows[0]["dataset_id"]:
            dd = load_splits(db, rows[0]["dataset_id"])
            split = dd["train"] if "train" in dd else next(iter(dd.values()))
            for row in split:
                msgs = row.get("messages") or row.get("prompt") or []
                ref_texts.append("\n".join(m.get("content") or "" for m in msgs if m.get("role") == "user"))
        if not ref_texts:
            notes.append(f"drift: no training data recorded for version {version!r}; its requests are weighted equally")
            continue
        ref = hashed_bow(ref_texts)
        q = hashed_bow([cands[i].prompt_text() for i in idx])
        best = np.zeros(len(idx), dtype=np.float32)
        for s in range(0, len(ref), 2048):
            best = np.maximum(best, (q @ ref[s : s + 2048].T).max(axis=1))
        for j, i in enumerate(idx):
            scores[i] = float(1.0 - best[j])
    return scores


def allocate(strategies: dict[str, float], limit: int) -> dict[str, int]:
    """Row quota per strategy (largest remainder, total = limit)."""
    raw = {k: strategies[k] * limit for k in STRATEGIES if k in strategies}
    out = {k: math.floor(v) for k, v in raw.items()}
    rest = limit - sum(out.values())
    for k in sorted(raw, key=lambda k: raw[k] - out[k], reverse=True)[:rest]:
        out[k] += 1
    return out


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

    from tuneloop.dataset_store import load_splits, save_dataset
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
    since = cfg.since or (until - parse_duration(cfg.window) if cfg.window else datetime(1970, 1, 1))
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

    rng = np.random.default_rng(cfg.seed)
    ctx = _Ctx()
    if "stratified" in strategies:
        terc = length_terciles([c.tokens for c in cands])
        topics = topic_clusters([c.prompt_text() for c in cands], cfg.topics, cfg.seed)
        ctx.strata = {i: (cands[i].model_version or "-", terc[i], topics[i]) for i in range(len(cands))}
    if "drift" in strategies:
        ctx.drift_scores = dict(enumerate(drift_scores(db, cands, ctx.notes)))
    quotas = allocate(strategies, min(cfg.limit, len(cands)))
    pool = list(range(len(cands)))
    picked: list[tuple[int, str]] = []
    per_strategy: dict[str, dict[str, int]] = {}
    carry = 0
    for name in STRATEGIES:
        if name not in quotas:
            continue
        want = quotas[name] + carry
        got = _PICKERS[name](cands, pool, want, rng, ctx)
        taken = set(got)
        pool = [i for i in pool if i not in taken]
        picked.extend((i, name) for i in got)
        per_strategy[name] = {"quota": quotas[name], "carried_in": carry, "picked": len(got)}
        carry = want - len(got)
    steps.update()

    rows: list[dict[str, Any]] = []
    strategy_of: dict[str, str] = {}
    for i, name in picked:
        c = cands[i]
        origin = "feedback" if (c.correction or c.feedback == "positive") else "production"
        rid = f"req-{c.request_id}"
        strategy_of[rid] = name
        rows.append(
            {
                "id": rid,
                "messages": c.messages + [{"role": "assistant", "content": c.target}],
                "request_id": c.request_id,
                "origin": origin,
            }
        )
    assign = split_ids([r["id"] for r in rows], cfg.validation_fraction, cfg.test_fraction, cfg.seed)
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for r in sorted(rows, key=lambda r: r["id"]):
        splits[assign[r["id"]]].append(r)

    replay_n = 0
    if replay_rec is not None and cfg.replay_fraction > 0:
        src = load_splits(db, replay_rec.id)
        train = src["train"] if "train" in src else next(iter(src.values()))
        want = round(len(splits["train"]) * cfg.replay_fraction / (1 - cfg.replay_fraction))
        want = min(want, len(train))
        idx = (
            sorted(np.random.default_rng(cfg.seed + 1).choice(len(train), size=want, replace=False).tolist())
            if want
            else []
        )
        for j in idx:
            row = train[int(j)]
            splits["train"].append(
                {
                    "id": f"replay-{row.get('id') or j}",
                    "messages": row["messages"],
                    "request_id": row.get("request_id"),
                    "origin": "replay",
                }
            )
        replay_n = len(idx)
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

    pref = None
    pairs = [
        cands[i]
        for i, _ in picked
        if cands[i].correction
        and cands[i].response.strip()
        and normalise(cands[i].correction) != normalise(cands[i].response)
    ]
    if cfg.preference and pairs:
        prow = [
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
        passign = split_ids([r["id"] for r in prow], cfg.validation_fraction, cfg.test_fraction, cfg.seed)
        psplits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
        for r in sorted(prow, key=lambda r: r["id"]):
            psplits[passign[r["id"]]].append(r)
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
        pref = save_dataset(db, home, f"{cfg.name}-pref", psplits, "preference", pcard, source, [sft.id])
        card["preference_dataset"] = pref.id
    steps.update()
    steps.close()
    return SampleResult(sft=sft, preference=pref, card=card)


def _cfg_dict(cfg: SampleConfig) -> dict[str, Any]:
    from tuneloop.config import to_dict

    return {k: (str(v) if isinstance(v, datetime) else v) for k, v in to_dict(cfg).items()}


def _fmt_counts(counts: dict[str, int]) -> str:
    keys = (
        "error",
        "aborted",
        "truncated",
        "redacted",
        "empty",
        "negative_feedback",
        "duplicates_within",
        "duplicates_of_earlier_sets",
    )
    return ", ".join(f"{k}={counts[k]}" for k in keys if counts.get(k))


# ---- lineage --------------------------------------------------------------------------------------


def lineage(db: Database, ref: str) -> dict[str, Any]:
    """Lineage of a request id or a model version, both directions.

    For a request: the version that served it, that version's chain (dataset ->
    source requests, parent versions), and forwards: the datasets that include
    the request and the versions trained on them. For a version: the same chain.
    """
    req = db.query("SELECT id, received_at, model_version, arm, status FROM requests WHERE id = ?", [ref])
    if req:
        r = req[0]
        used_in = db.query(
            """SELECT DISTINCT dr.dataset_id, dr.split, dr.origin FROM dataset_rows dr WHERE dr.request_id = ?
               ORDER BY dr.dataset_id""",
            [ref],
        )
        ds_ids = sorted({u["dataset_id"] for u in used_in})
        trained = (
            db.query(
                f"SELECT name, stage, dataset_id FROM model_versions WHERE dataset_id IN ({','.join('?' * len(ds_ids))}) ORDER BY created_at",
                ds_ids,
            )
            if ds_ids
            else []
        )
        served_by = _version_chain(db, r["model_version"]) if r["model_version"] else []
        return {
            "request": {k: (str(v) if k.endswith("_at") else v) for k, v in r.items()},
            "served_by": served_by,
            "used_in_datasets": used_in,
            "trained_versions": trained,
        }
    v = db.query("SELECT name FROM model_versions WHERE name = ?", [ref])
    if v:
        return {"version": ref, "chain": _version_chain(db, ref)}
    raise SampleError(f"{ref!r} is neither a logged request id nor a registered model version")


def _version_chain(db: Database, name: str) -> list[dict[str, Any]]:
    chain = []
    seen = set()
    while name and name not in seen:
        seen.add(name)
        rows = db.query(
            "SELECT name, kind, stage, base_model, dataset_id, run_id, parent_version FROM model_versions WHERE name = ?",
            [name],
        )
        if not rows:
            chain.append({"version": name, "registered": False})
            break
        v = rows[0]
        entry: dict[str, Any] = {
            "version": v["name"],
            "kind": v["kind"],
            "stage": v["stage"],
            "base_model": v["base_model"],
            "run_id": v["run_id"],
            "dataset": None,
        }
        if v["dataset_id"]:
            entry["dataset"] = _dataset_lineage(db, v["dataset_id"])
        chain.append(entry)
        name = v["parent_version"]
    return chain


def _dataset_lineage(db: Database, dataset_id: str, depth: int = 0) -> dict[str, Any]:
    d = db.query("SELECT id, kind, parent_ids FROM datasets WHERE id = ?", [dataset_id])
    counts = db.query(
        """SELECT origin, count(*) AS n, count(request_id) AS with_request FROM dataset_rows WHERE dataset_id = ?
           GROUP BY origin ORDER BY origin""",
        [dataset_id],
    )
    reqs = [
        r["request_id"]
        for r in db.query(
            "SELECT DISTINCT request_id FROM dataset_rows WHERE dataset_id = ? AND request_id IS NOT NULL ORDER BY request_id",
            [dataset_id],
        )
    ]
    out: dict[str, Any] = {
        "id": dataset_id,
        "kind": d[0]["kind"] if d else None,
        "rows_by_origin": {c["origin"]: c["n"] for c in counts},
        "source_requests": reqs,
        "parents": [],
    }
    if d and depth < 5:
        for p in loads(d[0]["parent_ids"]) or []:
            out["parents"].append(_dataset_lineage(db, p, depth + 1))
    return out
