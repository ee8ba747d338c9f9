"""Checks of the engine settings against the model and the machine, before ``tuneloop serve`` starts vLLM.

Contract
--------
Each check raises :class:`~tuneloop.errors.UserError` naming the setting to change, so that a
configuration vLLM would refuse is an ``error: ...`` (exit 2) within seconds instead of a failed
engine start-up a minute later. What vLLM refuses anyway is caught at start-up by the app's
lifespan (see :func:`tuneloop.server.app.create_app`); these checks only make the common cases
fast and their messages precise.

* :func:`check_model_config` (cheap: reads ``config.json``): ``engine.max_model_len`` at most the
  model's context length.
* :func:`check_lora_rank` (cheap: reads vLLM's source, no import): ``engine.max_lora_rank`` one of
  the values vLLM's ``LoRAConfig`` allows.
* :func:`check_kv_cache` (CPU only, after :func:`tuneloop.runtime.configure_vllm_env`): the KV
  cache (``VLLM_CPU_KVCACHE_SPACE``, from ``engine.kv_cache_gib``) plus the weights fit in the
  memory available.
* :func:`check_architecture` (imports vLLM's model registry, seconds): one of the model's
  ``architectures`` is one vLLM serves.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.errors import UserError
from tuneloop.modelfiles import read_json_object

if TYPE_CHECKING:  # pragma: no cover
    from tuneloop.settings import EngineSettings

GIB = 1024**3
# the model's context length, in the order vLLM looks for it
_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")
# what vLLM 0.32's LoRAConfig allows; used only when its source cannot be read
_FALLBACK_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def read_model_config(base: Path) -> dict[str, Any]:
    return read_json_object(base / "config.json", f"{base}/config.json", "point --model at a Hugging Face model folder")


def model_max_len(cfg: dict[str, Any]) -> tuple[str, int] | None:
    """``(key, length)`` of the model's context length from its config, or None when it is not plain to tell
    (no such key, or RoPE scaling that vLLM extends the length by)."""
    for c in (cfg, cfg.get("text_config") or {}):
        if not isinstance(c, dict):
            continue
        rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
        if isinstance(rope, dict) and (rope.get("rope_type") or rope.get("type") or "default") != "default":
            return None
        for key in _LENGTH_KEYS:
            v = c.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return key, v
    return None


def check_model_config(base: Path, engine: EngineSettings) -> None:
    """``engine.max_model_len`` at most the model's context length (vLLM refuses more at start-up)."""
    if engine.max_model_len < 1:
        raise UserError(f"engine.max_model_len must be >= 1, got {engine.max_model_len}")
    found = model_max_len(read_model_config(base))
    if found is None or os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "0") not in ("", "0"):
        return
    key, limit = found
    if engine.max_model_len > limit:
        raise UserError(
            f"engine.max_model_len={engine.max_model_len} is above what {base.name} supports ({key}={limit} in its "
            f"config.json): use --set engine.max_model_len={limit} or lower"
        )


def allowed_lora_ranks() -> tuple[int, ...]:
    """The ``max_lora_rank`` values vLLM's ``LoRAConfig`` accepts, read from its source (importing vLLM takes
    seconds); the values of the pinned vLLM if the source cannot be read."""
    try:
        spec = importlib.util.find_spec("vllm")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        src = Path(spec.origin).parent / "config" / "lora.py"
        try:
            m = re.search(r"MaxLoRARanks\s*=\s*Literal\[([\d,\s]+)\]", src.read_text(encoding="utf-8"))
        except OSError:
            m = None
        if m:
            return tuple(int(x) for x in m.group(1).split(",") if x.strip())
    return _FALLBACK_LORA_RANKS


def check_lora_rank(engine: EngineSettings) -> None:
    if not engine.enable_lora:
        return
    allowed = allowed_lora_ranks()
    if engine.max_lora_rank not in allowed:
        up = [r for r in allowed if r >= engine.max_lora_rank]
        hint = f" (the next one up is {up[0]})" if up else ""
        raise UserError(
            f"engine.max_lora_rank={engine.max_lora_rank} is not a rank vLLM supports: use one of "
            f"{', '.join(map(str, allowed))}{hint}, e.g. --set engine.max_lora_rank={up[0] if up else allowed[-1]}"
        )


def available_memory_bytes() -> int | None:
    """``MemAvailable`` from /proc/meminfo (Linux), else physical memory, else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return None


def weights_bytes(base: Path) -> int:
    return sum(f.stat().st_size for pat in ("*.safetensors", "*.bin") for f in base.glob(pat) if f.is_file())


def check_kv_cache(base: Path, engine: EngineSettings, env_value: str | None = None) -> None:
    """CPU: the KV cache vLLM allocates up front plus the weights must fit in the memory available.

    ``env_value``: ``VLLM_CPU_KVCACHE_SPACE`` as the user exported it (it wins over ``engine.kv_cache_gib``)."""
    raw = env_value
    source = "VLLM_CPU_KVCACHE_SPACE" if raw else "engine.kv_cache_gib"
    try:
        kv_gib = float(raw) if raw else float(max(1, round(engine.kv_cache_gib)))
    except ValueError:
        raise UserError(f"VLLM_CPU_KVCACHE_SPACE={raw!r} is not a number of GiB") from None
    avail = available_memory_bytes()
    if avail is None:
        return
    need = kv_gib * GIB + weights_bytes(base)
    if need > avail:
        fix = (
            "lower VLLM_CPU_KVCACHE_SPACE (it wins over engine.kv_cache_gib)"
            if raw
            else "lower it, e.g. --set engine.kv_cache_gib=1"
        )
        raise UserError(
            f"{source}={kv_gib:g} GiB of KV cache plus {weights_bytes(base) / GIB:.2f} GiB of weights is more than "
            f"the {avail / GIB:.1f} GiB of memory available: {fix}"
        )


def check_architecture(base: Path) -> None:
    """One of the model's ``architectures`` is served by vLLM (its model registry, or its Transformers backend)."""
    cfg = read_model_config(base)
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not archs or cfg.get("auto_map"):
        return  # vLLM decides (custom code, or no architecture named)
    from tuneloop.server.engine import supported_architectures

    supported = supported_architectures()
    if any(a in supported for a in archs):
        return
    try:
        import transformers

        if any(isinstance(a, str) and hasattr(transformers, a) for a in archs):
            return  # vLLM may serve it through its Transformers backend
    except ImportError:
        pass
    raise UserError(
        f"{base.name}: architecture {', '.join(map(str, archs))} (config.json) is not supported by the installed "
        f"vLLM; serve a model whose architecture vLLM supports (e.g. LlamaForCausalLM, Qwen2ForCausalLM), or "
        "evaluate this one with `tuneloop eval --backend transformers`"
    )
