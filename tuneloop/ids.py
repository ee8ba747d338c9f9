"""Identifiers: time-ordered UUIDv7 strings (RFC 9562) and content hashes."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path


def new_id(prefix: str = "") -> str:
    """A UUIDv7 string (sortable by creation time), optionally prefixed (``chatcmpl-``)."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 68) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return prefix + str(uuid.UUID(int=value))


def hash_path(path: str | os.PathLike, skip: tuple[str, ...] = ("checkpoint-",)) -> str:
    """sha256 over a file or over a folder's files (relative names + bytes), order-independent of walk order."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        rel = f.name if p.is_file() else f.relative_to(p).as_posix()
        if any(part.startswith(skip) for part in Path(rel).parts):
            continue
        h.update(rel.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()
