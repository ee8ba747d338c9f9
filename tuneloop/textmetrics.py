"""Per-example text metrics for generated answers against a reference: one home for each.

Contract: each metric maps ``(prediction, reference)`` to a float in ``[0, 1]``;
two empty texts score 1, one empty text scores 0. ``exact_match`` and
``token_f1`` are SQuAD's (lower case, punctuation removed, whitespace tokens);
``rouge_l`` is ROUGE-L F1 from ``rouge-score`` over the same normalised tokens and
``bleu`` is sentence BLEU from ``sacrebleu`` — maintained implementations, imported
only when called (they come with the ML extra). Evaluation and the deploy gate
score with these functions; checkable rules (task success) live in
:mod:`tuneloop.checks`.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> list[str]:
    """Lower-cased, punctuation-free whitespace tokens."""
    return _PUNCT.sub(" ", text.lower()).split()


def exact_match(pred: str, ref: str) -> float:
    return float(normalize(pred) == normalize(ref))


def token_f1(pred: str, ref: str) -> float:
    p, r = normalize(pred), normalize(ref)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 (longest common subsequence) from Google's ``rouge-score`` package."""
    p, r = normalize(pred), normalize(ref)
    if not p or not r:
        return float(p == r)
    from rouge_score import rouge_scorer

    return float(rouge_scorer.RougeScorer(["rougeL"]).score(" ".join(r), " ".join(p))["rougeL"].fmeasure)


def bleu(pred: str, ref: str) -> float:
    """Sentence BLEU in [0, 1] from ``sacrebleu`` (13a tokenisation, exponential smoothing, effective order)."""
    if not pred.strip() or not ref.strip():
        return float(pred.strip() == ref.strip())
    from sacrebleu.metrics import BLEU

    return min(1.0, float(BLEU(effective_order=True).sentence_score(pred, [ref]).score) / 100.0)
