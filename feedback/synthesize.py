"""``tuneloop data synthesize``: synthetic training rows, aimed at what production shows the model lacks.

Contract
--------
:func:`synthesize` generates rows through an OpenAI-compatible endpoint (``tuneloop serve``, vLLM's server, or a
stronger "teacher" anywhere) and saves them as a registered SFT dataset (:func:`tuneloop.dataset_store.save_dataset`)
whose every row is ``origin = "synthetic"`` and sits in the **train split only**.

Modes (:data:`MODES`), each with its own prompt template (:data:`TEMPLATES`; its sha256 goes into every row):

* ``paraphrase``: the last user message of rows of ``source`` (a registered dataset) reworded, the answer kept;
* ``self-instruct``: new (request, answer) pairs for ``task`` (a description), three random ``source`` rows as
  examples each time;
* ``teacher``: production prompts of the window that got a thumbs-down (or 1-2 stars) and no correction (a
  thumbs-down answer cut at the token limit included), answered
  by the generator (``system``: a better system prompt put in front; the row keeps the user's prompt as asked);
* ``targeted``: seeds from the **drifted slice** of production: the window's prompts ranked by their distance from
  the serving version's training prompts (:func:`tuneloop.feedback.strategies.drift_scores`, hashed bag of words),
  the ``seeds`` farthest. Each seed is answered (as ``teacher``) and the rest of ``count`` are new requests on the
  seeds' topics (as ``self-instruct``, the seed as the example). The words of the seeds that the training data never
  had are reported in the card (``new_words``).

Structured outputs: the modes that need two fields (a request and an answer) ask with ``response_format``
``json_schema`` (strict), so a small generator still returns parseable rows. Every request carries
``X-Tuneloop-Origin: synthetic`` (:data:`tuneloop.monitoring.records.ORIGIN_HEADER`): tuneloop's server keeps such
requests out of the request log and every production metric.

Quality controls, in order, each counted in the card's ``steps``: generation errors and unparseable answers; a rule
filter (empty, shorter than ``min_chars`` or longer than ``max_chars``, an answer that repeats the request, a
paraphrase equal to its original); the PII scrub (:func:`tuneloop.pii.scrub`, counted per kind); dedup within the
new rows (normalised request) and against every earlier SFT dataset (normalised request + answer; for generated
requests the request alone too, so a "new" request that is an old one is dropped); the optional judge (the judge
model rates request + answer 1-5 with structured output; rows under ``judge_threshold`` are dropped).

Provenance: every row has ``origin = "synthetic"`` and a ``provenance`` JSON column (mode, generator model, the
endpoint's host, template sha256, the seed: a source row id or a production request id, the judge's score);
rows answered for a production prompt keep its ``request_id`` (lineage). The card records the generator, the
templates, the counts, the seeds and the new words. Nothing is written when no row survives (a ``UserError`` with
the counts).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from tuneloop.errors import UserError

if TYPE_CHECKING:
    from pathlib import Path

    from tuneloop.db import Database
    from tuneloop.feedback.candidates import Candidate
    from tuneloop.registry import DatasetRecord

MODES = ("paraphrase", "self-instruct", "teacher", "targeted")

TEMPLATES: dict[str, str] = {
    "paraphrase": (
        "Rewrite the user's message below so that it asks for exactly the same thing in different words. "
        "Keep its language, facts and intent; do not answer it.\n\nMessage:\n{request}"
    ),
    "self-instruct": (
        "You write training data for an assistant. Task: {task}\n\nExamples of requests it gets and the answers "
        "it should give:\n{examples}\n\nWrite ONE new request a real user could send for this task, different "
        "from the examples, and the ideal answer to it."
    ),
    "targeted": (
        "You write training data for an assistant. Real users recently sent requests like this one, which the "
        "assistant's training data does not cover:\n{examples}\n\nWrite ONE new, different request on the same "
        "topic that a real user could send, and the ideal answer to it.{task}"
    ),
    "judge": (
        "Rate how well the ANSWER responds to the REQUEST: correct, helpful and on topic. 1 = useless or wrong, "
        "5 = excellent.\n\nREQUEST:\n{request}\n\nANSWER:\n{answer}"
    ),
}
SCHEMAS: dict[str, dict[str, Any]] = {
    "paraphrase": {
        "type": "object",
        "properties": {"paraphrase": {"type": "string"}},
        "required": ["paraphrase"],
        "additionalProperties": False,
    },
    "pair": {
        "type": "object",
        "properties": {"request": {"type": "string"}, "answer": {"type": "string"}},
        "required": ["request", "answer"],
        "additionalProperties": False,
    },
    "judge": {
        "type": "object",
        "properties": {"score": {"type": "integer", "enum": [1, 2, 3, 4, 5]}},
        "required": ["score"],
        "additionalProperties": False,
    },
}
STEPS = (
    "generation_errors",
    "unparseable",
    "rule_rejected",
    "duplicates_within",
    "duplicates_earlier",
    "judge_rejected",
)


@dataclass
class SynthesizeConfig:
    mode: str = field(metadata={"help": f"One of {', '.join(MODES)}."})
    name: str = field(default="synthetic", metadata={"help": "Name of the dataset written."})
    endpoint: str = field(
        default="http://127.0.0.1:8000/v1",
        metadata={"help": "OpenAI-compatible base URL of the generator (tuneloop serve, vLLM, any teacher)."},
    )
    model: str = field(default="production", metadata={"help": "Generator model name at the endpoint."})
    api_key: str | None = field(default=None, metadata={"help": "API key of the endpoint ($OPENAI_API_KEY)."})
    source: str | None = field(
        default=None,
        metadata={"help": "Registered dataset whose train rows are the seeds (paraphrase, self-instruct)."},
    )
    task: str | None = field(default=None, metadata={"help": "What the assistant is for (self-instruct; targeted)."})
    window: str = field(default="7d", metadata={"help": "Production window read by teacher and targeted."})
    since: datetime | None = field(default=None, metadata={"help": "Window start instead of --window (the loop's)."})
    until: datetime | None = field(default=None, metadata={"help": "Window end (default now)."})
    version: str | None = field(default=None, metadata={"help": "Only this served version's traffic (default: all)."})
    count: int = field(default=50, metadata={"help": "Rows to generate (before the quality controls)."})
    seeds: int = field(default=10, metadata={"help": "targeted: how many of the most drifted prompts seed it."})
    system: str | None = field(default=None, metadata={"help": "teacher/targeted: system prompt for the generator."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of generation."})
    max_tokens: int = field(default=256, metadata={"help": "Token budget of one generated answer."})
    judge: bool = field(default=False, metadata={"help": "Rate every row 1-5 with the judge and filter."})
    judge_model: str | None = field(default=None, metadata={"help": "Judge model at the endpoint (default: model)."})
    judge_threshold: int = field(default=3, metadata={"help": "Lowest judge score kept (1-5)."})
    min_chars: int = field(default=2, metadata={"help": "Rule filter: shortest request or answer kept."})
    max_chars: int = field(default=4000, metadata={"help": "Rule filter: longest request or answer kept."})
    concurrency: int = field(default=8, metadata={"help": "Generation requests in flight at once."})
    seed: int = field(default=0, metadata={"help": "Seed of every random choice (seed rows, examples)."})


@dataclass
class SynthesizeResult:
    record: DatasetRecord
    counts: dict[str, Any]
    notes: list[str]


@dataclass
class _Draft:
    """One generated row before the quality controls."""

    messages: list[dict[str, Any]]  # the prompt messages (user last)
    answer: str
    seed: str | None  # source row id or production request id
    request_id: str | None = None
    original: str | None = None  # paraphrase: the message it rewrites
    generated_request: bool = False
    judge_score: int | None = None


class Generator:
    """The OpenAI-compatible endpoint, every request marked synthetic."""

    def __init__(self, cfg: SynthesizeConfig) -> None:
        import openai

        from tuneloop.monitoring.records import ORIGIN_HEADER, SYNTHETIC

        self.cfg = cfg
        self.client = openai.OpenAI(
            base_url=cfg.endpoint,
            api_key=cfg.api_key or "unused",
            max_retries=2,
            timeout=300,
            default_headers={ORIGIN_HEADER: SYNTHETIC},
        )

    def chat(
        self,
        messages: list[dict[str, Any]],
        schema: str | None = None,
        model: str | None = None,
        temperature: float | None = None,
    ) -> str:
        kw: dict[str, Any] = {}
        if schema is not None:
            kw["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": schema, "schema": SCHEMAS[schema], "strict": True},
            }
        out = self.client.chat.completions.create(
            model=model or self.cfg.model,
            messages=messages,  # type: ignore[arg-type]
            temperature=self.cfg.temperature if temperature is None else temperature,
            max_tokens=self.cfg.max_tokens,
            seed=self.cfg.seed,
            **kw,
        )
        return out.choices[0].message.content or ""


def synthesize(
    db: Database, home: Path, cfg: SynthesizeConfig, progress: bool = True, say: Callable[[str], None] = print
) -> SynthesizeResult:
    """Generate, filter, save and register (module doc)."""
    _check(cfg)
    gen = Generator(cfg)
    counts: dict[str, Any] = dict.fromkeys(STEPS, 0)
    notes: list[str] = []
    extra: dict[str, Any] = {}
    rng = random.Random(cfg.seed)
    jobs = _jobs(db, cfg, rng, counts, notes, extra)
    if not jobs:
        raise UserError(f"nothing to generate from: {'; '.join(notes) or 'no seeds'}")
    say(f"generating {len(jobs)} rows ({cfg.mode}) with {cfg.model} at {cfg.endpoint} ...")
    drafts = _run(jobs, gen, cfg, counts, progress)
    counts["generated"] = len(drafts)
    drafts = _rule_filter(drafts, cfg, counts)
    pii = _scrub(drafts)
    drafts = _dedup(db, drafts, counts)
    if cfg.judge and drafts:
        say(f"judging {len(drafts)} rows with {cfg.judge_model or cfg.model} (keep >= {cfg.judge_threshold}) ...")
        drafts = _judge(drafts, gen, cfg, counts, progress)
    counts["rows"] = len(drafts)
    if not drafts:
        raise UserError(f"no synthetic row survived the quality controls: {_fmt(counts)}")
    rows = [_row(d, cfg, i) for i, d in enumerate(drafts)]
    from tuneloop.dataset_store import save_dataset

    card = {
        "origin": "synthetic",
        "mode": cfg.mode,
        "generator": {"model": cfg.model, "endpoint": _host(cfg.endpoint), "temperature": cfg.temperature},
        "judge": {"model": cfg.judge_model or cfg.model, "threshold": cfg.judge_threshold} if cfg.judge else None,
        "templates": {k: template_hash(k) for k in _templates_used(cfg)},
        "steps": counts,
        "pii": pii,
        "config": {k: v for k, v in asdict(cfg).items() if k != "api_key" and not isinstance(v, datetime)},
        "notes": notes,
        **extra,
    }
    source = {"kind": "synthetic", "mode": cfg.mode, "source": cfg.source, "window": cfg.window}
    parents = [extra["source_dataset"]] if extra.get("source_dataset") else []
    rec = save_dataset(db, home, cfg.name, {"train": rows}, "sft", card, source, parent_ids=parents)
    return SynthesizeResult(rec, counts, notes)


def template_hash(name: str) -> str:
    return hashlib.sha256(TEMPLATES[name].encode()).hexdigest()


# ---- seeds and generation jobs --------------------------------------------------------------------


Job = Callable[["Generator"], "_Draft | None"]


def _check(cfg: SynthesizeConfig) -> None:
    if cfg.mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    if cfg.mode in ("paraphrase", "self-instruct") and not cfg.source:
        raise UserError(f"--mode {cfg.mode} needs --source DATASET (its train rows are the seeds)")
    if cfg.mode == "self-instruct" and not cfg.task:
        raise UserError("--mode self-instruct needs --task 'what the assistant is for'")
    if cfg.count < 1 or cfg.seeds < 1 or cfg.concurrency < 1:
        raise UserError("--count, --seeds and --concurrency must be >= 1")
    if not 1 <= cfg.judge_threshold <= 5:
        raise UserError(f"--judge-threshold must be 1-5, got {cfg.judge_threshold}")
    if cfg.min_chars < 0 or cfg.max_chars < max(1, cfg.min_chars):
        raise UserError("--min-chars must be >= 0 and --max-chars larger")
    if urlparse(cfg.endpoint).scheme not in ("http", "https"):
        raise UserError(f"--endpoint must be an http(s) URL such as http://127.0.0.1:8000/v1, got {cfg.endpoint!r}")


def _jobs(
    db: Database,
    cfg: SynthesizeConfig,
    rng: random.Random,
    counts: dict[str, Any],
    notes: list[str],
    extra: dict[str, Any],
) -> list[Job]:
    if cfg.mode in ("paraphrase", "self-instruct"):
        rows = _source_rows(db, cfg.source or "", extra)
        counts["seed_rows"] = len(rows)
        if cfg.mode == "paraphrase":
            picked = rng.sample(rows, min(cfg.count, len(rows)))
            return [_paraphrase_job(r) for r in picked]
        return [_pair_job("self-instruct", rng.sample(rows, min(3, len(rows))), cfg) for _ in range(cfg.count)]
    cands, negatives = _production(db, cfg, counts)
    if cfg.mode == "teacher":
        counts["seed_requests"] = min(len(negatives), cfg.count)
        if not negatives:
            notes.append(f"no thumbs-down request without a correction in the last {cfg.window}")
        return [_teacher_job(c, cfg) for c in negatives[: cfg.count]]
    pool = cands + negatives
    if not pool:
        notes.append(f"no production request in the last {cfg.window}")
        return []
    from tuneloop.feedback.strategies import drift_scores

    scores = drift_scores(db, pool, notes)
    order = sorted(range(len(pool)), key=lambda i: (-scores[i], pool[i].request_id))[: cfg.seeds]
    seeds = [pool[i] for i in order]
    extra["seeds"] = [
        {"request_id": pool[i].request_id, "drift": round(scores[i], 4), "prompt": pool[i].prompt_text()[:200]}
        for i in order
    ]
    extra["new_words"] = _new_words(db, seeds)
    counts["seed_requests"] = len(seeds)
    jobs: list[Job] = [_teacher_job(c, cfg) for c in seeds[: cfg.count]]
    for i in range(cfg.count - len(jobs)):
        c = seeds[i % len(seeds)]
        ex = [{"messages": [*c.messages, {"role": "assistant", "content": c.target}], "id": c.request_id}]
        jobs.append(_pair_job("targeted", ex, cfg, seed_id=c.request_id))
    return jobs


def _source_rows(db: Database, ref: str, extra: dict[str, Any]) -> list[dict[str, Any]]:
    from tuneloop.dataset_store import chat_message, good_chat, load_card, load_splits
    from tuneloop.registry import RegistryError

    try:
        dd = load_splits(db, ref)
        extra["source_dataset"] = load_card(db, ref).get("id")
    except (FileNotFoundError, RegistryError) as e:
        raise UserError(f"cannot load dataset {ref!r}: {e}") from None
    if "train" not in dd or not len(dd["train"]):
        raise UserError(f"dataset {ref!r} has no train rows to seed from")
    out = []
    for r in dd["train"]:
        chat = good_chat(r)
        if chat is None or r.get("tools"):
            continue
        prompt, answer = chat
        msgs = [chat_message(m) for m in prompt]
        if msgs and msgs[-1]["role"] == "user" and (msgs[-1].get("content") or "").strip():
            out.append({"id": str(r["id"]), "messages": [*msgs, {"role": "assistant", "content": answer}]})
    if not out:
        raise UserError(f"dataset {ref!r} has no chat rows ending in a user message to seed from")
    return out


def _production(db: Database, cfg: SynthesizeConfig, counts: dict[str, Any]) -> tuple[list[Candidate], list[Candidate]]:
    from tuneloop.feedback.candidates import read_candidates
    from tuneloop.timeparse import parse_duration, utcnow

    until = cfg.until or utcnow()
    since = cfg.since
    if since is None:
        try:
            since = until - parse_duration(cfg.window)
        except ValueError as e:
            raise UserError(f"--window: {e}") from None
    negatives: list[Candidate] = []
    cut: list[Candidate] = []
    read: dict[str, int] = {}
    cands = read_candidates(db, since, until, cfg.version, read, negatives, cut)
    counts["production"] = read
    # a thumbs-down answer cut at the token limit failed too: the teacher answers it (candidates' doc)
    failed = sorted(
        negatives + [c for c in cut if c.feedback == "negative"], key=lambda c: (c.received_at, c.request_id)
    )
    keep = [c for c in cands + [c for c in cut if c.feedback != "negative"] if not c.tools]
    return keep, [c for c in failed if not c.tools]  # tool-calling prompts need their definitions: not generated


def _paraphrase_job(row: dict[str, Any]) -> Job:
    msgs = row["messages"][:-1]
    original = msgs[-1]["content"]

    def job(gen: Generator) -> _Draft | None:
        text = gen.chat([{"role": "user", "content": TEMPLATES["paraphrase"].format(request=original)}], "paraphrase")
        got = _parse(text, ("paraphrase",))
        if got is None:
            return None
        new = [*msgs[:-1], {"role": "user", "content": got["paraphrase"].strip()}]
        return _Draft(new, row["messages"][-1]["content"], row["id"], original=original, generated_request=True)

    return job


def _pair_job(kind: str, examples: list[dict[str, Any]], cfg: SynthesizeConfig, seed_id: str | None = None) -> Job:
    shown = "\n\n".join(
        f"Request: {_last_user(e['messages'][:-1])}\nAnswer: {e['messages'][-1]['content']}" for e in examples
    )
    task = cfg.task or ""
    prompt = TEMPLATES[kind].format(
        task=(f" The assistant's task: {task}" if kind == "targeted" and task else task), examples=shown
    )
    sid = seed_id or ",".join(str(e["id"]) for e in examples)

    def job(gen: Generator) -> _Draft | None:
        msgs = [{"role": "system", "content": cfg.system}] if cfg.system else []
        got = _parse(gen.chat([*msgs, {"role": "user", "content": prompt}], "pair"), ("request", "answer"))
        if got is None:
            return None
        return _Draft(
            [{"role": "user", "content": got["request"].strip()}], got["answer"].strip(), sid, generated_request=True
        )

    return job


def _teacher_job(c: Candidate, cfg: SynthesizeConfig) -> Job:
    def job(gen: Generator) -> _Draft | None:
        msgs = list(c.messages)
        if cfg.system:
            msgs = [{"role": "system", "content": cfg.system}, *[m for m in msgs if m["role"] != "system"]]
        answer = gen.chat(msgs)
        return _Draft(list(c.messages), answer.strip(), c.request_id, request_id=c.request_id)

    return job


def _run(
    jobs: list[Job], gen: Generator, cfg: SynthesizeConfig, counts: dict[str, Any], progress: bool
) -> list[_Draft]:
    from tqdm import tqdm

    def one(job: Job) -> _Draft | str:
        try:
            d = job(gen)
        except Exception as e:  # an endpoint error loses that row only; counted, and the first is kept in notes
            return f"{type(e).__name__}: {e}"[:300]
        return d if d is not None else "unparseable"

    out: list[_Draft] = []
    with ThreadPoolExecutor(cfg.concurrency) as pool:
        for res in tqdm(pool.map(one, jobs), total=len(jobs), desc="synthesize", disable=not progress, unit="row"):
            if isinstance(res, _Draft):
                out.append(res)
            elif res == "unparseable":
                counts["unparseable"] += 1
            else:
                counts["generation_errors"] += 1
                counts.setdefault("first_error", res)
    if counts["generation_errors"] == len(jobs):
        raise UserError(f"every generation request failed; the first: {counts.get('first_error')}")
    return out


def _parse(text: str, keys: tuple[str, ...]) -> dict[str, Any] | None:
    try:
        got = json.loads(text)
    except ValueError:
        m = re.search(r"\{.*\}", text, re.S)  # a generator without structured outputs may wrap it in prose
        if m is None:
            return None
        try:
            got = json.loads(m.group(0))
        except ValueError:
            return None
    if not isinstance(got, dict) or not all(isinstance(got.get(k), (str, int)) for k in keys):
        return None
    return got


# ---- quality controls ----------------------------------------------------------------------------


def _rule_filter(drafts: list[_Draft], cfg: SynthesizeConfig, counts: dict[str, Any]) -> list[_Draft]:
    from tuneloop.feedback.candidates import normalise

    out = []
    for d in drafts:
        req, ans = _last_user(d.messages), d.answer
        bad = (
            not (cfg.min_chars <= len(req.strip()) <= cfg.max_chars)
            or not (cfg.min_chars <= len(ans.strip()) <= cfg.max_chars)
            or normalise(ans) == normalise(req)
            or (d.original is not None and normalise(d.original) == normalise(req))
        )
        if bad:
            counts["rule_rejected"] += 1
        else:
            out.append(d)
    return out


def _scrub(drafts: list[_Draft]) -> dict[str, int]:
    from tuneloop.pii import add_counts, scrub

    total: dict[str, int] = {}
    for d in drafts:
        msgs = []
        for m in d.messages:
            text, n = scrub(m.get("content") or "")
            add_counts(total, n)
            msgs.append({**m, "content": text})
        d.messages = msgs
        d.answer, n = scrub(d.answer)
        add_counts(total, n)
    return total


def _dedup(db: Database, drafts: list[_Draft], counts: dict[str, Any]) -> list[_Draft]:
    from tuneloop.feedback.candidates import earlier_keys, example_key, prompt_key

    prompts: set[str] = set()
    examples, _ = earlier_keys(db, None, prompts=prompts)
    seen: set[str] = set()
    out = []
    for d in drafts:
        pk = prompt_key(d.messages)
        if pk in seen:
            counts["duplicates_within"] += 1
            continue
        seen.add(pk)
        if example_key(d.messages, d.answer) in examples or (d.generated_request and pk in prompts):
            counts["duplicates_earlier"] += 1
            continue
        out.append(d)
    return out


def _judge(
    drafts: list[_Draft], gen: Generator, cfg: SynthesizeConfig, counts: dict[str, Any], progress: bool
) -> list[_Draft]:
    from tqdm import tqdm

    def one(d: _Draft) -> int | None:
        text = TEMPLATES["judge"].format(request=_last_user(d.messages), answer=d.answer)
        try:
            got = _parse(gen.chat([{"role": "user", "content": text}], "judge", cfg.judge_model, 0.0), ("score",))
        except Exception:
            return None
        try:
            return int(got["score"]) if got is not None else None
        except (TypeError, ValueError):
            return None

    out = []
    with ThreadPoolExecutor(cfg.concurrency) as pool:
        scores = list(tqdm(pool.map(one, drafts), total=len(drafts), desc="judge", disable=not progress, unit="row"))
    for d, s in zip(drafts, scores):
        d.judge_score = s
        if s is None or s < cfg.judge_threshold:
            counts["judge_rejected"] += 1
        else:
            out.append(d)
    counts["judge_scores"] = {str(k): sum(1 for s in scores if s == k) for k in range(1, 6)}
    return out


# ---- rows and card -------------------------------------------------------------------------------


def _row(d: _Draft, cfg: SynthesizeConfig, i: int) -> dict[str, Any]:
    template = {"paraphrase": "paraphrase", "self-instruct": "self-instruct", "teacher": None}.get(
        cfg.mode, None if d.request_id else "targeted"
    )
    prov = {
        "origin": "synthetic",
        "mode": cfg.mode,
        "generator": cfg.model,
        "endpoint": _host(cfg.endpoint),
        "template_sha256": template_hash(template) if template else None,
        "system_sha256": hashlib.sha256(cfg.system.encode()).hexdigest() if cfg.system else None,
        "seed": d.seed,
        "judge_score": d.judge_score,
    }
    key = hashlib.sha256(json.dumps([d.messages, d.answer], sort_keys=True).encode()).hexdigest()[:16]
    return {
        "id": f"syn-{key}",
        "messages": [*d.messages, {"role": "assistant", "content": d.answer}],
        "request_id": d.request_id,
        "origin": "synthetic",
        "provenance": json.dumps(prov, sort_keys=True),
    }


def _templates_used(cfg: SynthesizeConfig) -> list[str]:
    used = {"paraphrase": ["paraphrase"], "self-instruct": ["self-instruct"], "teacher": [], "targeted": ["targeted"]}
    return used[cfg.mode] + (["judge"] if cfg.judge else [])


def _new_words(db: Database, seeds: list[Candidate]) -> list[tuple[str, int]]:
    """Words of the seeds that no training prompt of their versions had, most frequent first (top 20)."""
    from collections import Counter

    from tuneloop.dataset_store import load_splits
    from tuneloop.monitoring.drift import words
    from tuneloop.registry import find_version

    vocab: set[str] = set()
    for version in {c.model_version for c in seeds if c.model_version}:
        v = find_version(db, version)
        if v is None or not v.dataset_id:
            continue
        dd = load_splits(db, v.dataset_id)
        for row in dd.get("train", []):
            for m in row.get("messages") or []:
                vocab.update(words(m.get("content") or ""))
    c: Counter[str] = Counter(w for s in seeds for w in words(s.prompt_text()) if w not in vocab)
    return c.most_common(20)


def _last_user(messages: list[dict[str, Any]]) -> str:
    return next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")


def _host(url: str) -> str:
    p = urlparse(url)
    return f"{p.scheme}://{p.hostname}{':' + str(p.port) if p.port else ''}{p.path}"


def _fmt(counts: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items() if isinstance(v, int))
