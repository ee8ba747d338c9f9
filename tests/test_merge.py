"""Adapter -> eval -> merge -> serve: the trained LoRA adapter and its merged folder both run in real vLLM.

`tuneloop merge` registers a plain HF folder (kind merged, parent = the adapter
version) only when its logits match base+adapter; vLLM then generates from the
adapter (LoRARequest on the base) and from the merged folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import CLI

pytestmark = [pytest.mark.train, pytest.mark.slow]

VLLM_SCRIPT = textwrap.dedent("""
    import json, sys
    if __name__ == "__main__":
        from transformers import AutoTokenizer
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest
        from tuneloop.chat import render_prompt

        model, adapter = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
        kw = dict(enable_lora=True, max_lora_rank=8, max_loras=1) if adapter else {}
        llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=4, seed=0, **kw)
        tok = AutoTokenizer.from_pretrained(adapter or model)
        ids = render_prompt(tok, [{"role": "user", "content": "What is AI?"}])
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=8, temperature=0.0),
                           lora_request=LoRARequest("adapter", 1, adapter) if adapter else None)
        o = out[0].outputs[0]
        print("RESULT " + json.dumps({"token_ids": list(o.token_ids), "text": o.text}))
""")


@pytest.fixture(scope="module")
def ws(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    cli = CLI(root, dict(os.environ, TUNELOOP_HOME=str(root / "home")))
    cli("data", "corpus", "chatterbot-corpus", "-o", root / "chat.jsonl", "--limit", "30")
    cli("data", "prepare", root / "chat.jsonl", "--name", "chat", "--base", tiny_model, "--no-progress")
    cli("train", f"base={tiny_model}", "dataset=chat", "name=chat-v1", "max_steps=2", "learning_rate=0.01", "--quiet")
    from tuneloop.db import Database

    return {"root": root, "cli": cli, "db": Database(root / "home" / "tuneloop.duckdb"), "base": str(tiny_model)}


def test_adapter_version_is_evaluated_against_its_base(ws):
    r = ws["cli"]("eval", "chat-v1", "base", "--limit", "2", "--max-new-tokens", "2", "--json")
    rep = json.loads(r.stdout[r.stdout.index("{\n") :])
    assert rep["models"] == ["chat-v1", "base"]
    assert rep["model_paths"]["base"]["base"] == ws["base"] and rep["model_paths"]["base"]["adapter"] is None
    assert rep["model_paths"]["chat-v1"]["adapter"].endswith("model")
    # the adapter changed the model: the same examples get different losses
    assert rep["per_example"]["chat-v1"]["loss"] != rep["per_example"]["base"]["loss"]


def test_merge_fails_above_tolerance_and_registers_nothing(ws):
    from tuneloop.registry import RegistryError, get_version

    r = ws["cli"]("merge", "chat-v1", "--name", "too-strict", "--tolerance", "1e-12", check=False)
    assert r.returncode == 2, r.stderr
    assert "differ from base+adapter by up to" in r.stderr and "nothing registered" in r.stderr
    with pytest.raises(RegistryError):
        get_version(ws["db"], "too-strict")
    assert not (ws["root"] / "home" / "models" / "too-strict").exists()


def test_merge_refuses_non_adapters(ws):
    r = ws["cli"]("merge", "no-such", check=False)
    assert r.returncode == 2 and "unknown model version 'no-such'" in r.stderr


@pytest.mark.engine
def test_merged_folder_and_adapter_both_generate_in_vllm(ws):
    from tuneloop.ids import hash_path
    from tuneloop.registry import get_version

    r = ws["cli"]("merge", "chat-v1")
    assert "registered chat-v1-merged (merged, parent chat-v1)" in r.stdout
    m, a = get_version(ws["db"], "chat-v1-merged"), get_version(ws["db"], "chat-v1")
    assert (
        m.kind == "merged" and m.parent_version == "chat-v1" and m.dataset_id == a.dataset_id and m.run_id == a.run_id
    )
    assert m.content_hash == hash_path(m.path) and m.metrics["parity_max_abs_diff"] <= 1e-3
    merged = Path(m.path)
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    assert (merged / "tokenizer_config.json").is_file() and not (merged / "adapter_config.json").exists()

    script = ws["root"] / "vllm_generate.py"
    script.write_text(VLLM_SCRIPT)
    results = {}
    for label, argv in (("adapter", [ws["base"], a.path]), ("merged", [m.path])):
        p = subprocess.run(
            [sys.executable, str(script), *argv],
            capture_output=True,
            text=True,
            timeout=600,
            env=dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0"),
        )
        assert p.returncode == 0, p.stderr[-3000:]
        line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))
        results[label] = json.loads(line[len("RESULT ") :])
    for label, res in results.items():
        assert len(res["token_ids"]) >= 1, (label, res)
