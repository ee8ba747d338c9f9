"""Held-out evaluation of model versions on the same examples.

Contract
--------
``evaluate(models, dataset_ref, db, settings, golden=None, general=None, limit=None, max_new_tokens=64) -> dict``

* ``models``: version names, HF model folders, or ``'base'`` (the base model of
  the first registered version named). Each is loaded in turn (adapters on
  their base with PEFT), evaluated, and freed.
* On the dataset's ``test`` split (``validation`` when the test split is empty),
  first ``limit`` rows, in the same order for every model:
  - ``loss`` / ``perplexity``: mean NLL of the answer tokens (EOS included)
    given the prompt, tokenized exactly as in training
    (:func:`tuneloop.chat.training_example`);
  - ``exact_match``, ``token_f1``, ``rouge_l``, ``bleu`` (:mod:`tuneloop.textmetrics`:
    ROUGE-L from ``rouge-score``, BLEU from ``sacrebleu``): greedy generation (at most
    ``max_new_tokens``, stops at EOS) from the server's prompt rendering
    (:func:`tuneloop.chat.render_prompt`) vs the reference answer. Generation
    runs on ``generator`` (a :class:`Generator`: the gate and ``tuneloop eval``
    pass vLLM's offline engine, adapters as LoRA requests) for every model it
    ``supports``, else on transformers ``generate``; ``report["generation"]``
    says which backend each model used and how long it took;
  - ``task_success``: for rows that carry a ``check`` (a :mod:`tuneloop.checks`
    rule: contains-fact, regex, JSON-valid), 1 when the answer passes it, else 0
    (one value per checked row, in row order).
* ``golden``: a YAML list or JSONL of ``{name?, prompt | messages, expect?: str|[str], regex?: str|[str],
  json?: bool}``; a prompt passes when its greedy output passes that rule (:mod:`tuneloop.checks`).
* ``general``: forgetting check — perplexity on general held-out text (a .txt
  file: one passage per non-empty line; a .jsonl with ``text`` or ``messages``;
  or a dataset ref: its test split rendered with the chat template); ``limit``
  caps its items too.
* ``responses``: logged production answers (``{"messages": [..., assistant answer], "tools"?: [...]}``,
  rendered with their tools like dataset rows); each model's
  mean NLL per answer token of them is ``summary[model]["production_nll"]`` (one value per answer in
  ``per_example[model]["production_nll"]``). Under the model that produced them it is the entropy of its
  answers; the candidate's excess over production's estimates KL(production || candidate) per token,
  i.e. how far the candidate moved from what production says (the gate thresholds it).
* The report (JSON-safe dict) has ``id``, ``created_at``, ``dataset_id``,
  ``split``, ``n_examples``, ``example_ids``, ``models`` (names as given),
  ``summary[model][metric]`` (loss, perplexity, exact_match, token_f1, rouge_l, bleu,
  task_success, golden_pass_rate, general_perplexity), ``per_example[model][metric]``
  (loss, perplexity, exact_match, token_f1, rouge_l, bleu: one float per example; task_success: one per checked example;
  same order for every model), ``golden[model] = {passed, total, results}``
  and ``samples`` (a few generations). It is written to
  ``<home>/reports/eval-<id>.json`` and stored in ``eval_reports`` with one
  portable INSERT (either backend of :mod:`tuneloop.db`), as strict JSON: a
  NaN or infinite number (a diverged model's loss) is stored as null
  (:func:`tuneloop.db.dumps`), which PostgreSQL's ``json`` type requires; the returned
  dict and the file keep the floats as computed (:func:`record_report`).
* Sequence classifiers (a model folder whose architecture is ``*ForSequenceClassification``,
  e.g. a ``task=classification`` version) are evaluated by
  :func:`tuneloop.trainer.classify_eval.evaluate_classifiers` instead (accuracy, macro and
  per-class P/R/F1, confusion matrix; report ``task: "classification"``), and
  :func:`format_report` prints such a report with its tables.
* Bad input (unknown model or dataset, empty split, unreadable golden file)
  raises :class:`~tuneloop.errors.UserError` before anything is written.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tuneloop.chat import Tokenizer
from tuneloop.checks import rule_from_dict
from tuneloop.errors import UserError
from tuneloop.textmetrics import bleu, exact_match, rouge_l, token_f1

if TYPE_CHECKING:
    from datetime import datetime

    from tuneloop.db import Database
    from tuneloop.settings import Settings

# per-example metrics of every report; ``task_success`` is added for rows that carry a check
METRICS = ("loss", "perplexity", "exact_match", "token_f1", "rouge_l", "bleu")
TEXT_METRICS = {"exact_match": exact_match, "token_f1": token_f1, "rouge_l": rouge_l, "bleu": bleu}


class Generator(Protocol):
    """Greedy batch generation for evaluation (vLLM's offline engine in the product, see module doc)."""

    def supports(self, adapter: Path | None) -> bool: ...

    def generate(
        self, base: Path, adapter: Path | None, prompts: list[list[int]], max_new_tokens: int
    ) -> list[str]: ...


# a causal LM ready for inference: a transformers model, or a PeftModel wrapping one
CausalLM = Any


# ---- inputs --------------------------------------------------------------------------------------


@dataclass
class ModelRef:
    name: str  # as given by the user (the report's key)
    base: Path  # folder of the weights to load
    adapter: Path | None = None
    version: str | None = None


def resolve_models(refs: list[str], db: Database, settings: Settings) -> list[ModelRef]:
    from tuneloop.modelcache import resolve_model
    from tuneloop.registry import RegistryError, get_version

    models = settings.paths.models_path
    out: list[ModelRef] = []
    first_base: Path | None = None
    for ref in refs:
        if ref == "base":
            out.append(ModelRef("base", Path(""), None))
            continue
        try:
            v = get_version(db, ref)
        except RegistryError:
            v = None
        if v is not None:
            if not Path(v.path).exists():
                raise UserError(f"version {ref!r} points to {v.path}, which no longer exists")
            if v.kind == "adapter":
                own_tok = (Path(v.path) / "tokenizer_config.json").is_file()
                base = resolve_model(v.base_model, models, what=f"base model of version {ref!r}", tokenizer=not own_tok)
                m = ModelRef(ref, base, Path(v.path), v.name)
                first_base = first_base or base
            else:
                m = ModelRef(ref, resolve_model(v.path, models, what=f"model folder of version {ref!r}"), None, v.name)
                first_base = first_base or Path(v.base_model)
        else:  # a model folder, a known base or a hub id (from the model cache)
            m = ModelRef(ref, resolve_model(ref, models, what="model", versions=True))
        out.append(m)
    for m in out:
        if m.name == "base":
            if first_base is None:
                raise UserError("'base' means the base model of a registered version: name a version too")
            m.base = resolve_model(str(first_base), models, what="base model")
    if len({m.name for m in out}) != len(out):
        raise UserError(f"models must be distinct, got {refs}")
    return out


def load_eval_rows(db: Database, dataset_ref: str, limit: int | None) -> tuple[list[dict[str, Any]], str | None, str]:
    """(rows with id + messages, dataset id, split) of the held-out split."""
    from tuneloop.dataset_store import chat_message, good_chat, load_card, load_splits, row_tools
    from tuneloop.registry import RegistryError

    try:
        dd = load_splits(db, dataset_ref)
        ds_id = load_card(db, dataset_ref).get("id")
    except (FileNotFoundError, RegistryError) as e:
        raise UserError(f"cannot load dataset {dataset_ref!r}: {e}") from None
    split = "test" if "test" in dd and len(dd["test"]) else "validation"
    if split not in dd or not len(dd[split]):
        raise UserError(f"dataset {dataset_ref!r} has no test or validation rows to evaluate on")
    ds = dd[split]
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be >= 1, got {limit}")
        ds = ds.select(range(min(limit, len(ds))))
    rows = []
    for r in ds:
        chat = good_chat(r)
        if chat is None:  # a KTO row labelled undesirable: not a reference answer
            continue
        prompt, answer = chat
        msgs = [*prompt, {"role": "assistant", "content": answer}] if "messages" not in r else list(r["messages"])
        row: dict[str, Any] = {"id": r["id"], "messages": [chat_message(m) for m in msgs]}
        tools = row_tools(r)
        if tools:  # the definitions its prompt is rendered with
            row["tools"] = tools
        if r.get("check"):
            row["check"] = rule_from_dict(json.loads(r["check"]), where=f"row {r['id']} of {dataset_ref}")
        rows.append(row)
    return rows, ds_id, split


def load_golden(path: str | None) -> list[dict[str, Any]]:
    if not path:
        return []
    p = Path(path)
    if not p.is_file():
        raise UserError(f"golden prompts file not found: {p}")
    try:
        if p.suffix == ".jsonl":
            items = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        else:
            import yaml

            items = yaml.safe_load(p.read_text()) or []
    except (ValueError, Exception) as e:  # json / yaml errors
        raise UserError(f"{p}: cannot parse golden prompts: {e}") from None
    if isinstance(items, dict):
        items = items.get("prompts", [])
    if not isinstance(items, list) or not items:
        raise UserError(f"{p}: expected a non-empty list of golden prompts")
    out = []
    for i, it in enumerate(items):
        if not isinstance(it, dict) or not (it.get("prompt") or it.get("messages")):
            raise UserError(f"{p}: golden prompt #{i + 1} needs 'prompt' or 'messages'")
        msgs = it.get("messages") or [{"role": "user", "content": str(it["prompt"])}]
        rule = rule_from_dict(
            {k: it[k] for k in ("expect", "contains", "regex", "json") if k in it}, where=f"{p}: golden prompt #{i + 1}"
        )
        if not rule:
            raise UserError(f"{p}: golden prompt #{i + 1} needs 'expect' (substrings), 'regex' or 'json: true'")
        out.append({"name": str(it.get("name") or f"golden-{i + 1}"), "messages": msgs, "rule": rule})
    return out


def load_general(db: Database, ref: str | None) -> list[dict[str, Any]] | None:
    """General held-out items: ``{"text": ...}`` or ``{"messages": ...}`` (``None`` without a ref)."""
    if not ref:
        return None
    p = Path(ref)
    if p.is_file():
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"general set {p}: cannot read it as UTF-8 text: {e}") from None
        if p.suffix == ".jsonl":
            items = []
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except ValueError as e:
                    raise UserError(
                        f"general set {p}, line {n}: not valid JSON ({e}); each line must be an object with "
                        '"text" or "messages"'
                    ) from None
                if not isinstance(r, dict) or not ("messages" in r or "text" in r):
                    raise UserError(
                        f'general set {p}, line {n}: expected an object with "text" or "messages", got {line[:80]!r}'
                    )
                msgs = r.get("messages")
                if "messages" in r and not (
                    isinstance(msgs, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs)
                ):
                    raise UserError(
                        f'general set {p}, line {n}: "messages" must be a list of {{"role", "content"}} objects'
                    )
                items.append({"messages": msgs} if "messages" in r else {"text": str(r.get("text", ""))})
        else:
            items = [{"text": line.strip()} for line in lines if line.strip()]
    else:
        rows, _, _ = load_eval_rows(db, ref, None)
        items = [{"messages": r["messages"]} for r in rows]
    items = [i for i in items if i.get("messages") or i.get("text")]
    if not items:
        raise UserError(f"general set {ref!r} is empty")
    return items


# ---- model work ------------------------------------------------------------------------------------


def _load(m: ModelRef) -> tuple[CausalLM, Tokenizer]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.runtime import has_cuda

    dtype = torch.bfloat16 if has_cuda() else torch.float32
    tok_dir = m.adapter if m.adapter and (m.adapter / "tokenizer_config.json").is_file() else m.base
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    model: CausalLM = AutoModelForCausalLM.from_pretrained(str(m.base), dtype=dtype)
    if m.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(m.adapter))
    if has_cuda():
        model = model.to("cuda")
    model.eval()
    return model, tok


def _nll_many(model: CausalLM, seqs: list[tuple[list[int], list[int]]], batch: int = 16) -> list[tuple[float, int]]:
    """(sum of NLL over masked target tokens, their count) per sequence, in right-padded batches of similar length.

    ``mask[i]`` = 1 where token ``i`` is a target. Right padding under a causal model leaves every real
    position's logits unchanged; padded positions carry mask 0.
    """
    import torch

    out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    for k in range(0, len(order), batch):
        idx = order[k : k + batch]
        width = max(len(seqs[i][0]) for i in idx)
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        att = torch.zeros((len(idx), width), dtype=torch.long)
        tgt = torch.zeros((len(idx), width), dtype=torch.bool)
        for row, i in enumerate(idx):
            x, m = seqs[i]
            ids[row, : len(x)] = torch.tensor(x)
            att[row, : len(x)] = 1
            tgt[row, : len(m)] = torch.tensor(m, dtype=torch.bool)
        ids, att, tgt = ids.to(model.device), att.to(model.device), tgt.to(model.device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(2, ids[:, 1:, None])[..., 0]
        keep = tgt[:, 1:] & att[:, 1:].bool()
        for row, i in enumerate(idx):
            n = int(keep[row].sum())
            out[i] = (float(-lp[row][keep[row]].sum()), n) if n else (0.0, 0)
    return out


def generate_transformers(
    model: CausalLM, tok: Tokenizer, prompts: list[list[int]], max_new_tokens: int, batch: int = 8
) -> list[str]:
    """Greedy answers with transformers ``generate`` in left-padded batches (for models vLLM cannot serve)."""
    import torch

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    outs: list[str] = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=model.device)
        att = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids,
                attention_mask=att,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=pad,
            )
        for row in gen[:, width:].tolist():
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id)]
            outs.append(tok.decode(row, skip_special_tokens=True).strip())
    return outs


def _evaluate_one(
    m: ModelRef,
    rows: list[dict[str, Any]],
    golden: list[dict[str, Any]],
    general: list[dict[str, Any]] | None,
    max_new_tokens: int,
    progress: bool,
    generator: Generator | None = None,
    responses: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    import time

    from tuneloop.chat import render_prompt, split_answer, training_example

    model, tok = _load(m)
    try:
        per: dict[str, list[float]] = {k: [] for k in METRICS}
        tot_nll, tot_n = 0.0, 0
        exs = [training_example(tok, r["messages"], tools=r.get("tools")) for r in rows]
        for s, n in _nll_many(model, [(ex["input_ids"], ex["completion_mask"]) for ex in exs]):
            tot_nll, tot_n = tot_nll + s, tot_n + n
            loss = s / n if n else 0.0
            per["loss"].append(loss)
            per["perplexity"].append(math.exp(min(loss, 50.0)))
        use = generator if generator is not None and generator.supports(m.adapter) else None

        gen_s = [0.0]

        def generate(prompts: list[list[int]], hf: CausalLM = model) -> list[str]:
            t0 = time.perf_counter()
            try:
                if use is not None:
                    return use.generate(m.base, m.adapter, prompts, max_new_tokens)
                return generate_transformers(hf, tok, prompts, max_new_tokens)
            finally:
                gen_s[0] += time.perf_counter() - t0

        prompts = [render_prompt(tok, split_answer(r["messages"])[0], r.get("tools")) for r in rows]
        preds = generate(prompts)
        checked = [(r["check"], pred) for r, pred in zip(rows, preds) if r.get("check")]
        for r, pred in zip(rows, preds):
            ref = r["messages"][-1]["content"]
            for k, fn in TEXT_METRICS.items():
                per[k].append(fn(pred, ref))
        if checked:
            per["task_success"] = [float(rule.check(pred).passed) for rule, pred in checked]
        mean_loss = tot_nll / tot_n if tot_n else 0.0
        summary: dict[str, float | None] = {"loss": mean_loss, "perplexity": math.exp(min(mean_loss, 50.0))}
        for k in (*TEXT_METRICS, *(["task_success"] if checked else [])):
            summary[k] = sum(per[k]) / len(per[k]) if per[k] else 0.0
        gold = None
        if golden:
            outs = generate([render_prompt(tok, g["messages"]) for g in golden])
            results = []
            for g, out in zip(golden, outs):
                v = g["rule"].check(out)
                results.append(
                    {
                        "name": g["name"],
                        "output": out,
                        "passed": v.passed,
                        "missing": v.missing,
                        "unmatched": v.unmatched,
                        "reason": v.reason(),
                    }
                )
            gold = {"passed": sum(r["passed"] for r in results), "total": len(results), "results": results}
            summary["golden_pass_rate"] = gold["passed"] / gold["total"]
        if general:
            seqs = []
            for it in general:
                if "messages" in it:
                    ids = [int(t) for t in tok.apply_chat_template(it["messages"], tokenize=True, return_dict=False)]
                else:
                    ids = tok(it["text"], add_special_tokens=False)["input_ids"]
                ids = ids[:1024]
                if len(ids) >= 2:
                    seqs.append((ids, [1] * len(ids)))
            parts = _nll_many(model, seqs)
            g_nll, g_n = sum(p[0] for p in parts), sum(p[1] for p in parts)
            summary["general_perplexity"] = math.exp(min(g_nll / g_n, 50.0)) if g_n else None
        if responses:
            rex = [training_example(tok, r["messages"], tools=r.get("tools")) for r in responses]
            parts = _nll_many(model, [(ex["input_ids"], ex["completion_mask"]) for ex in rex])
            nll = [s_ / n_ for s_, n_ in parts if n_]
            per["production_nll"] = nll
            summary["production_nll"] = sum(nll) / len(nll) if nll else None
        generation = {
            "backend": "vllm" if use is not None else "transformers",
            "seconds": round(gen_s[0], 3),
            "prompts": len(prompts) + len(golden),
        }
        return {"summary": summary, "per_example": per, "golden": gold, "predictions": preds, "generation": generation}
    finally:
        del model
        import gc

        gc.collect()


def check_inputs(
    db: Database,
    settings: Settings,
    models: list[str] | None = None,
    golden: str | None = None,
    general: str | None = None,
) -> None:
    """Refuse unusable models, golden-prompt and general-set files (UserError) before an engine starts or
    anything is written; :func:`evaluate` reads the same inputs again."""
    if models:
        resolve_models(list(models), db, settings)
    load_golden(golden)
    load_general(db, general)


def evaluate(
    models: list[str],
    dataset_ref: str | None,
    db: Database,
    settings: Settings,
    golden: str | None = None,
    general: str | None = None,
    limit: int | None = None,
    max_new_tokens: int = 64,
    progress: bool = True,
    generator: Generator | None = None,
    responses: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Evaluate ``models`` on the same held-out examples and store the report (see module doc)."""
    from tuneloop.ids import new_id
    from tuneloop.timeparse import utcnow

    if not models:
        raise UserError("name at least one model to evaluate")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    refs = resolve_models(list(models), db, settings)
    if dataset_ref is None:
        from tuneloop.registry import get_version

        ds = next((get_version(db, m.version).dataset_id for m in refs if m.version), None)
        if not ds:
            raise UserError("no dataset given and no version with a recorded dataset: pass --dataset")
        dataset_ref = ds
    from tuneloop.trainer.classify_eval import evaluate_classifiers, is_classifier

    if any(m.adapter is None and is_classifier(m.base) for m in refs):  # classifiers: accuracy, F1, confusion
        if golden or general or responses:
            raise UserError("golden prompts, general sets and production answers are for chat models, not classifiers")
        models_ = [(m.name, m.base, m.adapter) for m in refs]
        return evaluate_classifiers(models_, dataset_ref, db, settings, limit=limit, progress=progress)
    rows, ds_id, split = load_eval_rows(db, dataset_ref, limit)
    gold = load_golden(golden)
    gen = load_general(db, general)
    if gen is not None and limit is not None:
        gen = gen[:limit]
    results = {}
    for m in refs:
        if progress:
            print(f"evaluating {m.name} on {len(rows)} {split} examples ...", file=sys.stderr, flush=True)
        results[m.name] = _evaluate_one(m, rows, gold, gen, max_new_tokens, progress, generator, responses)
    rid = new_id()
    created = utcnow()
    names = [m.name for m in refs]
    report: dict[str, Any] = {
        "id": rid,
        "created_at": created.isoformat() + "Z",
        "dataset_id": ds_id or str(dataset_ref),
        "split": split,
        "n_examples": len(rows),
        "example_ids": [r["id"] for r in rows],
        "models": names,
        "model_paths": {m.name: {"base": str(m.base), "adapter": str(m.adapter) if m.adapter else None} for m in refs},
        "max_new_tokens": max_new_tokens,
        "golden_file": golden,
        "general_set": general,
        "production_responses": len(responses or []),
        "summary": {n: results[n]["summary"] for n in names},
        "per_example": {n: results[n]["per_example"] for n in names},
        "golden": {n: results[n]["golden"] for n in names} if gold else {},
        "generation": {n: results[n]["generation"] for n in names},
        "samples": [
            {
                "id": r["id"],
                "prompt": r["messages"][-2]["content"] if len(r["messages"]) > 1 else "",
                "reference": r["messages"][-1]["content"],
                **{n: results[n]["predictions"][i] for n in names},
            }
            for i, r in enumerate(rows[:5])
        ],
    }
    out_dir = settings.paths.sub("reports")
    path = out_dir / f"eval-{rid}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    report["path"] = str(path)
    record_report(db, report, created)
    return report


def record_report(db: Database, report: dict[str, Any], created: datetime) -> None:
    """Store ``report`` (as :func:`evaluate` builds it) in ``eval_reports``: one portable INSERT, the report as
    strict JSON (:func:`tuneloop.db.dumps`: NaN and infinities as null), so the same on a DuckDB file and on
    PostgreSQL."""
    from tuneloop.registry import save_eval_report

    save_eval_report(db, report["id"], report["dataset_id"], report["models"], report, report.get("path"), created)


def format_report(report: dict[str, Any]) -> str:
    """A plain-text comparison table (one row per model) plus where the report lives."""
    import io

    if report.get("task") == "classification":
        from tuneloop.trainer.classify_eval import format_classification_report

        return format_classification_report(report)

    from tuneloop.table import print_table

    cols = [*METRICS, "task_success", "golden_pass_rate", "general_perplexity"]
    present = [c for c in cols if any(report["summary"][m].get(c) is not None for m in report["models"])]
    buf = io.StringIO()
    print_table(
        ["model", *present],
        [[m, *[report["summary"][m].get(c) for c in present]] for m in report["models"]],
        title=f"{report['n_examples']} {report['split']} examples of {report['dataset_id']}",
        file=buf,
    )
    for m, g in (report.get("golden") or {}).items():
        if g:
            failed = [r["name"] for r in g["results"] if not r["passed"]]
            buf.write(
                f"golden {m}: {g['passed']}/{g['total']} passed"
                + (f" (failed: {', '.join(failed)})" if failed else "")
                + "\n"
            )
    buf.write(f"report {report['id']}: {report.get('path')}\n")
    return buf.getvalue().rstrip()
