"""Per-example text metrics for generated answers against a reference: one home for each.

Contract: SQuAD-style normalisation (lower case, punctuation removed, whitespace
tokens) for every metric; each metric maps ``(prediction, reference)`` to a float
in ``[0, 1]``. Two empty texts score 1, one empty text scores 0. Evaluation, the
deploy gate and the demo's simulated users all score with these functions.
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
    """ROUGE-L F1 over normalized tokens (longest common subsequence)."""
    p, r = normalize(pred), normalize(ref)
    if not p or not r:
        return float(p == r)
    prev = [0] * (len(r) + 1)
    for a in p:
        cur = [0]
        for j, b in enumerate(r, 1):
            cur.append(prev[j - 1] + 1 if a == b else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)
