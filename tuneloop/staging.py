"""Folders that appear whole or not at all.

Contract
--------
:func:`staged_folder` yields a fresh temporary folder next to ``dest`` (same file system, so the final
move is one ``rename``). When the ``with`` block ends normally the temporary folder replaces ``dest``
(an existing ``dest`` is removed first); when it raises, the temporary folder is deleted and ``dest`` is
left as it was. A crash half-way therefore never leaves a half-written model or dataset under its
final name, only a hidden ``.<prefix>-*`` folder that the next run ignores.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(dest: Path) -> Iterator[Path]:
    """A temporary sibling of ``dest`` that becomes ``dest`` if the block succeeds (see module docstring)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
