"""The demo's scenario: a support assistant for a fictional product, judged by checkable rules.

Contract
--------
Everything here is generated deterministically from the constants below; nothing
is downloaded or random beyond a seeded shuffle.

* The product is **Quillnote**, a note-taking app by Brightfield Software (both
  made up). :data:`FACTS` is its fact sheet: eight facts (plans, prices, refund
  window, support hours, a coupon code, storage, a trial, export formats), each
  with the answer support staff give (:attr:`Fact.answer`), the rule a reader can
  check an answer against (:attr:`Fact.rule`, e.g. it must contain ``$11``), and
  question phrasings: :attr:`Fact.asked` (what production users ask) and
  :attr:`Fact.held_out` (other phrasings, never sent as traffic, never trained on).
* Every request carries the deployment's system prompt (:data:`SYSTEM`), as a
  real support deployment would.
* :func:`traffic` — ``n`` production requests: a share ``chat_share`` (20%) of
  small talk (first messages of chitchat-dataset conversations, ``fact`` None:
  nobody rates those, as most production requests go unrated), the rest a fact's
  asked phrasing with a greeting or sign-off, drawn by a seeded RNG.
* :func:`heldout_rows` / :func:`register_heldout` — the held-out phrasings as an
  SFT dataset (``quillnote-heldout``): each row's answer is the fact's answer and
  its ``check`` is the fact's rule, so ``tuneloop eval`` scores ``task_success``.
  The rows sit in the test split; the train split holds the asked phrasings (the
  product FAQ) only because a dataset needs training rows — the demo never trains
  on this dataset.
* :data:`GOLDEN` / :func:`write_golden` — the support team's pinned questions
  (each fact's first asked phrasing, with its rule), for the gate's golden check:
  a candidate may not answer fewer of them than production does.
* What is simulated: the users, their questions and their ratings. A user rates
  an answer to a product question thumbs-up when it passes the fact's rule, else
  thumbs-down with the fact sheet's answer as the correction (what a support agent
  would write); small talk goes unrated.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.checks import Rule

if TYPE_CHECKING:
    from tuneloop.db import Database

PRODUCT = "Quillnote"
SYSTEM = (
    "You are the support assistant of Quillnote, a note-taking app made by Brightfield Software. "
    "Answer customers' questions in one or two sentences."
)
HELDOUT_NAME = "quillnote-heldout"


@dataclass(frozen=True)
class Fact:
    key: str
    answer: str
    rule: Rule
    asked: tuple[str, ...]
    held_out: tuple[str, ...]


FACTS: tuple[Fact, ...] = (
    Fact(
        "plus_price",
        "The Plus plan costs $11 per month.",
        Rule(contains=("$11",)),
        (
            "How much does Quillnote Plus cost?",
            "What is the price of the Plus plan?",
            "How much do I pay per month for Quillnote Plus?",
            "What does the Plus subscription cost?",
            "Is Quillnote Plus expensive? What's the monthly price?",
        ),
        ("Tell me the monthly fee for the Plus plan.", "What's the cost of upgrading to Plus?"),
    ),
    Fact(
        "team_price",
        "The Team plan costs $23 per user per month.",
        Rule(contains=("$23",)),
        (
            "How much is the Team plan?",
            "What does Quillnote Team cost per user?",
            "What is the price of the Team plan for my company?",
            "How much do we pay per seat on the Team plan?",
            "What's the monthly price of Quillnote for teams?",
        ),
        ("How much would the Team plan cost us per person?", "Tell me the Team plan's price."),
    ),
    Fact(
        "refund",
        "You can get a full refund within 45 days of purchase.",
        Rule(contains=("45 days",)),
        (
            "What is your refund policy?",
            "Can I get my money back for Quillnote?",
            "How long do I have to ask for a refund?",
            "I want a refund. Is that possible?",
            "Until when can I get refunded after buying a plan?",
        ),
        ("How many days do I have to return my purchase?", "Do you give refunds, and for how long?"),
    ),
    Fact(
        "support_hours",
        "Our support team is available Tuesday to Saturday, 8am to 4pm.",
        Rule(contains=("Tuesday to Saturday",)),
        (
            "When is customer support available?",
            "What are your support hours?",
            "On which days can I reach Quillnote support?",
            "When can I contact your support team?",
            "Is support open on weekdays?",
        ),
        ("What days is the help desk open?", "At what times can I talk to support?"),
    ),
    Fact(
        "coupon",
        "Use the code QUILL25 at checkout for 25% off your first year.",
        Rule(contains=("QUILL25",)),
        (
            "Do you have a discount code?",
            "Is there a coupon for Quillnote?",
            "How can I get a discount on my subscription?",
            "Any promo code for new customers?",
            "Is there a coupon code I can use at checkout?",
        ),
        ("Can I get a discount on my first year?", "What promo code should I enter to save money?"),
    ),
    Fact(
        "storage",
        "The Plus plan includes 80 GB of storage.",
        Rule(contains=("80 GB",)),
        (
            "How much storage do I get with Plus?",
            "What is the storage limit of the Plus plan?",
            "How many gigabytes come with Quillnote Plus?",
            "Is there a storage cap on Plus?",
            "How much space does the Plus plan give me?",
        ),
        ("How much cloud space is included in Plus?", "What's the Plus plan's storage allowance?"),
    ),
    Fact(
        "trial",
        "The Team plan comes with a free trial of 21 days.",
        Rule(contains=("21 days",)),
        (
            "Is there a free trial for the Team plan?",
            "Can my team try Quillnote for free first?",
            "How long is the Team trial?",
            "Do you offer a trial period for teams?",
            "Can we test the Team plan before paying?",
        ),
        ("How long can we use the Team plan for free?", "What's the length of the Team free trial?"),
    ),
    Fact(
        "export",
        "You can export notes as PDF, Markdown or OPML.",
        Rule(contains=("OPML",)),
        (
            "Which export formats does Quillnote support?",
            "Can I export my notes?",
            "In what formats can I download my notes?",
            "How do I export notes, and to which file types?",
            "Can I get my notes out of Quillnote?",
        ),
        ("What file formats can notes be saved as?", "Which formats can I export my notebook to?"),
    ),
)

_OPENERS = ("", "", "Hi! ", "Hello, ", "Quick question: ", "Hey there. ")
_CLOSERS = ("", "", " Thanks!", " Thank you.", " Thanks in advance.")


@dataclass(frozen=True)
class Question:
    text: str
    fact: Fact | None  # None: small talk, not about the product (unrated)


def messages(question: str) -> list[dict[str, str]]:
    """The chat a production request sends: the system prompt, then the user's question."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def traffic(n: int, seed: int = 0, chat_share: float = 0.2) -> list[Question]:
    """``n`` production requests: small talk (share ``chat_share``) and asked phrasings with a greeting/sign-off."""
    from tuneloop.trainer.corpora import chitchat_prompts

    rng = random.Random(seed)
    chat = [p for p in chitchat_prompts() if 3 <= len(p.split()) <= 30] if chat_share > 0 else []
    out = []
    for _ in range(n):
        if chat and rng.random() < chat_share:
            out.append(Question(rng.choice(chat), None))
            continue
        fact = rng.choice(FACTS)
        q = rng.choice(fact.asked)
        out.append(Question(f"{rng.choice(_OPENERS)}{q}{rng.choice(_CLOSERS)}", fact))
    return out


def heldout_rows() -> dict[str, list[dict[str, Any]]]:
    """Splits of the held-out dataset: test = held-out phrasings with their checks; train = the asked phrasings."""

    def row(i: str, q: str, f: Fact, check: bool) -> dict[str, Any]:
        r: dict[str, Any] = {
            "id": i,
            "messages": [*messages(q), {"role": "assistant", "content": f.answer}],
            "origin": "scenario",
        }
        if check:
            r["check"] = f.rule.to_dict()
        return r

    test = [row(f"{f.key}-h{j}", q, f, True) for f in FACTS for j, q in enumerate(f.held_out)]
    train = [row(f"{f.key}-a{j}", q, f, False) for f in FACTS for j, q in enumerate(f.asked)]
    return {"train": train, "validation": [], "test": test}


def register_heldout(db: Database, home: str | Path) -> str:
    """Register :func:`heldout_rows` as ``quillnote-heldout`` (idempotent); returns its dataset id."""
    from tuneloop.dataset_store import save_dataset

    card = {
        "description": f"{PRODUCT} fact sheet: held-out question phrasings (test, with checks) and the asked ones (train)",
        "facts": {f.key: {"answer": f.answer, "check": f.rule.to_dict()} for f in FACTS},
    }
    rec = save_dataset(db, home, HELDOUT_NAME, heldout_rows(), "sft", card, {"kind": "scenario", "product": PRODUCT})
    return rec.id


# the support team's pinned questions: each fact's first asked phrasing, in the deployment's chat, with the fact's
# rule. A candidate must pass at least as many as production (deploy.gate_min_golden_pass): once a version has
# learned the fact sheet, no later version may forget it.
GOLDEN: tuple[dict[str, Any], ...] = tuple(
    {"name": f.key, "messages": messages(f.asked[0]), **f.rule.to_dict()} for f in FACTS
)


def write_golden(path: Path) -> Path:
    """Write :data:`GOLDEN` as a golden-prompts YAML file (``tuneloop eval --golden`` format); returns the path."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(list(GOLDEN), sort_keys=False))
    return path
