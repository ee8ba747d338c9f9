"""A finished run's loss history: the ``loss.json`` / ``loss.png`` files and the printed loss table.

Contract
--------
* :func:`write_loss_history` writes ``loss.json`` in the run folder (one row per
  logged step: ``step``, ``loss``, ``learning_rate``, ``num_tokens``) and, only
  when matplotlib imports, ``loss.png`` (loss against step). Without matplotlib
  there is no plot and no error.
* :func:`loss_table` renders the history (the trainer's log entries that carry a
  ``loss``) as text: at most ``max_rows`` evenly sampled steps, each with a bar
  proportional to its loss; ``"no loss recorded"`` when there is none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_loss_history(out: Path, history: list[dict[str, Any]]) -> None:
    """``loss.json`` (step, loss, learning rate) and ``loss.png`` if matplotlib is importable."""
    rows = [
        {
            "step": e.get("step"),
            "loss": e.get("loss"),
            "learning_rate": e.get("learning_rate"),
            "num_tokens": e.get("num_tokens"),
        }
        for e in history
    ]
    (out / "loss.json").write_text(json.dumps(rows, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)


def loss_table(history: list[dict[str, Any]], width: int = 40, max_rows: int = 12) -> str:
    """A compact loss curve: one row per (sampled) logged step with a bar proportional to the loss."""
    pts = [(e.get("step"), float(e["loss"])) for e in history if e.get("loss") is not None]
    if not pts:
        return "no loss recorded"
    if len(pts) > max_rows:
        idx = sorted({round(i * (len(pts) - 1) / (max_rows - 1)) for i in range(max_rows)})
        pts = [pts[i] for i in idx]
    hi, lo = max(p[1] for p in pts), min(p[1] for p in pts)
    span = (hi - lo) or 1.0
    lines = ["step     loss"]
    for step, loss in pts:
        bar = "#" * max(1, round(1 + (width - 1) * (loss - lo) / span))
        lines.append(f"{step:>5}  {loss:8.4f}  {bar}")
    return "\n".join(lines)
