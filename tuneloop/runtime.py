"""Process environment for vLLM / torch on this kind of machine, set before they are imported.

Contract: :func:`configure_vllm_env` sets the variables vLLM needs or benefits
from on CPU without overriding anything the user already exported:
``VLLM_CPU_KVCACHE_SPACE`` (without it vLLM's CPU start-up fails),
``VLLM_TARGET_DEVICE``, core binding, offline hub, project-local caches and vLLM's log
on stderr (stdout is the command's output). :func:`has_cuda` detects a GPU without importing
vLLM. :func:`pick_dtype` maps ``auto`` to float32 on CPU and bfloat16 on GPU; a model
folder whose ``config.json`` carries a ``quantization_config`` (int8 / int4 weights, ``tuneloop export
model --format int8-w8a8|int4-w4a16``) gets bfloat16 on CPU too, since vLLM's CPU kernels for those
(``int8_scaled_mm``, ``cpu_gemm_wna16``) take 16-bit activations only. :func:`lora_supported` says whether
vLLM can apply LoRA adapters to a model folder here: not to a quantized one on CPU (see its docstring).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tuneloop.settings import EngineSettings


def has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def pick_dtype(dtype: str = "auto", model: str | os.PathLike | None = None) -> str:
    """The engine dtype for ``dtype`` (``auto`` resolved; see module doc) and the model folder it will load."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if has_cuda() or is_quantized(model) else "float32"


def is_quantized(model: str | os.PathLike | None) -> bool:
    """Whether the model folder's ``config.json`` declares quantized weights (``quantization_config``)."""
    if model is None:
        return False
    import json

    try:
        cfg = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and bool(cfg.get("quantization_config"))


def lora_supported(model: str | os.PathLike | None) -> bool:
    """Whether vLLM can put LoRA layers over ``model``'s linear layers on this machine.

    Not for a quantized folder on CPU: vLLM's CPU int8 kernel prepacks the weights into a oneDNN handle and
    drops the layer's ``weight`` tensor (every CPU without AMX: the AVX2 machines), and vLLM's LoRA layers need
    that tensor (``_get_lora_device``), so an engine started with LoRA on crashes while loading. Such a model is
    served and evaluated with LoRA off: it is a merged, exported version, never a base for adapters.
    """
    return has_cuda() or not is_quantized(model)


def configure_vllm_env(engine: EngineSettings | None = None, cache_root: str | os.PathLike | None = None) -> None:
    """Set vLLM's CPU/offline environment (idempotent; user-set values win)."""
    env = os.environ
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # vLLM logs to stdout by default; stdout belongs to the command's output (`tuneloop eval --json`)
    env.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    root = Path(cache_root or env.get("TUNELOOP_HOME", ".tuneloop")).resolve() / "cache"
    env.setdefault("VLLM_CACHE_ROOT", str(root / "vllm"))
    if has_cuda():
        return
    env.setdefault("VLLM_TARGET_DEVICE", "cpu")
    kv = engine.kv_cache_gib if engine is not None else 1.0
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv))))
    reserved = engine.cpu_reserved_cores if engine is not None else 0
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", str(reserved))
    bind = engine.cpu_threads_bind if engine is not None else "auto"
    if bind == "auto":
        n = os.cpu_count() or 1
        bind = f"0-{n - 1}" if n > 1 else "0"
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", bind)
    if engine is not None and not engine.multiprocessing:
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
