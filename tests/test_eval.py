"""`tuneloop eval`: models compared on the same held-out examples; report stored as a file and a DB row.

Two different random tiny models stand in for "candidate" and "baseline" (no
training needed); adapter versions are evaluated in tests/test_merge.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import copy_home

from tuneloop.textmetrics import exact_match, rouge_l, token_f1


def test_text_metrics_follow_their_definitions():
    assert exact_match("Paris.", "paris") == 1.0 and exact_match("Paris is", "Paris") == 0.0
    assert token_f1("the cat sat", "the cat sat down") == pytest.approx(2 * 1.0 * 0.75 / 1.75)
    assert token_f1("dog", "cat") == 0.0
    # LCS of (a b c d) and (a c d e) is (a c d): P = R = 3/4
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert rouge_l("", "") == 1.0 and rouge_l("x", "") == 0.0


@pytest.fixture(scope="module")
def ws(tiny_model, chat_seed, tmp_path_factory):
    from tuneloop.trainer.bootstrap import build_tiny_model

    root = tmp_path_factory.mktemp("eval")
    other = build_tiny_model(root / "other-tiny", seed=1)
    _, cli = copy_home(chat_seed, root)  # dataset 'chat' prepared once per session (conftest)
    (root / "golden.yaml").write_text(
        "- name: anything\n  prompt: Say something\n  regex: '(?s).*'\n"
        "- name: impossible\n  prompt: What is AI?\n  expect: [this exact sentence will not be generated]\n"
    )
    (root / "general.txt").write_text(
        "The quick brown fox jumps over the lazy dog.\n\nParis is the capital of France.\n"
    )
    from tuneloop.db import open_database

    return {
        "root": root,
        "cli": cli,
        "a": str(tiny_model),
        "b": str(other),
        "db": open_database(root / "home" / "tuneloop.duckdb"),
    }


@pytest.mark.slow
def test_eval_compares_models_on_the_same_examples_prints_a_table_and_stores_the_report(ws):
    r = ws["cli"](
        "eval",
        ws["a"],
        ws["b"],
        "--dataset",
        "chat",
        "--limit",
        "3",
        "--max-new-tokens",
        "4",
        "--golden",
        ws["root"] / "golden.yaml",
        "--general",
        ws["root"] / "general.txt",
    )
    # the table (what a user reads), then the stored report it names (what --json prints)
    assert "perplexity" in r.stdout and "token_f1" in r.stdout and "golden_pass_rate" in r.stdout
    report_line = next(line for line in r.stdout.splitlines() if line.startswith("report "))
    rep = json.loads(Path(report_line.split(": ", 1)[1]).read_text())
    a, b = ws["a"], ws["b"]
    assert rep["models"] == [a, b] and rep["split"] == "test" and rep["n_examples"] == 3
    assert len(rep["example_ids"]) == 3
    for m in (a, b):
        s = rep["summary"][m]
        for metric in (
            "loss",
            "perplexity",
            "exact_match",
            "token_f1",
            "rouge_l",
            "golden_pass_rate",
            "general_perplexity",
        ):
            assert s[metric] is not None
        assert s["perplexity"] > 1 and s["general_perplexity"] > 1
        for metric in ("loss", "perplexity", "exact_match", "token_f1", "rouge_l"):
            assert len(rep["per_example"][m][metric]) == 3
        g = rep["golden"][m]
        assert (g["passed"], g["total"]) == (1, 2)
        assert [x["passed"] for x in g["results"]] == [True, False]
        assert g["results"][1]["missing"] == ["this exact sentence will not be generated"]
    # different weights, same examples: different losses
    assert rep["per_example"][a]["loss"] != rep["per_example"][b]["loss"]

    rows = ws["db"].query("SELECT id, dataset_id, models, path FROM eval_reports WHERE id = ?", [rep["id"]])
    assert len(rows) == 1 and json.loads(rows[0]["models"]) == [a, b]
    assert rows[0]["dataset_id"].startswith("chat@")
    saved = json.loads(Path(rows[0]["path"]).read_text())
    assert saved["per_example"] == rep["per_example"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["no-such-version"], "unknown model 'no-such-version'"),
        (["base", "--dataset", "chat"], "'base' means the base model of a registered version"),
        (["{a}", "--dataset", "nope"], "cannot load dataset 'nope'"),
        (["{a}", "--dataset", "chat", "--golden", "missing.yaml"], "golden prompts file not found"),
    ],
)
def test_bad_eval_input_exits_2_without_a_report(ws, args, message):
    before = ws["db"].query("SELECT count(*) AS n FROM eval_reports")[0]["n"]
    r = ws["cli"]("eval", *[a.format(a=ws["a"]) for a in args], check=False)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert ws["db"].query("SELECT count(*) AS n FROM eval_reports")[0]["n"] == before


@pytest.mark.engine
@pytest.mark.slow
def test_eval_generates_on_vllm_with_the_adapter_as_a_lora_request_and_matches_transformers_greedy(ws, tiny_model):
    from fixtures_server import make_lora

    from tuneloop.ids import hash_path
    from tuneloop.registry import ModelVersion, register_version
    from tuneloop.server.offline_engine import OfflineGenerator
    from tuneloop.settings import load_settings
    from tuneloop.trainer.evaluate import evaluate

    db, settings = ws["db"], load_settings(overrides=[f"paths.home={ws['root'] / 'home'}"])
    lora = make_lora(tiny_model, ws["root"] / "lora-eval", seed=5)
    register_version(
        db,
        ModelVersion(
            name="eval-lora", kind="adapter", base_model=str(tiny_model), path=str(lora), content_hash=hash_path(lora)
        ),
    )
    args = (["eval-lora", "base"], "chat", db, settings)
    kw = dict(limit=6, max_new_tokens=12, progress=False)
    with OfflineGenerator(settings.engine) as g:
        on_vllm = evaluate(*args, generator=g, **kw)
        assert g.start_s > 0  # one engine for the base and its adapter
    on_hf = evaluate(*args, **kw)
    assert {n: on_vllm["generation"][n]["backend"] for n in ("eval-lora", "base")} == {
        "eval-lora": "vllm",
        "base": "vllm",
    }
    assert {n: on_hf["generation"][n]["backend"] for n in ("eval-lora", "base")} == {
        "eval-lora": "transformers",
        "base": "transformers",
    }

    # a random model emits byte tokens that are not whole UTF-8 characters: transformers decodes them to U+FFFD,
    # vLLM's incremental detokenizer drops them; everything else must be the same text
    def text(answer: str) -> str:
        return answer.replace("\ufffd", "").strip()

    vllm_answers = [text(s["eval-lora"]) for s in on_vllm["samples"]], [text(s["base"]) for s in on_vllm["samples"]]
    hf_answers = [text(s["eval-lora"]) for s in on_hf["samples"]], [text(s["base"]) for s in on_hf["samples"]]
    assert vllm_answers[0] != vllm_answers[1]  # the LoRA request changed the answers
    assert vllm_answers == hf_answers  # greedy fp32: the same answers from both engines
    assert on_vllm["per_example"]["eval-lora"]["token_f1"] == on_hf["per_example"]["eval-lora"]["token_f1"]


@pytest.mark.slow
def test_rows_with_a_check_are_scored_for_task_success_in_row_order(ws, tiny_model):
    """A dataset row may carry a checkable rule; the report scores it per checked row (1 = the answer passes)."""
    from tuneloop.dataset_store import save_dataset

    def row(i, check):
        r = {
            "id": f"c{i}",
            "messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "x"}],
        }
        return {**r, "check": check} if check else r

    test = [
        row(0, {"regex": "(?s).*"}),
        row(1, {"contains": "this exact sentence will not be generated"}),
        row(2, None),
    ]
    home = ws["root"] / "home"
    save_dataset(ws["db"], home, "checked", {"train": [row(9, None)], "test": test}, "sft", {}, {"kind": "test"})
    r = ws["cli"]("eval", ws["a"], "--dataset", "checked", "--max-new-tokens", "3", "--json")
    rep = json.loads(r.stdout[r.stdout.index("{\n") :])
    per = rep["per_example"][ws["a"]]
    assert per["task_success"] == [1.0, 0.0]  # the unchecked row is not scored
    assert rep["summary"][ws["a"]]["task_success"] == pytest.approx(0.5)
    assert len(per["bleu"]) == len(per["token_f1"]) == 3


def test_batched_nll_equals_one_sequence_at_a_time(tiny_model):
    """Right-padded batches of mixed lengths give each sequence the NLL it gets alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from tuneloop.trainer.evaluate import _nll_many

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    seqs = []
    for n in (5, 17, 9, 30, 2, 12):
        ids = torch.randint(3, 100, (n,), generator=g).tolist()
        seqs.append((ids, [0] * (n // 2) + [1] * (n - n // 2)))
    alone = [_nll_many(model, [s])[0] for s in seqs]
    batched = _nll_many(model, seqs, batch=4)
    # every masked token but the first (nothing predicts position 0) is a target
    assert [n for _, n in batched] == [n for _, n in alone] == [sum(mask[1:]) for _, mask in seqs]
    assert [v for v, _ in batched] == pytest.approx([v for v, _ in alone], rel=1e-4)
