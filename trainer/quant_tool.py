"""llm-compressor at one pinned version, in its own package overlay: what makes int8 / int4 weights vLLM serves.

Contract
--------
* llm-compressor (vLLM's quantization library) pins ``transformers<=5.17`` and ``compressed-tensors==0.19``, while
  tuneloop's vLLM pins ``compressed-tensors==0.17`` and tuneloop runs a newer transformers. Installing it beside
  them would break serving, so it lives in an **overlay**: :data:`PACKAGES`, installed with ``pip install --no-deps
  --target`` into ``$TUNELOOP_LLMCOMPRESSOR``, else ``<model cache>/../tools/llmcompressor-<VERSION>`` (beside the
  llama.cpp tool). Everything else (torch, datasets, accelerate ...) comes from tuneloop's own environment.
* Only a subprocess sees the overlay (:meth:`QuantTool.python_env` puts it first on ``PYTHONPATH``):
  :mod:`tuneloop.trainer.quant_runtime` runs there. tuneloop's process never imports llm-compressor, and vLLM reads
  the folder it writes (``compressed-tensors`` format) with its own ``compressed-tensors``.
* :func:`locate` returns the installed tool or None; :func:`ensure` installs it when missing (about 30 MB from the
  package index, seconds), into a temporary folder renamed on success, so a failed install leaves nothing behind;
  a failure is a :class:`ToolError` with pip's output. ``tuneloop export tools`` and ``make setup EXPORT=1`` call it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tuneloop.trainer.llamacpp import ToolError

VERSION = "0.14.0.1"
#: the overlay, exact versions (llm-compressor's own requirements that tuneloop's environment does not meet)
PACKAGES = (
    f"llmcompressor=={VERSION}",
    "compressed-tensors==0.19.0",
    "transformers==5.17.0",
    "huggingface-hub==1.33.0",
    "auto-round==0.15.1",
    "loguru==0.7.3",
    "nvidia-ml-py==13.615.71",
)


@dataclass(frozen=True)
class QuantTool:
    root: Path

    def python_env(self) -> dict[str, str]:
        """Environment of a subprocess that imports ``llmcompressor``: the overlay shadows tuneloop's packages."""
        path = os.pathsep.join(p for p in (str(self.root), os.environ.get("PYTHONPATH", "")) if p)
        return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def tool_root(models_path: Path) -> Path:
    env = os.environ.get("TUNELOOP_LLMCOMPRESSOR")
    return Path(env).expanduser().resolve() if env else models_path.parent / "tools" / f"llmcompressor-{VERSION}"


def locate(models_path: Path) -> QuantTool | None:
    root = tool_root(models_path)
    return QuantTool(root) if (root / "llmcompressor" / "__init__.py").is_file() else None


def ensure(models_path: Path, say: Callable[[str], None] = print) -> QuantTool:
    """The installed overlay, installing it first when missing (see module doc)."""
    found = locate(models_path)
    if found is not None:
        return found
    root = tool_root(models_path)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".llmcompressor-{VERSION}-", dir=root.parent))
    say(f"llm-compressor {VERSION}: installing its overlay ({len(PACKAGES)} packages) into {root} (once) ...")
    try:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--only-binary", ":all:", "--target"]
        r = subprocess.run([*cmd, str(tmp), *PACKAGES], capture_output=True, text=True)
        if r.returncode != 0:
            raise ToolError(f"llm-compressor {VERSION}: pip install failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return QuantTool(root)
