"""Terminal tables (rich when it renders to a terminal, plain aligned text otherwise)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO


def format_cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None, file: TextIO | None = None
) -> None:
    """Print ``rows`` under ``headers``; plain text (stable for scripts and tests) unless stdout is a TTY."""
    file = file or sys.stdout
    cells = [[format_cell(c) for c in r] for r in rows]
    if file.isatty():
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title)
        for h in headers:
            t.add_column(h)
        for r in cells:
            t.add_row(*r)
        Console(file=file).print(t)
        return
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    if title:
        print(title, file=file)
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)), file=file)
