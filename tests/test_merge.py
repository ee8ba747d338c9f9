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
from conftest import copy_home

pytestmark = [pytest.mark.train, pytest.mark.slow]

PROMPTS = ["What is AI?", "Tell me a joke.", "Do you like music?", "Where do you live?"]
MAX_TOKENS = 16
LOGPROB_TOLERANCE = 1e-3  # the merge's own parity bound on logits (tuneloop merge --tolerance default)

# one process, two engines one after the other (as the offline evaluator replaces engines): greedy fp32 answers
# and the logprob of each chosen token, from base + adapter (a LoRARequest) and from the merged folder
VLLM_SCRIPT = textwrap.dedent("""
    import gc, json, sys
    if __name__ == "__main__":
        from transformers import AutoTokenizer
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest
        from tuneloop.chat import render_prompt

        base, adapter, merged, prompts, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5])
        results = {}
        for label, model, lora in (("adapter", base, adapter), ("merged", merged, None)):
            kw = dict(enable_lora=True, max_lora_rank=8, max_loras=1) if lora else {}
            llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=4, seed=0, **kw)
            tok = AutoTokenizer.from_pretrained(lora or model)
            ids = [TokensPrompt(prompt_token_ids=render_prompt(tok, [{"role": "user", "content": p}])) for p in prompts]
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=1, ignore_eos=True)
            outs = llm.generate(ids, params, lora_request=LoRARequest("adapter", 1, lora) if lora else None)
            results[label] = [
                {"token_ids": list(o.outputs[0].token_ids),
                 "logprobs": [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]}
                for o in outs
            ]
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
        print("RESULT " + json.dumps(results))
""")


@pytest.fixture(scope="module")
def ws(tiny_model, chat_seed, tmp_path_factory):
    """A copy of the session's prepared home: dataset 'chat' and chat-v1, a LoRA trained on it (conftest)."""
    root = tmp_path_factory.mktemp("merge")
    home, cli = copy_home(chat_seed, root)
    from tuneloop.db import open_database

    return {"root": root, "cli": cli, "db": open_database(home / "tuneloop.duckdb"), "base": str(tiny_model)}


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
def test_merged_folder_generates_in_vllm_exactly_what_base_plus_adapter_generates(ws):
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
    p = subprocess.run(
        [sys.executable, str(script), ws["base"], a.path, m.path, json.dumps(PROMPTS), str(MAX_TOKENS)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0"),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))
    results = json.loads(line[len("RESULT ") :])
    # greedy fp32: the merged folder generates exactly what base + adapter generates, token for token, and each
    # chosen token's logprob agrees within the merge's logit tolerance
    for prompt, via_adapter, via_merged in zip(PROMPTS, results["adapter"], results["merged"], strict=True):
        assert len(via_adapter["token_ids"]) == MAX_TOKENS, prompt
        assert via_merged["token_ids"] == via_adapter["token_ids"], prompt
        diffs = [abs(x - y) for x, y in zip(via_adapter["logprobs"], via_merged["logprobs"], strict=True)]
        assert max(diffs) <= LOGPROB_TOLERANCE, (prompt, max(diffs))
