"""The ``loop_runs`` table as the loop sees it: what each cycle has done, step by step.

Contract
--------
* One row per (cycle id, step). :func:`begin_step` replaces any earlier row of
  that step with a ``running`` row holding the step's inputs; :func:`end_step`
  sets its final status (``done``, ``skipped`` or ``failed``, with the error),
  its finish time and its ``details`` (inputs + outputs).
* :func:`steps_of` reads a cycle back as ``{step: row}`` with ``details``
  decoded (an empty dict when none); :func:`cycle_exists` says whether a cycle id
  has any row.
* :func:`record_decide` writes the ``decide`` step (``done``, with the outcome
  and the reason): a cycle without one is unfinished.
* :func:`last_sample_until` is the ``until`` of the newest finished ``sample``
  step of another cycle (where the next sampling window starts), or None.
* :func:`unfinished_cycle` is the most recently started cycle without a
  ``decide`` step, or None; :func:`last_started` is when the newest step of
  any cycle started, or None.

The SQL lives in the storage layer (:mod:`tuneloop.store_deploy`, portable
between the DuckDB file and PostgreSQL; a step's row is an upsert, so two
writers of one step never collide on its key); this module is the loop's
name for it.
"""

from __future__ import annotations

from tuneloop.store_deploy import (
    begin_step,
    cycle_exists,
    end_step,
    last_sample_until,
    last_started,
    record_decide,
    steps_of,
    unfinished_cycle,
)

__all__ = [
    "begin_step",
    "cycle_exists",
    "end_step",
    "last_sample_until",
    "last_started",
    "record_decide",
    "steps_of",
    "unfinished_cycle",
]
