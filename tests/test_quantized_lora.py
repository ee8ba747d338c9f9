"""A quantized model on CPU is served and evaluated without LoRA, and an adapter on it is refused with the reason.

vLLM's CPU int8 kernel (oneDNN, every CPU without AMX) prepacks the weights and drops each layer's ``weight``
tensor, which vLLM's LoRA layers read while the engine loads: an engine started with LoRA on such a folder
crashes. The end-to-end proof (export, gate, ``tuneloop serve``) is ``tests/test_export_quant.py``; these check
the rule itself on model folders that only carry a ``config.json``, as an export writes it.
"""

from __future__ import annotations

import json

import pytest

from tuneloop.runtime import has_cuda, lora_supported
from tuneloop.settings import EngineSettings

pytestmark = pytest.mark.skipif(has_cuda(), reason="the rule is CPU-only; with CUDA, LoRA serves quantized models")


def _folder(tmp_path, name: str, quantized: bool):
    d = tmp_path / name
    d.mkdir()
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    if quantized:
        cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "int-quantized"}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_a_quantized_folder_on_cpu_gets_no_lora_and_an_unquantized_one_does(tmp_path):
    from tuneloop.server.engine import Engine

    plain, quant = _folder(tmp_path, "plain", False), _folder(tmp_path, "int8", True)
    assert lora_supported(plain) and not lora_supported(quant)
    assert Engine(plain, EngineSettings()).lora_enabled
    assert not Engine(quant, EngineSettings()).lora_enabled


def test_loading_an_adapter_on_a_quantized_model_is_refused_with_the_reason(tmp_path):
    from tuneloop.server.engine import AdapterError, Engine

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    engine = Engine(_folder(tmp_path, "int8", True), EngineSettings())
    with pytest.raises(AdapterError, match="quantized model on CPU"):
        engine.validate_adapter(adapter)  # what loading an adapter checks first
