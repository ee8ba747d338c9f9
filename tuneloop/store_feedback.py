"""The ``feedback`` table: every SQL statement on it (and the ``requests`` lookup feedback needs), portable
between the DuckDB file and PostgreSQL.

Contract
--------
* One record per ``(request_id, source)`` (the table's UNIQUE constraint).
  :func:`save_feedback` creates it on the first save and updates that same
  record (same ``id``, ``created_at`` and ``model_version``) afterwards:
  the fields given (:data:`FIELDS`) replace the stored ones (``None`` clears
  one), the others keep their value. A new record starts with every field
  NULL and ``labels`` ``[]``. ``label`` is the correct class of a
  ``classify`` request (migration 10); whether it fits the request is the
  caller's check (:func:`request_info` gives what it needs). It returns :class:`Saved`: the record after the
  save, whether this call created it, and the ``(rating, rating_kind)`` it
  had before (``None`` when created), which the server's feedback counter
  needs.
* Concurrency: the create is ``INSERT ... ON CONFLICT (request_id, source)
  DO NOTHING RETURNING``; when the record exists (or a concurrent save
  created it first) the update first takes the row's lock with a no-op
  ``UPDATE ... RETURNING`` that reads the previous rating, then writes the
  fields. So on PostgreSQL (READ COMMITTED, where an error would abort the
  whole transaction, so nothing here relies on catching a constraint error)
  two replicas saving the same pair at once end with exactly one record:
  one save creates it and the other updates it, seeing the first one's
  rating as the previous one. DuckDB runs one writing block at a time.
* The request must exist: with the default ``model_version=LOOKUP`` the
  ``requests`` row is read in the same transaction, its ``model_version``
  goes on a new record, and a missing row raises :class:`RequestNotFound`
  with nothing written. A caller that knows the request from elsewhere (the
  server's request-log queue, not flushed yet) passes its version instead.
* :func:`list_feedback` (every source of one request, oldest first),
  :func:`request_model_version` and :func:`request_info` (a logged request's
  version, route and classifier ``scores``) are single reads. ``labels`` are stored as
  JSON text and come back as a list; timestamps are naive UTC.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tuneloop.db import Database, dumps, loads, utcnow
from tuneloop.ids import new_id

#: the columns a save may set (``rating`` and ``rating_kind`` go together)
FIELDS = ("rating", "rating_kind", "correction", "comment", "labels", "label")
_COLS = "id, request_id, source, rating, rating_kind, correction, comment, labels, model_version, created_at, label"
_ATTEMPTS = 3


class Lookup(enum.Enum):
    LOOKUP = "lookup"


#: :func:`save_feedback`'s default: read the request's ``model_version`` from ``requests`` (must exist)
LOOKUP = Lookup.LOOKUP


class RequestNotFound(LookupError):
    """No logged request has this id."""

    def __init__(self, request_id: str):
        super().__init__(f"no request with id {request_id!r}")
        self.request_id = request_id


@dataclass(frozen=True)
class Feedback:
    """One stored feedback record (``labels`` parsed)."""

    id: str
    request_id: str
    source: str
    rating: int | None
    rating_kind: str | None
    correction: str | None
    comment: str | None
    labels: list[str]
    model_version: str | None
    created_at: datetime
    label: str | None = None  # the correct class of a classify request


@dataclass(frozen=True)
class RequestInfo:
    """What feedback needs to know of a logged request: its version, route and (classify) scores."""

    model_version: str | None
    route: str | None
    scores: dict[str, float] | None


@dataclass(frozen=True)
class Saved:
    """What :func:`save_feedback` did: the record now, whether it was created, its ``(rating, rating_kind)`` before."""

    feedback: Feedback
    created: bool
    previous: tuple[int | None, str | None] | None


def _record(r: Sequence[Any]) -> Feedback:
    return Feedback(
        id=r[0],
        request_id=r[1],
        source=r[2],
        rating=r[3],
        rating_kind=r[4],
        correction=r[5],
        comment=r[6],
        labels=loads(r[7]) or [],
        model_version=r[8],
        created_at=r[9],
        label=r[10],
    )


def request_model_version(db: Database, request_id: str) -> tuple[bool, str | None]:
    """(whether ``requests`` has this id, the version that served it)."""
    with db.connect(transaction=False) as con:
        rows = con.execute("SELECT model_version FROM requests WHERE id = ?", [request_id]).fetchall()
    return (True, rows[0][0]) if rows else (False, None)


def request_info(db: Database, request_id: str) -> RequestInfo | None:
    """The logged request's version, route and classifier scores (``{label: probability}``), None if unknown."""
    with db.connect(transaction=False) as con:
        rows = con.execute("SELECT model_version, route, scores FROM requests WHERE id = ?", [request_id]).fetchall()
    if not rows:
        return None
    scores = loads(rows[0][2])
    return RequestInfo(rows[0][0], rows[0][1], scores if isinstance(scores, dict) else None)


def save_feedback(
    db: Database,
    request_id: str,
    source: str,
    fields: Mapping[str, Any],
    model_version: str | Lookup | None = LOOKUP,
) -> Saved:
    """Create or update the ``(request_id, source)`` record with ``fields`` (see module doc)."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"not feedback fields: {sorted(unknown)}")
    params = {k: dumps(v) if k == "labels" else v for k, v in fields.items()}
    with db.connect() as con:
        if isinstance(model_version, Lookup):
            found = con.execute("SELECT model_version FROM requests WHERE id = ?", [request_id]).fetchall()
            if not found:
                raise RequestNotFound(request_id)
            model_version = found[0][0]
        values = {
            "rating": None,
            "rating_kind": None,
            "correction": None,
            "comment": None,
            "labels": "[]",
            "label": None,
            **params,
        }
        for _ in range(_ATTEMPTS):
            new = con.execute(
                f"INSERT INTO feedback ({_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                f"ON CONFLICT (request_id, source) DO NOTHING RETURNING {_COLS}",
                [
                    new_id(),
                    request_id,
                    source,
                    values["rating"],
                    values["rating_kind"],
                    values["correction"],
                    values["comment"],
                    values["labels"],
                    model_version,
                    utcnow(),
                    values["label"],
                ],
            ).fetchall()
            if new:
                return Saved(_record(new[0]), True, None)
            # it exists (maybe created by a concurrent save that committed meanwhile): lock it, read the rating
            old = con.execute(
                "UPDATE feedback SET rating = rating WHERE request_id = ? AND source = ? RETURNING rating, rating_kind",
                [request_id, source],
            ).fetchall()
            if not old:
                continue  # deleted since the insert saw it: create it after all
            if params:
                sets = ", ".join(f"{k} = ?" for k in params)
                row = con.execute(
                    f"UPDATE feedback SET {sets} WHERE request_id = ? AND source = ? RETURNING {_COLS}",
                    [*params.values(), request_id, source],
                ).fetchall()
            else:
                row = con.execute(
                    f"SELECT {_COLS} FROM feedback WHERE request_id = ? AND source = ?", [request_id, source]
                ).fetchall()
            return Saved(_record(row[0]), False, (old[0][0], old[0][1]))
    raise RuntimeError(f"feedback ({request_id!r}, {source!r}) kept vanishing between insert and update")


def recent_feedback(db: Database, limit: int) -> list[dict[str, Any]]:
    """The ``limit`` newest feedback rows, newest first, as the CLI lists them (``correction`` is ``'yes'`` or
    ``''``; ``label`` the correct class of a classify request, or None)."""
    return db.query(
        """SELECT f.created_at, f.request_id, f.model_version, f.rating, f.rating_kind,
                  CASE WHEN f.correction IS NULL THEN '' ELSE 'yes' END AS correction, f.label, f.comment
           FROM feedback f ORDER BY f.created_at DESC LIMIT ?""",
        [limit],
    )


def list_feedback(db: Database, request_id: str) -> list[Feedback]:
    """Every source's record for one request, oldest first."""
    with db.connect(transaction=False) as con:
        rows = con.execute(
            f"SELECT {_COLS} FROM feedback WHERE request_id = ? ORDER BY created_at, source", [request_id]
        ).fetchall()
    return [_record(r) for r in rows]
