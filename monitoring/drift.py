"""Drift of a model version's production traffic against its training data.

Contract
--------
* The statistics themselves (PSI, KS, Wasserstein, Jensen-Shannon, MMD² and
  the null calibration) are pure functions in :mod:`monitoring.drift_stats`;
  this module aggregates windows and compares them with a profile.
* :func:`production_stats` aggregates one production window of the
  ``requests`` table (per model version; last N minutes/hours or last N
  requests, see :func:`parse_window`) with DuckDB SQL: prompt/response token
  length value counts, word counts joined to the reference vocabulary, the
  finish_reason=length and empty-response shares, negative feedback, and a
  random sample of prompt texts for embeddings. Words of a window larger than
  ``word_sample`` requests are counted on a deterministic uniform subset
  (hash of the request id); everything else uses every request. The
  embedding sample is also chosen (and ordered) by a hash of the request id
  and the seed. So the statistics depend only on the window's rows, not on
  where they are read from or in which order: the DuckDB file, PostgreSQL
  rows copied into DuckDB (:class:`monitoring.sources.LogSource`) or Parquet
  exports give the same values. The SQL is DuckDB SQL and runs on a DuckDB
  connection; only :data:`WINDOW_START_SQL` (a request-count window's first
  request) is portable, so a caller can find the window on PostgreSQL before
  copying it.
* :func:`compare` turns a reference profile (:mod:`monitoring.profile`) and a
  :class:`ProductionStats` into a :class:`DriftResult`: one
  :class:`FeatureResult` per statistic with its value, threshold and drifted
  flag, and an overall score (share of evaluated statistics that drifted;
  drifted at or above ``DriftSettings.overall_threshold``).
* Finite-sample honesty: PSI and JS are biased upwards on small windows, so
  their effective threshold is the configured one or the 99th percentile of
  the statistic between the reference and same-sized multinomial samples drawn
  from it, whichever is larger (both are reported in ``details``).
* Classifiers (``classify`` traffic, :func:`classify_stats` and
  :func:`compare_classify`): drift of the *predicted-label distribution*
  against the version's training labels (the data card's ``labels``
  ``{label: count}``): Jensen-Shannon divergence (bits) with the same
  finite-sample threshold as the vocabulary (configured ``js_threshold`` or
  the null q99 of same-sized multinomial samples of the reference, whichever
  is larger), the chi-square goodness-of-fit p-value in ``details``; and
  drift of *confidence* (each input's highest probability) against a
  reference window of the version's own production traffic: its first
  :data:`CONFIDENCE_REFERENCE_REQUESTS` classified inputs that precede the
  window (PSI ``confidence_psi`` with the null-calibrated threshold, KS
  ``confidence_ks``). Training labels say nothing about the model's
  confidence, and validation predictions are not stored, so the first
  traffic a version served is the baseline; confidence drift is evaluated
  once that reference has at least ``min_requests`` inputs and lies wholly
  before the window (until then only the label distribution is).
* Words are ``[a-z0-9']+`` runs of the lower-cased prompt text (the same regex
  in Python and DuckDB SQL); a prompt's text is its messages' contents joined
  by spaces (or the prompt string of a completion request).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

from tuneloop.errors import UserError
from tuneloop.monitoring.drift_stats import (
    js_divergence,
    ks_counts,
    mmd_permutation_test,
    null_quantile,
    psi_counts,
    psi_from_bins,
    wasserstein_counts,
)
from tuneloop.ratings import negative_sql
from tuneloop.timeparse import duration_s

if TYPE_CHECKING:
    import duckdb

    from tuneloop.settings import DriftSettings

WORD_PATTERN = "[a-z0-9']+"
_WORD_RE = re.compile(WORD_PATTERN)
OOV = "<oov>"


def words(text: str) -> list[str]:
    """The words of ``text`` as drift counts them (lower-cased ``[a-z0-9']+`` runs)."""
    return _WORD_RE.findall(text.lower())


def prompt_text(prompt: Any) -> str:
    """Text of a logged/training prompt: message contents joined by spaces, or the prompt string."""
    if prompt is None:
        return ""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return " ".join(str(m.get("content") or "") if isinstance(m, dict) else str(m) for m in prompt)
    return str(prompt)


# ---- windows and production aggregation -------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """A production window: the last ``seconds`` of traffic, or the last ``requests`` requests."""

    seconds: float | None = None
    requests: int | None = None

    def __str__(self) -> str:
        return f"{self.requests}r" if self.requests else f"{self.seconds:g}s"

    def duration(self) -> timedelta:
        """The length of a duration window (a request-count window has none: ValueError)."""
        if self.seconds is None:
            raise ValueError(f"window {self} is a request count, not a duration")
        return timedelta(seconds=self.seconds)


_REQUESTS_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*r\s*")


def parse_window(text: str) -> Window:
    """'30m', '1h', '2d', '90s' (a duration, :mod:`tuneloop.timeparse`) or '500r' (the last 500 requests)."""
    t = str(text).lower()
    m = _REQUESTS_RE.fullmatch(t)
    try:
        if m is None:
            return Window(seconds=duration_s(t))
        if float(m.group(1)) > 0:
            return Window(requests=int(float(m.group(1))))
    except UserError:
        pass
    raise UserError(f"bad window {text!r}: use a duration like 30m, 1h, 2d or a request count like 500r")


@dataclass
class ProductionStats:
    """Aggregates of one version's production window (see :func:`production_stats`)."""

    model_version: str
    n_requests: int
    window_start: datetime | None
    window_end: datetime | None
    prompt_len: tuple[np.ndarray, np.ndarray] = field(default_factory=lambda: (np.zeros(0), np.zeros(0)))
    response_len: tuple[np.ndarray, np.ndarray] = field(default_factory=lambda: (np.zeros(0), np.zeros(0)))
    vocab_counts: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per reference vocab index
    oov_tokens: int = 0
    total_tokens: int = 0
    new_words: list[tuple[str, int]] = field(default_factory=list)
    finish_length: int = 0
    empty: int = 0
    rated: int = 0
    negative: int = 0
    texts: list[str] = field(default_factory=list)
    word_requests: int = 0  # requests whose words were counted (all of them unless word_sample bounded it)


_TEXT_SQL = (
    "CASE WHEN json_type(prompt) = 'ARRAY' THEN array_to_string(json_extract_string(prompt, '$[*].content'), ' ') "
    "ELSE json_extract_string(prompt, '$') END"
)


# the oldest of a version's last N served requests: portable SQL (DuckDB and PostgreSQL alike)
WINDOW_START_SQL = """SELECT min(received_at) AS start FROM (
    SELECT received_at FROM requests WHERE model_version = ? AND status < 400 AND received_at <= ?
    ORDER BY received_at DESC LIMIT ?) AS last_n"""


def window_bounds(con: Any, version: str, window: Window, now: datetime) -> tuple[datetime | None, datetime]:
    """(start, end) of the window; a request-count window starts at its oldest request. ``con`` is anything
    with ``execute(sql, params)``: a DuckDB connection, or a backend connection (the SQL is portable)."""
    if window.requests:
        row = con.execute(WINDOW_START_SQL, [version, now, window.requests]).fetchall()[0]
        return row[0], now
    return now - window.duration(), now


def production_stats(
    con: duckdb.DuckDBPyConnection,
    version: str,
    window: Window,
    vocab: Sequence[str],
    now: datetime,
    text_sample: int = 0,
    seed: int = 0,
    word_sample: int = 0,
) -> ProductionStats:
    """Aggregate the window of ``version`` with DuckDB SQL (see module doc); ``con`` is an open connection.

    ``word_sample`` > 0 bounds the requests whose prompt words are counted: a window with more
    requests has its words counted on a uniform pseudo-random subset of about that many requests,
    chosen by a hash of the request id (so the same rows are picked from any source, on any thread
    count). Lengths, shares and feedback always use every request of the window.
    """
    start, end = window_bounds(con, version, window, now)
    if start is None:
        return ProductionStats(version, 0, None, end)
    where = "model_version = ? AND status < 400 AND received_at >= ? AND received_at <= ?"
    params = [version, start, end]
    n, flen, empty = con.execute(
        f"""SELECT count(*), count(*) FILTER (WHERE finish_reason = 'length'),
                   count(*) FILTER (WHERE coalesce(response, '') = '' AND coalesce(completion_tokens, 0) <= 1)
            FROM requests WHERE {where}""",
        params,
    ).fetchall()[0]

    def value_counts(col: str) -> tuple[np.ndarray, np.ndarray]:
        rows = con.execute(
            f"SELECT {col}, count(*) FROM requests WHERE {where} AND {col} IS NOT NULL GROUP BY 1", params
        ).fetchnumpy()
        vals = list(rows.values())
        return np.asarray(vals[0], dtype=float), np.asarray(vals[1], dtype=np.int64)

    word_where, sampled = where, int(n)
    if word_sample and n > word_sample:  # ~word_sample requests: hash(id) is uniform on [0, 2^64)
        buckets = 1_000_003
        keep = max(1, round(buckets * word_sample / n))
        word_where = f"{where} AND hash(id) % {buckets} < {keep}"
        sampled = int(con.execute(f"SELECT count(*) FROM requests WHERE {word_where}", params).fetchall()[0][0])

    import pyarrow as pa

    vt = pa.table({"word": list(vocab), "idx": np.arange(len(vocab), dtype=np.int32)})
    con.register("_tl_vocab", vt)
    try:
        wc = con.execute(
            f"""WITH w AS (SELECT unnest(regexp_extract_all(lower({_TEXT_SQL}), '{WORD_PATTERN.replace("'", "''")}')) AS word
                           FROM requests WHERE {word_where} AND prompt IS NOT NULL),
                    c AS (SELECT word, count(*) AS n FROM w GROUP BY word)
               SELECT c.word, c.n, v.idx FROM c LEFT JOIN _tl_vocab v USING (word) ORDER BY c.word""",
            params,
        ).fetchnumpy()
    finally:
        con.unregister("_tl_vocab")
    idx = wc["idx"]  # a masked array: words outside the vocabulary are NULL (masked)
    cnt = np.asarray(wc["n"], dtype=np.int64)
    in_vocab = ~np.ma.getmaskarray(idx)
    idx = np.ma.getdata(idx)
    vocab_counts = np.bincount(np.asarray(idx[in_vocab], dtype=np.int64), weights=cnt[in_vocab], minlength=len(vocab))
    oov_words = np.asarray(wc["word"], dtype=object)[~in_vocab]
    oov_cnt = cnt[~in_vocab]
    top = np.argsort(-oov_cnt, kind="stable")[:20]  # rows come sorted by word: ties break alphabetically
    rated, negative = con.execute(
        f"""SELECT count(*), count(*) FILTER (WHERE {negative_sql("f.rating", "f.rating_kind")})
            FROM feedback f JOIN requests r ON r.id = f.request_id
            WHERE r.{where.replace(" AND ", " AND r.")} AND f.rating IS NOT NULL""",
        params,
    ).fetchall()[0]
    texts: list[str] = []
    if text_sample:
        # the first text_sample requests in hash(id, seed) order: the same rows, in the same order, from any source
        texts = [
            r[0]
            for r in con.execute(
                f"""SELECT {_TEXT_SQL} AS t FROM requests WHERE {where} AND prompt IS NOT NULL
                ORDER BY hash(id || ?), id LIMIT {int(text_sample)}""",
                [*params, f":{int(seed)}"],
            ).fetchall()
            if r[0]
        ]
    return ProductionStats(
        model_version=version,
        n_requests=int(n),
        window_start=start,
        window_end=end,
        prompt_len=value_counts("prompt_tokens"),
        response_len=value_counts("completion_tokens"),
        vocab_counts=vocab_counts.astype(float),
        oov_tokens=int(oov_cnt.sum()),
        total_tokens=int(cnt.sum()),
        new_words=[(str(oov_words[i]), int(oov_cnt[i])) for i in top],
        finish_length=int(flen),
        empty=int(empty),
        rated=int(rated),
        negative=int(negative),
        texts=texts,
        word_requests=sampled,
    )


# ---- classifiers ----------------------------------------------------------------------------

#: size of the confidence reference window: a version's first classified inputs (see module doc)
CONFIDENCE_REFERENCE_REQUESTS = 500
#: the confidence of a logged classify row: its highest probability (DuckDB SQL over the ``scores`` JSON)
CONFIDENCE_SQL = "list_max(CAST(json_extract(scores, '$.*') AS DOUBLE[]))"
_CLASSIFY_WHERE = "model_version = ? AND route = 'classify' AND status < 400 AND scores IS NOT NULL"

# the span of a version's first N classified inputs before a time: portable SQL (the confidence reference)
REFERENCE_SPAN_SQL = f"""SELECT min(received_at) AS start, max(received_at) AS "end", count(*) AS n FROM (
    SELECT received_at FROM requests WHERE {_CLASSIFY_WHERE} AND received_at < ?
    ORDER BY received_at LIMIT ?) AS first_n"""


@dataclass
class ClassifyStats:
    """Aggregates of one classifier version's window (see :func:`classify_stats`)."""

    model_version: str
    n_requests: int  # classified inputs (one logged row each)
    window_start: datetime | None
    window_end: datetime | None
    labels: dict[str, int] = field(default_factory=dict)  # predicted label -> inputs
    confidence: np.ndarray = field(default_factory=lambda: np.zeros(0))
    reference_confidence: np.ndarray = field(default_factory=lambda: np.zeros(0))
    reference_start: datetime | None = None
    reference_end: datetime | None = None


def classify_stats(
    con: duckdb.DuckDBPyConnection | None, version: str, start: datetime | None, end: datetime
) -> ClassifyStats:
    """Predicted-label counts and confidences of ``version``'s classified inputs in ``[start, end]`` (DuckDB SQL
    on an open connection; ``start`` None: an empty window)."""
    if start is None or con is None:
        return ClassifyStats(version, 0, None, end)
    where = f"{_CLASSIFY_WHERE} AND received_at >= ? AND received_at <= ?"
    params = [version, start, end]
    labels = {
        str(label): int(n)
        for label, n in con.execute(
            f"SELECT coalesce(response, ''), count(*) FROM requests WHERE {where} GROUP BY 1 ORDER BY 1", params
        ).fetchall()
    }
    return ClassifyStats(version, sum(labels.values()), start, end, labels, confidences(con, version, start, end))


def confidences(con: duckdb.DuckDBPyConnection, version: str, start: datetime, end: datetime) -> np.ndarray:
    """Confidence (highest probability) of each of ``version``'s classified inputs in ``[start, end]``."""
    rows = con.execute(
        f"SELECT {CONFIDENCE_SQL} AS c FROM requests WHERE {_CLASSIFY_WHERE} AND received_at >= ? "
        "AND received_at <= ? ORDER BY received_at, id",
        [version, start, end],
    ).fetchall()
    return np.asarray([r[0] for r in rows if r[0] is not None], dtype=float)


def _result(
    result_id: str,
    prod: ClassifyStats | ProductionStats,
    window: str,
    feats: list[FeatureResult],
    settings: DriftSettings,
    hist: dict[str, Any],
    **extra: Any,
) -> DriftResult:
    """The window's result: its overall score is the share of drifted features, drifted at the threshold."""
    score = sum(f.drifted for f in feats) / len(feats) if feats else 0.0
    return DriftResult(
        id=result_id,
        model_version=prod.model_version,
        window=window,
        window_start=prod.window_start,
        window_end=prod.window_end,
        n_requests=prod.n_requests,
        features=feats,
        score=score,
        threshold=settings.overall_threshold,
        drifted=bool(feats) and score >= settings.overall_threshold,
        histograms=hist,
        **extra,
    )


def compare_classify(
    reference_labels: dict[str, int],
    prod: ClassifyStats,
    settings: DriftSettings,
    result_id: str,
    window: str = "",
    seed: int = 0,
) -> DriftResult:
    """Label-distribution and confidence drift of a classifier window (see module doc)."""
    rng = np.random.default_rng(seed)
    feats: list[FeatureResult] = []
    hist: dict[str, Any] = {}
    names = sorted(set(reference_labels) | set(prod.labels))
    ref = np.asarray([float(reference_labels.get(n, 0)) for n in names])
    cur = np.asarray([float(prod.labels.get(n, 0)) for n in names])
    if ref.sum() > 0 and cur.sum() > 0:
        from scipy.stats import chisquare

        value = js_divergence(ref, cur)
        null = null_quantile(lambda s: js_divergence(ref, s), ref, int(cur.sum()), rng)
        thr = max(settings.js_threshold, null)
        expected = (ref + 0.5) / (ref + 0.5).sum() * cur.sum()  # smoothed: a label unseen in training is possible
        chi = chisquare(cur, expected)
        feats.append(
            FeatureResult(
                "label_distribution",
                "js",
                value,
                thr,
                value > thr,
                {
                    "configured_threshold": settings.js_threshold,
                    "null_q99": null,
                    "chi2": float(chi.statistic),
                    "chi2_pvalue": float(chi.pvalue),
                    "reference_shares": dict(zip(names, (ref / ref.sum()).tolist())),
                    "production_shares": dict(zip(names, (cur / cur.sum()).tolist())),
                    "production_counts": {n: int(c) for n, c in zip(names, cur)},
                },
            )
        )
    rc, pc = prod.reference_confidence, prod.confidence
    if len(rc) >= max(2, int(settings.min_requests)) and len(pc):
        rv, rcounts = np.unique(rc, return_counts=True)
        pv, pcounts = np.unique(pc, return_counts=True)
        value, edges, rb, pb = psi_counts(rv, rcounts, pv, pcounts, int(settings.psi_bins))
        null = null_quantile(lambda s: psi_from_bins(rb, s), rb, len(pc), rng)
        thr = max(settings.psi_threshold, null)
        span = {
            "reference_inputs": len(rc),
            "reference_start": prod.reference_start.isoformat() if prod.reference_start else None,
            "reference_end": prod.reference_end.isoformat() if prod.reference_end else None,
            "reference_mean": float(rc.mean()),
            "production_mean": float(pc.mean()),
        }
        feats.append(
            FeatureResult(
                "confidence_psi",
                "psi",
                value,
                thr,
                value > thr,
                {"configured_threshold": settings.psi_threshold, "null_q99": null, "edges": edges.tolist(), **span},
            )
        )
        d, p = ks_counts(rv, rcounts, pv, pcounts)
        feats.append(
            FeatureResult("confidence_ks", "ks", d, settings.ks_pvalue, p < settings.ks_pvalue, {"pvalue": p, **span})
        )
        hist["confidence"] = {
            "edges": edges.tolist(),
            "reference": (rb / rb.sum()).tolist(),
            "production": (pb / pb.sum()).tolist(),
        }
    return _result(result_id, prod, window, feats, settings, hist)


# ---- comparison ------------------------------------------------------------------------------


@dataclass
class FeatureResult:
    feature: str  # prompt_length_psi | prompt_length_ks | vocabulary | oov | embedding | response_length | finish_length | empty_response | negative_feedback; classifiers: label_distribution | confidence_psi | confidence_ks
    statistic: str  # psi | ks | js | share_delta | mmd | share
    value: float | None
    threshold: float
    drifted: bool
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:  # plain Python values for JSON, DuckDB and Prometheus
        self.value = None if self.value is None else float(self.value)
        self.threshold, self.drifted = float(self.threshold), bool(self.drifted)


@dataclass
class DriftResult:
    """Drift of one version over one window: per-statistic results and the overall score."""

    id: str
    model_version: str
    window: str
    window_start: datetime | None
    window_end: datetime | None
    n_requests: int
    features: list[FeatureResult]
    score: float
    threshold: float
    drifted: bool
    skipped: str | None = None
    new_words: list[tuple[str, int]] = field(default_factory=list)
    histograms: dict[str, Any] = field(default_factory=dict)

    def feature(self, name: str) -> FeatureResult | None:
        return next((f for f in self.features if f.feature == name), None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model_version": self.model_version,
            "window": self.window,
            "window_start": self.window_start,
            "window_end": self.window_end,
            "n_requests": self.n_requests,
            "score": self.score,
            "threshold": self.threshold,
            "drifted": self.drifted,
            "skipped": self.skipped,
            "features": {f.feature: {k: v for k, v in asdict(f).items() if k != "feature"} for f in self.features},
            "new_words": self.new_words,
        }


def _counts(pairs: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(pairs, dtype=float).reshape(-1, 2)
    return a[:, 0], a[:, 1]


def compare(
    profile: dict[str, Any],
    prod: ProductionStats,
    settings: DriftSettings,
    result_id: str,
    window: str = "",
    ref_embeddings: np.ndarray | None = None,
    prod_embeddings: np.ndarray | None = None,
    seed: int = 0,
) -> DriftResult:
    """Every drift statistic of ``prod`` against ``profile`` with ``settings`` (a DriftSettings)."""
    rng = np.random.default_rng(seed)
    feats: list[FeatureResult] = []
    hist: dict[str, Any] = {}
    bins = int(settings.psi_bins)

    def length_psi(
        name: str, ref_pairs: list[list[float]], prod_vc: tuple[np.ndarray, np.ndarray], threshold: float
    ) -> None:
        rv, rc = _counts(ref_pairs)
        pv, pc = prod_vc
        if not len(rv) or not pc.sum():
            return
        value, edges, rb, pb = psi_counts(rv, rc, pv, pc, bins)
        null = null_quantile(lambda s: psi_from_bins(rb, s), rb, int(pc.sum()), rng)
        thr = max(threshold, null)
        feats.append(
            FeatureResult(
                name,
                "psi",
                value,
                thr,
                value > thr,
                {
                    "configured_threshold": threshold,
                    "null_q99": null,
                    "edges": edges.tolist(),
                    "reference_bins": (rb / rb.sum()).tolist(),
                    "production_bins": (pb / pb.sum()).tolist(),
                    "wasserstein": wasserstein_counts(rv, rc, pv, pc),
                    "reference_mean": float(np.average(rv, weights=rc)),
                    "production_mean": float(np.average(pv, weights=pc)),
                },
            )
        )
        hist[name] = {
            "edges": edges.tolist(),
            "reference": (rb / rb.sum()).tolist(),
            "production": (pb / pb.sum()).tolist(),
        }

    length_psi("prompt_length_psi", profile["prompt_length"], prod.prompt_len, settings.psi_threshold)
    rv, rc = _counts(profile["prompt_length"])
    if len(rv) and prod.prompt_len[1].sum():
        d, p = ks_counts(rv, rc, *prod.prompt_len)
        feats.append(
            FeatureResult("prompt_length_ks", "ks", d, settings.ks_pvalue, p < settings.ks_pvalue, {"pvalue": p})
        )

    vocab = profile["vocab"]
    if prod.total_tokens and vocab:
        # the reference's out-of-vocabulary bucket holds the mass new text from the same distribution is
        # expected to put outside the vocabulary (Good-Turing), not just the reference's own tail
        kept = np.asarray(profile["vocab_counts"], dtype=float)
        exp_oov = float(profile["oov_expected"])
        ref = np.append(kept / kept.sum() * (1 - exp_oov), exp_oov)
        cur = np.append(prod.vocab_counts, float(prod.oov_tokens))
        value = js_divergence(ref, cur)
        if profile.get("js_null"):  # same-distribution windows of whole prompts (monitoring.profile.js_null)
            grid = np.asarray(profile["js_null"], dtype=float)
            null = float(np.interp(np.log(prod.total_tokens), np.log(grid[:, 0]), grid[:, 1]))
        else:
            null = null_quantile(lambda s: js_divergence(ref, s), ref, prod.total_tokens, rng, draws=100)
        thr = max(settings.js_threshold, null)
        feats.append(
            FeatureResult(
                "vocabulary",
                "js",
                value,
                thr,
                value > thr,
                {
                    "configured_threshold": settings.js_threshold,
                    "null_q99": null,
                    "production_tokens": prod.total_tokens,
                    "word_requests": prod.word_requests,
                },
            )
        )
        base = float(profile["oov_expected"])
        share = prod.oov_tokens / prod.total_tokens
        delta = share - base
        feats.append(
            FeatureResult(
                "oov",
                "share_delta",
                delta,
                settings.oov_threshold,
                delta > settings.oov_threshold,
                {"production_share": share, "reference_share": base},
            )
        )

    if (
        ref_embeddings is not None
        and prod_embeddings is not None
        and len(ref_embeddings) >= 2
        and len(prod_embeddings) >= 2
    ):
        t = mmd_permutation_test(ref_embeddings, prod_embeddings, int(settings.permutations), seed)
        feats.append(
            FeatureResult(
                "embedding",
                "mmd",
                t["mmd2"],
                settings.embedding_pvalue,
                t["pvalue"] < settings.embedding_pvalue,
                {
                    "pvalue": t["pvalue"],
                    "bandwidth": t["bandwidth"],
                    "null_q99": t["null_q99"],
                    "n_reference": len(ref_embeddings),
                    "n_production": len(prod_embeddings),
                },
            )
        )

    length_psi("response_length", profile["response_length"], prod.response_len, settings.response_psi_threshold)
    if prod.n_requests:
        ref_len_share = float(profile.get("finish_mix", {}).get("length", 0)) / max(1, int(profile["n_rows"]))
        share = prod.finish_length / prod.n_requests
        feats.append(
            FeatureResult(
                "finish_length",
                "share_delta",
                share - ref_len_share,
                settings.length_share_threshold,
                share - ref_len_share > settings.length_share_threshold,
                {"production_share": share, "reference_share": ref_len_share},
            )
        )
        ref_empty = float(profile.get("empty_share", 0.0))
        share = prod.empty / prod.n_requests
        feats.append(
            FeatureResult(
                "empty_response",
                "share_delta",
                share - ref_empty,
                settings.empty_share_threshold,
                share - ref_empty > settings.empty_share_threshold,
                {"production_share": share, "reference_share": ref_empty},
            )
        )
    if prod.rated:
        share = prod.negative / prod.rated
        feats.append(
            FeatureResult(
                "negative_feedback",
                "share",
                share,
                settings.negative_feedback_threshold,
                share > settings.negative_feedback_threshold,
                {"rated": prod.rated, "negative": prod.negative},
            )
        )

    return _result(result_id, prod, window, feats, settings, hist, new_words=prod.new_words)
