"""Every PEFT method trains for real and ends up served the way the methods table says, or is refused.

Each row of :data:`tuneloop.trainer.peft_methods.METHODS` trains 2 steps on the tiny Llama (real TRL + PEFT,
in-process, a real DuckDB file) and registers a version: LoRA adapters as ``adapter`` (vLLM hot-swaps them),
the methods vLLM cannot load merged into full weights (kind ``merged``, logit parity with base+adapter), prompt
learning registered but refused at gate and promote. One merged row (DoRA, which vLLM refuses as an adapter)
is loaded by vLLM's offline engine and generates what base+adapter generates under PEFT.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import workspace

from tuneloop.trainer.peft_methods import METHODS, peft_config, registered_kind

pytestmark = [pytest.mark.train, pytest.mark.slow]

# what each method's trainable parameters are called in PEFT (everything else must stay frozen)
PARAM_MARKERS = {
    "lora": ("lora_A", "lora_B"),
    "qlora": ("lora_A", "lora_B"),
    "dora": ("lora_A", "lora_B", "lora_magnitude_vector"),
    "adalora": ("lora_A", "lora_B", "lora_E"),
    "ia3": ("ia3_l",),
    "loha": ("hada_",),
    "lokr": ("lokr_",),
    "oft": ("oft_",),
    "prompt_tuning": ("prompt_encoder", "prompt_embeddings"),
    "prefix_tuning": ("prompt_encoder", "prompt_embeddings"),
}
PROMPT = [{"role": "user", "content": "What is AI?"}]


@pytest.fixture(scope="module")
def ws(tiny_model, chat_seed, tmp_path_factory):
    """A copy of the session's prepared home (SFT dataset 'chat'), its settings and a cache of trained runs."""
    from tuneloop.settings import load_settings

    w = workspace(tiny_model, chat_seed, tmp_path_factory.mktemp("peft"))
    w["settings"] = load_settings(overrides=[f"paths.home={w['home']}"])
    w["runs"] = {}
    return w


def trained(ws, method: str):
    """The 2-step run of ``method`` on 'chat' (trained once per module)."""
    if method not in ws["runs"]:
        from tuneloop.trainer.train import train

        ws["runs"][method] = train(_cfg(ws, method), ws["db"], ws["settings"], progress=False)
    return ws["runs"][method]


def _cfg(ws, method: str):
    from tuneloop.config import build
    from tuneloop.trainer.config import TrainConfig

    args = [f"base={ws['base']}", "dataset=chat", f"method={method}", f"name=pm-{method}", "max_steps=2"]
    return build(TrainConfig, {}, [*args, "batch_size=2", "learning_rate=0.01", "save_steps=0"])


def _peft_model(base: str, adapter: Path, trainable: bool = False):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable).eval()


def _logits(model, ids: list[int]):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def _prompt_ids(folder: str) -> list[int]:
    from transformers import AutoTokenizer

    from tuneloop.chat import render_prompt

    return render_prompt(AutoTokenizer.from_pretrained(folder), PROMPT)


def test_the_table_covers_every_sft_adapter_method_and_each_builds_its_peft_type():
    from tuneloop.trainer.config import PEFT_METHODS, TrainConfig

    assert set(METHODS) == {"lora", "qlora", "prompt_tuning", *PEFT_METHODS}
    for name, m in METHODS.items():
        built = peft_config(TrainConfig(dataset="d", method=name, max_steps=10))  # type: ignore[arg-type]
        assert built is not None and str(built.peft_type.value) == m.peft_type, name
        assert m.serving in ("adapter", "merged", "refused") and m.reason and m.when and m.trainable
    assert peft_config(TrainConfig(dataset="d", method="full")) is None
    dora = peft_config(TrainConfig(dataset="d", method="dora"))
    assert getattr(dora, "use_dora", False) is True
    # AdaLoRA schedules its rank budget over the run: from max_steps, else from the epochs' steps
    assert getattr(peft_config(TrainConfig(dataset="d", method="adalora", max_steps=7)), "total_step", 0) == 7
    assert getattr(peft_config(TrainConfig(dataset="d", method="adalora"), total_steps=30), "total_step", 0) == 30


def test_adalora_without_a_step_count_is_a_user_error():
    from tuneloop.errors import UserError
    from tuneloop.trainer.config import TrainConfig

    with pytest.raises(UserError, match="method=adalora needs the number of training steps"):
        peft_config(TrainConfig(dataset="d", method="adalora"))


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_two_steps_only_its_peft_parameters_and_registers_its_serving_kind(ws, method):
    from tuneloop.ids import hash_path
    from tuneloop.registry import get_run, get_version

    res = trained(ws, method)
    m = METHODS[method]
    v = get_version(ws["db"], f"pm-{method}")
    assert v.kind == registered_kind(method) == ("merged" if m.serving == "merged" else "adapter")
    assert (
        res.metrics["steps"] == 2 and v.content_hash == hash_path(v.path) == get_run(ws["db"], v.run_id).artifact_hash
    )
    assert v.path == res.output_path and get_run(ws["db"], v.run_id).method == method

    # the raw PEFT adapter stays in the run folder (model/), whatever is served
    adapter = Path(v.path).parent / "model"
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["peft_type"] == m.peft_type and conf.get("use_dora", False) == (method == "dora")
    # only the method's parameters train: on a fresh base, the method's PEFT config leaves trainable exactly
    # PEFT's own tensors, as many as the run recorded, and the saved adapter holds only such tensors
    from peft import get_peft_model
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(ws["base"]), peft_config(_cfg(ws, method)))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(any(k in n for k in PARAM_MARKERS[method]) for n in names), names
    total = sum(p.numel() for p in model.parameters())
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == v.metrics["trainable_params"] and count < total * 0.2
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        saved = list(f.keys())
    assert saved and all(any(k in n for k in (*PARAM_MARKERS[method], "ranknum")) for n in saved), saved
    if method == "ia3":  # PEFT's llama targets: k_proj and v_proj scale their outputs, down_proj its input
        assert {n.split(".")[-3] for n in names} == {"k_proj", "v_proj", "down_proj"}


@pytest.mark.parametrize("method", [n for n, m in METHODS.items() if m.serving == "merged"])
def test_merged_methods_serve_a_plain_folder_with_the_logits_of_base_plus_adapter(ws, method):
    from safetensors.torch import load_file

    from tuneloop.registry import get_version, unservable_reason

    trained(ws, method)
    v = get_version(ws["db"], f"pm-{method}")
    merged = Path(v.path)
    assert merged.name == "merged" and (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    assert (merged / "tokenizer_config.json").is_file() and not (merged / "adapter_config.json").exists()
    assert v.config["adapter_path"] == str(merged.parent / "model") and unservable_reason(v.kind, v.path) is None
    assert 0 <= v.metrics["parity_max_abs_diff"] <= 1e-3
    assert json.loads((merged / "tuneloop-merge.json").read_text())["method"] == method

    # the merge folded the training in: the weights differ from the base's, and the logits match base+adapter
    base_w, merged_w = (
        load_file(str(Path(ws["base"]) / "model.safetensors")),
        load_file(str(merged / "model.safetensors")),
    )
    assert any(not base_w[k].equal(merged_w[k]) for k in base_w), "merged weights equal the base's"
    import torch
    from transformers import AutoModelForCausalLM

    ids = _prompt_ids(str(merged))
    via_peft = _logits(_peft_model(ws["base"], merged.parent / "model"), ids)
    via_merged = _logits(AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval(), ids)
    assert float((via_peft - via_merged).abs().max()) <= 1e-3


@pytest.mark.parametrize("method", [n for n, m in METHODS.items() if m.serving == "adapter"])
def test_lora_adapters_are_servable_as_adapters(ws, method):
    from tuneloop.registry import get_version, unservable_reason

    trained(ws, method)
    v = get_version(ws["db"], f"pm-{method}")
    assert Path(v.path).name == "model" and unservable_reason(v.kind, v.path) is None


@pytest.mark.parametrize("method", [n for n, m in METHODS.items() if m.serving == "refused"])
def test_prompt_learning_is_registered_for_offline_eval_but_refused_at_gate_and_promote(ws, method):
    from tuneloop.deploy.gate import GateError, run_gate
    from tuneloop.registry import RegistryError, get_version, set_stage, unservable_reason

    trained(ws, method)
    name = f"pm-{method}"
    v = get_version(ws["db"], name)
    why = unservable_reason(v.kind, v.path)
    assert why is not None and f"{METHODS[method].peft_type} adapter" in why and "method=lora" in why
    with pytest.raises(GateError, match=f"{name} cannot be served, so it cannot pass the gate"):
        run_gate(ws["db"], ws["settings"], name)
    with pytest.raises(RegistryError, match=f"{name} cannot be served, so it cannot go to production"):
        set_stage(ws["db"], name, "production", actor="test")
    assert get_version(ws["db"], name).stage == "candidate"
    # what it is registered for: an offline comparison, generated with transformers + PEFT
    from tuneloop.trainer.evaluate import evaluate

    rep = evaluate([name], "chat", ws["db"], ws["settings"], limit=2, max_new_tokens=4, progress=False)
    assert rep["generation"][name]["backend"] == "transformers" and len(rep["per_example"][name]["loss"]) == 2


def test_tuneloop_merge_merges_a_hand_registered_weight_adapter_and_refuses_prompt_learning(ws):
    """`tuneloop merge` takes every weight adapter PEFT merges (here the IA3 run's raw adapter), not LoRA only."""
    from tuneloop.errors import UserError
    from tuneloop.ids import hash_path
    from tuneloop.registry import ModelVersion, register_version
    from tuneloop.trainer.merge import merge

    trained(ws, "ia3")
    raw = Path(ws["home"]) / "runs" / "pm-ia3" / "model"
    register_version(
        ws["db"],
        ModelVersion(name="ia3-raw", kind="adapter", base_model=ws["base"], path=str(raw), content_hash=hash_path(raw)),
    )
    mv, diff = merge("ia3-raw", ws["db"], ws["settings"])
    assert mv.kind == "merged" and mv.parent_version == "ia3-raw" and 0 <= diff <= 1e-3
    trained(ws, "prefix_tuning")
    with pytest.raises(UserError, match="'pm-prefix_tuning' is a PREFIX_TUNING adapter; only weight adapters"):
        merge("pm-prefix_tuning", ws["db"], ws["settings"])


@pytest.mark.engine
def test_a_merged_dora_version_generates_in_vllm_what_base_plus_dora_generates_under_peft(ws):
    """vLLM refuses DoRA adapters; the merged folder it serves answers as the adapter does (greedy, fp32)."""
    import torch

    from tuneloop.registry import get_version
    from tuneloop.server.offline_engine import OfflineGenerator

    trained(ws, "dora")
    merged = Path(get_version(ws["db"], "pm-dora").path)
    ids = _prompt_ids(str(merged))
    with OfflineGenerator(ws["settings"].engine) as g:
        (on_vllm,) = g.generate(merged, None, [ids], 12)
    model = _peft_model(ws["base"], merged.parent / "model")
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    from transformers import AutoTokenizer

    on_peft = AutoTokenizer.from_pretrained(str(merged)).decode(out[0][len(ids) :], skip_special_tokens=True)
    # a random model emits byte tokens that are not whole UTF-8 characters: transformers decodes them to U+FFFD,
    # vLLM's incremental detokenizer drops them; everything else must be the same text
    assert on_vllm.replace("\ufffd", "").strip() == on_peft.replace("\ufffd", "").strip() != ""
