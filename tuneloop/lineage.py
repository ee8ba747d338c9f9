"""Lineage: trace a logged request or a model version through datasets and versions.

Contract
--------
:func:`lineage` answers from the registry tables (``requests``, ``dataset_rows``,
``datasets``, ``model_versions``), read-only, in both directions:

* for a **request id**: the request, the chain of the version that served it
  (each version's dataset with the requests it was built from and its parent
  datasets, then the parent version, back to the base), and forwards: the
  datasets that include the request and the versions trained on them;
* for a **model version**: the same chain, starting at that version.

A reference that is neither raises :class:`~tuneloop.registry.RegistryError`.
Dataset parents are followed at most 5 levels deep; a version chain stops at a
cycle or at a parent that is not registered (listed with ``registered: False``).
Every statement is plain, portable SQL: the answer is the same from the DuckDB
file and from a shared PostgreSQL (timestamps as text, JSON parents parsed).
"""

from __future__ import annotations

from typing import Any

from tuneloop.db import Database, loads
from tuneloop.registry import RegistryError

MAX_DATASET_DEPTH = 5


def lineage(db: Database, ref: str) -> dict[str, Any]:
    """Lineage of a request id (keys ``request``, ``served_by``, ``used_in_datasets``,
    ``trained_versions``) or of a model version (keys ``version``, ``chain``)."""
    req = db.query("SELECT id, received_at, model_version, arm, status FROM requests WHERE id = ?", [ref])
    if req:
        r = req[0]
        used_in = db.query(
            """SELECT DISTINCT dr.dataset_id, dr.split, dr.origin FROM dataset_rows dr WHERE dr.request_id = ?
               ORDER BY dr.dataset_id""",
            [ref],
        )
        ds_ids = sorted({u["dataset_id"] for u in used_in})
        trained = (
            db.query(
                f"SELECT name, stage, dataset_id FROM model_versions WHERE dataset_id IN ({','.join('?' * len(ds_ids))}) ORDER BY created_at",
                ds_ids,
            )
            if ds_ids
            else []
        )
        served_by = _version_chain(db, r["model_version"]) if r["model_version"] else []
        return {
            "request": {k: (str(v) if k.endswith("_at") else v) for k, v in r.items()},
            "served_by": served_by,
            "used_in_datasets": used_in,
            "trained_versions": trained,
        }
    v = db.query("SELECT name FROM model_versions WHERE name = ?", [ref])
    if v:
        return {"version": ref, "chain": _version_chain(db, ref)}
    raise RegistryError(f"{ref!r} is neither a logged request id nor a registered model version")


def _version_chain(db: Database, name: str | None) -> list[dict[str, Any]]:
    """``name``, its parent version, its parent's parent ...; each with its dataset's lineage."""
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    while name and name not in seen:
        seen.add(name)
        rows = db.query(
            "SELECT name, kind, stage, base_model, dataset_id, run_id, parent_version FROM model_versions WHERE name = ?",
            [name],
        )
        if not rows:
            chain.append({"version": name, "registered": False})
            break
        v = rows[0]
        entry: dict[str, Any] = {
            "version": v["name"],
            "kind": v["kind"],
            "stage": v["stage"],
            "base_model": v["base_model"],
            "run_id": v["run_id"],
            "dataset": None,
        }
        if v["dataset_id"]:
            entry["dataset"] = _dataset_lineage(db, v["dataset_id"])
        chain.append(entry)
        name = v["parent_version"]
    return chain


def _dataset_lineage(db: Database, dataset_id: str, depth: int = 0) -> dict[str, Any]:
    """A dataset's kind, rows per origin, the logged requests it was built from, and its parents' lineage."""
    d = db.query("SELECT id, kind, parent_ids FROM datasets WHERE id = ?", [dataset_id])
    counts = db.query(
        """SELECT origin, count(*) AS n, count(request_id) AS with_request FROM dataset_rows WHERE dataset_id = ?
           GROUP BY origin ORDER BY origin""",
        [dataset_id],
    )
    reqs = [
        r["request_id"]
        for r in db.query(
            "SELECT DISTINCT request_id FROM dataset_rows WHERE dataset_id = ? AND request_id IS NOT NULL ORDER BY request_id",
            [dataset_id],
        )
    ]
    out: dict[str, Any] = {
        "id": dataset_id,
        "kind": d[0]["kind"] if d else None,
        "rows_by_origin": {c["origin"]: c["n"] for c in counts},
        "source_requests": reqs,
        "parents": [],
    }
    if d and depth < MAX_DATASET_DEPTH:
        for p in loads(d[0]["parent_ids"]) or []:
            out["parents"].append(_dataset_lineage(db, p, depth + 1))
    return out
