"""What makes a folder a loadable Hugging Face model, checked without loading it (no torch).

:func:`check_model_folder` is what every command that loads a model folder (train, eval, merge, gate,
serve) calls first, so a base model that was moved or deleted, or lacks its tokenizer or weights, is an
``error: ...`` before anything is loaded or written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tuneloop.errors import UserError

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt")


def looks_like_path(ref: str) -> bool:
    """``ref`` is written as a filesystem path (absolute, ``./``, ``../``, ``~``), not a name or hub id."""
    return ref.startswith(("/", "./", "../", "~")) or ref in (".", "..")


def check_model_folder(path: str | os.PathLike[str], what: str = "base model", tokenizer: bool = True) -> Path:
    """``path`` as a resolved folder if it holds a loadable Hugging Face model (config.json, weights and, unless
    ``tokenizer=False``, a tokenizer); else a :class:`UserError` saying what is missing and what to do.

    Cheap (a few ``stat`` calls, no torch): commands call it before loading anything or writing anything."""
    p = Path(path).expanduser()
    fix = "pull it again (tuneloop models pull NAME), or point to the folder's new place"
    if not p.exists():
        raise UserError(f"{what} folder {p} does not exist (moved or deleted?); {fix}")
    if not p.is_dir():
        raise UserError(f"{what} {p} is not a folder; a Hugging Face model folder is expected")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise UserError(f"{what} folder {p} has no config.json: not a Hugging Face model folder; {fix}")
    read_json_object(cfg, f"{what} folder {p}: config.json", fix)
    if not any(next(p.glob(pat), None) is not None for pat in WEIGHT_PATTERNS):
        raise UserError(f"{what} folder {p} has no weights (*.safetensors or pytorch_model*.bin); {fix}")
    for f in sorted(p.glob("*.safetensors")):
        why = _safetensors_problem(f)
        if why:
            raise UserError(f"{what} folder {p}: weights file {f.name} is {why}; {fix}")
    if tokenizer and not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{what} folder {p} has no tokenizer (tokenizer.json / tokenizer_config.json); {fix}")
    return p.resolve()


def read_json_object(file: Path, label: str, fix: str) -> dict:
    """The JSON object in ``file``; a :class:`UserError` naming ``label`` and ``fix`` when it is unreadable,
    malformed or not an object (model ``config.json``, adapter ``adapter_config.json``)."""
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{label} is malformed ({e}); {fix}") from None
    if not isinstance(doc, dict):
        raise UserError(f"{label} is not a JSON object; {fix}")
    return doc


def _safetensors_problem(f: Path) -> str | None:
    """Why ``f`` is not a whole safetensors file (truncated, bad header), or None; reads only its header."""
    try:
        size = f.stat().st_size
        with f.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return "truncated (no header)"
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > 100 * 1024 * 1024:
                return "truncated or corrupt (header larger than the file)"
            header = json.loads(fh.read(n))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"unreadable ({e})"
    if not isinstance(header, dict):
        return "corrupt (header is not a JSON object)"
    end = 0
    for k, v in header.items():
        if k == "__metadata__" or not isinstance(v, dict):
            continue
        offs = v.get("data_offsets")
        if isinstance(offs, list) and len(offs) == 2 and isinstance(offs[1], int):
            end = max(end, offs[1])
    if 8 + n + end > size:
        return f"truncated ({size} bytes, {8 + n + end} expected)"
    return None
