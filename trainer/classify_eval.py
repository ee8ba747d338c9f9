"""Held-out evaluation of sequence classifiers (``tuneloop eval`` on classification versions).

Contract
--------
* :func:`is_classifier` says whether a model folder is a sequence classifier
  (``config.json``'s ``architectures[0]`` ends in ``ForSequenceClassification``);
  :func:`tuneloop.trainer.evaluate.evaluate` hands such models here.
* :func:`predict` runs batched transformers forwards (no gradients, texts sorted by
  length to cut padding, GPU when there is one) and returns each text's predicted
  label (the folder's ``id2label``) and class probabilities (softmax of the logits).
  Transformers rather than vLLM's pooling engine: on CPU an offline vLLM engine takes
  longer to start than a small classifier takes to score a held-out split, and the
  scores are the same (softmax of the same logits).
* :func:`classification_metrics` (scikit-learn): ``accuracy``, ``macro_precision``,
  ``macro_recall``, ``macro_f1`` (zero_division=0), ``per_class[label] = {precision,
  recall, f1, support}`` and ``confusion_matrix`` (rows = true label, columns =
  predicted, both in ``labels`` order). :func:`majority_baseline` is the same for a
  model that always predicts the most frequent training label.
* :func:`evaluate_classifiers` scores models (``(name, folder, adapter)``: classifier folders,
  e.g. of classification versions; an adapter or any other folder is a UserError) on a classification dataset's
  ``test`` split (``validation`` when test is empty), first ``limit`` rows, the same rows
  in the same order for every model. The report (JSON-safe) has ``id``, ``created_at``,
  ``task: "classification"``, ``dataset_id``, ``split``, ``n_examples``, ``example_ids``,
  ``models``, ``model_paths``, ``labels`` (the dataset's ``label_names``, then any other
  predicted label), ``references`` (true labels), ``predictions[model]`` (predicted
  labels), ``summary[model]`` (accuracy and macro P/R/F1), ``per_class[model]``,
  ``confusion_matrix[model]``, ``per_example[model]["correct"]`` (1.0/0.0 per example),
  ``baseline`` (the majority class: ``label`` and its metrics), ``timing`` and
  ``samples``. It is written to ``<home>/reports/eval-<id>.json`` and stored in
  ``eval_reports`` like every eval report (:func:`tuneloop.registry.save_eval_report`).
  This module never imports :mod:`tuneloop.trainer.evaluate` (which dispatches here) nor
  :mod:`tuneloop.trainer.classify` (which imports it).
* :func:`load_classification_dataset` loads a classification dataset with its label order
  (the card's ``label_names``); another kind, unknown labels or fewer than 2 labels are a
  UserError.
* :func:`format_classification_report` prints it as tables: the models and the
  majority baseline, F1 per class, and each model's confusion matrix.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.errors import UserError

if TYPE_CHECKING:
    from datasets import DatasetDict

    from tuneloop.db import Database
    from tuneloop.settings import Settings

Model = tuple[str, Path, Path | None]
"""A model to evaluate: (name as given, model folder, adapter folder or None)."""

SUMMARY = ("accuracy", "macro_precision", "macro_recall", "macro_f1")


def is_classifier(folder: str | Path) -> bool:
    """Whether ``folder`` holds a sequence-classification model (its config's first architecture)."""
    f = Path(folder) / "config.json"
    try:
        archs = json.loads(f.read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return bool(archs) and str(archs[0]).endswith("ForSequenceClassification")


def predict(
    folder: str | Path, texts: Sequence[str], batch_size: int = 32, max_length: int = 1024
) -> tuple[list[str], list[list[float]]]:
    """(predicted label, class probabilities in id order) of each text, in order (see module doc)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model: Any = AutoModelForSequenceClassification.from_pretrained(str(folder)).to(device).eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    probs: list[list[float]] = [[] for _ in texts]
    try:
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                enc = tok(
                    [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
                )
                logits = model(**enc.to(device)).logits.float()
                for i, p in zip(idx, torch.softmax(logits, dim=-1).cpu().tolist()):
                    probs[i] = p
    finally:
        del model
    labels = [id2label[max(range(len(p)), key=p.__getitem__)] for p in probs]
    return labels, probs


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro and per-class precision/recall/F1 and the confusion matrix (scikit-learn; see module doc)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    labels = list(labels)
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    pc, rc, fc, sc = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_precision": float(p),
        "macro_recall": float(r),
        "macro_f1": float(f),
        "per_class": {
            lab: {"precision": float(pc[i]), "recall": float(rc[i]), "f1": float(fc[i]), "support": int(sc[i])}
            for i, lab in enumerate(labels)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def majority_label(train_labels: Sequence[str]) -> str:
    """The most frequent training label (ties: the first in sorted order)."""
    counts = Counter(str(x) for x in train_labels)
    if not counts:
        raise UserError("no training labels to find the majority class of")
    return min(counts, key=lambda k: (-counts[k], k))


def majority_baseline(train_labels: Sequence[str], y_true: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """:func:`classification_metrics` of always predicting the majority training label, plus that ``label``."""
    lab = majority_label(train_labels)
    m = classification_metrics(y_true, [lab] * len(y_true), labels)
    return {"label": lab, **{k: m[k] for k in SUMMARY}}


def load_classification_dataset(db: Database, ref: str) -> tuple[DatasetDict, str | None, list[str]]:
    """(DatasetDict, dataset id, label order) of a classification dataset; a UserError for any other kind."""
    from tuneloop.dataset_store import kind_of_columns, load_card, load_splits
    from tuneloop.registry import RegistryError

    try:
        dd = load_splits(db, ref)
        card = load_card(db, ref)
    except (FileNotFoundError, RegistryError, UserError) as e:
        raise UserError(f"cannot load dataset {ref!r}: {e}") from None
    kind = kind_of_columns(dd["train"].column_names) if "train" in dd else None
    if kind != "classification":
        raise UserError(
            f"task=classification needs a classification dataset (text/label rows, e.g. `tuneloop data prepare` on "
            f"{{text, label}} rows); {ref!r} is {kind or 'of an unknown kind'}"
        )
    seen = {str(x) for s in dd for x in dd[s]["label"]}
    names = [str(x) for x in card.get("label_names") or sorted(seen)]
    unknown = sorted(seen - set(names))
    if unknown:
        raise UserError(f"dataset {ref!r} has labels {unknown} that its card's label_names {names} lacks")
    if len(names) < 2:
        raise UserError(f"dataset {ref!r} has {len(names)} label(s) {names}: a classifier needs at least 2")
    return dd, card.get("id"), names


def load_classification_split(
    db: Database, dataset_ref: str, limit: int | None
) -> tuple[list[dict[str, Any]], list[str], list[str], str | None, str]:
    """(held-out rows, train labels, label order, dataset id, split) of a classification dataset."""
    dd, ds_id, names = load_classification_dataset(db, dataset_ref)
    split = "test" if "test" in dd and len(dd["test"]) else "validation"
    if split not in dd or not len(dd[split]):
        raise UserError(f"dataset {dataset_ref!r} has no test or validation rows to evaluate on")
    ds = dd[split]
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be >= 1, got {limit}")
        ds = ds.select(range(min(limit, len(ds))))
    rows = [{"id": str(r["id"]), "text": r["text"], "label": str(r["label"])} for r in ds]
    return rows, [str(x) for x in dd["train"]["label"]], names, ds_id, split


def evaluate_classifiers(
    models: list[Model],
    dataset_ref: str,
    db: Database,
    settings: Settings,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score classifier ``refs`` on the held-out split, store and return the report (see module doc)."""
    from tuneloop.ids import new_id
    from tuneloop.registry import save_eval_report
    from tuneloop.timeparse import utcnow

    for name, folder, adapter in models:
        if adapter is not None or not is_classifier(folder):
            raise UserError(
                f"{name} is not a sequence classifier (a classification version or a *ForSequenceClassification "
                "folder): classifiers are evaluated only against classifiers"
            )
    rows, train_labels, names, ds_id, split = load_classification_split(db, dataset_ref, limit)
    y_true = [r["label"] for r in rows]
    texts = [r["text"] for r in rows]
    preds: dict[str, list[str]] = {}
    timing: dict[str, float] = {}
    for name, folder, _ in models:
        if progress:
            print(f"evaluating {name} on {len(rows)} {split} examples ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        preds[name] = predict(folder, texts)[0]
        timing[name] = round(time.monotonic() - t0, 3)
    extra = sorted({p for ps in preds.values() for p in ps} - set(names))
    labels = [*names, *extra]
    metrics = {n: classification_metrics(y_true, p, labels) for n, p in preds.items()}
    rid = new_id()
    created = utcnow()
    model_names = [name for name, _, _ in models]
    report: dict[str, Any] = {
        "id": rid,
        "created_at": created.isoformat() + "Z",
        "task": "classification",
        "dataset_id": ds_id or str(dataset_ref),
        "split": split,
        "n_examples": len(rows),
        "example_ids": [r["id"] for r in rows],
        "models": model_names,
        "model_paths": {name: {"base": str(folder), "adapter": None} for name, folder, _ in models},
        "labels": labels,
        "references": y_true,
        "predictions": preds,
        "summary": {n: {k: metrics[n][k] for k in SUMMARY} for n in model_names},
        "per_class": {n: metrics[n]["per_class"] for n in model_names},
        "confusion_matrix": {n: metrics[n]["confusion_matrix"] for n in model_names},
        "per_example": {n: {"correct": [float(p == t) for p, t in zip(preds[n], y_true)]} for n in model_names},
        "baseline": majority_baseline(train_labels, y_true, labels),
        "timing": {"backend": "transformers", "seconds": timing},
        "samples": [
            {"id": r["id"], "text": r["text"], "reference": r["label"], **{n: preds[n][i] for n in model_names}}
            for i, r in enumerate(rows[:5])
        ],
    }
    path = settings.paths.sub("reports") / f"eval-{rid}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    report["path"] = str(path)
    # stored as every eval report is (tuneloop.trainer.evaluate.record_report: strict JSON, either backend)
    save_eval_report(db, rid, report["dataset_id"], model_names, report, str(path), created)
    return report


def format_classification_report(report: dict[str, Any]) -> str:
    """Plain-text tables: models + majority baseline, F1 per class, confusion matrices; then where the report is."""
    import io

    from tuneloop.table import print_table

    buf = io.StringIO()
    models = report["models"]
    b = report.get("baseline") or {}
    rows = [[m, *[report["summary"][m].get(k) for k in SUMMARY]] for m in models]
    if b:
        rows.append([f"majority class ({b['label']})", *[b.get(k) for k in SUMMARY]])
    title = f"{report['n_examples']} {report['split']} examples of {report['dataset_id']}"
    print_table(["model", *SUMMARY], rows, title=title, file=buf)
    buf.write("\n")
    labels = report["labels"]
    per_class = [
        [lab, report["per_class"][models[0]][lab]["support"], *[report["per_class"][m][lab]["f1"] for m in models]]
        for lab in labels
    ]
    print_table(["label", "support", *[f"f1 {m}" for m in models]], per_class, title="F1 per class", file=buf)
    for m in models:
        buf.write("\n")
        cm = report["confusion_matrix"][m]
        print_table(
            ["true \\ predicted", *labels],
            [[lab, *cm[i]] for i, lab in enumerate(labels)],
            title=f"confusion matrix of {m}",
            file=buf,
        )
    buf.write(f"report {report['id']}: {report.get('path')}\n")
    return buf.getvalue().rstrip()
