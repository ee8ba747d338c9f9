"""``POST /v1/feedback`` and ``GET /v1/feedback/{request_id}``: user feedback on served responses.

Contract
--------
* Body (:class:`FeedbackIn`): ``request_id`` (the ``id`` of a chat/completion
  response, also its ``X-Request-Id``), ``rating`` (``"up"`` | ``"down"`` or an
  integer 1..5), ``correction`` (the ideal response), ``comment``, ``labels``
  (list of short strings), ``label`` (the correct class of a ``classify``
  request) and ``source`` (who rates: ``"api"`` by default, e.g.
  ``"web-thumbs"``, ``"reviewer"``). At least one of rating, correction,
  comment, labels or label is required. Unknown fields and bad values are a
  400 with an OpenAI-style body naming the field (``param``).
* ``label`` (not null) is checked against the rated request (from the log
  writer's queue or the ``requests`` table, after the 404 check): a request
  whose ``route`` is not ``classify`` is a 400 ``invalid_label`` (``param``
  ``label``, the message says labels are for classify requests); when the
  request logged the classifier's ``scores`` (``{label: probability}``), a
  label that is not one of their keys is a 400 ``invalid_label`` whose
  message lists the valid labels. (No schema can state either: they depend on
  the rated request.) A label
  equal to the predicted one (``requests.response``) confirms the prediction.
* The request must exist: it is looked up in this server's request writer's
  in-memory queue first (a row not flushed yet), then in the ``requests``
  table, in the same transaction as the save (so on a shared PostgreSQL a
  request served by another replica can be rated once that replica flushed
  it). Unknown ids are a 404 ``request_not_found`` and write nothing. A
  request whose log row was dropped (queue full) or never logged
  (``log.enabled=false``) cannot receive feedback.
* Idempotent per ``(request_id, source)``: the first post creates the feedback
  (**201**), later posts update that same record (**200**, same ``id``):
  fields present in the body replace the stored ones (``null`` clears one),
  omitted fields keep their value. Stored in the ``feedback`` table (DuckDB
  file or shared PostgreSQL) in one transaction, with the ``model_version``
  that served the request; ratings are stored as -1/+1
  (``rating_kind='thumbs'``) or 1..5 (``'stars'``). The SQL is
  :mod:`tuneloop.store_feedback`'s: concurrent posts for one pair, from any
  replicas, end in one record (one 201, the others 200).
* ``tuneloop_feedback_total{rating,model_version}`` counts each new feedback
  once, and an update again only when it changes the rating (under the new one).
* Auth: an ``inference`` (or admin) key, checked by the same guard as ``/v1``
  (:func:`tuneloop.server.auth.inference_guard`, so a bad key gets the same
  401 body).
* Needs on ``app.state``: ``db``, ``auth``, ``metrics``, ``log_writer`` (the
  components :func:`tuneloop.server.app.create_app` puts there). Database work runs in a worker thread; a database held by
  another process past a few seconds (or a PostgreSQL server that does not
  answer in that time) gives a 503 ``database_busy`` with ``Retry-After``
  and writes nothing.
* Errors are :class:`tuneloop.server.errors.APIError`; the controller
  registers the server's one set of exception handlers
  (:func:`tuneloop.server.errors.exception_handlers`) itself, so it answers
  the same OpenAI-style JSON in any app.
"""

from __future__ import annotations

import asyncio
import re
from typing import Annotated, Any, ClassVar

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, JSONBody

from tuneloop import store_feedback
from tuneloop.db import Database, DatabaseBusy
from tuneloop.ratings import THUMBS, api_value
from tuneloop.server.auth import inference_guard
from tuneloop.server.errors import APIError, error_responses
from tuneloop.server.errors import exception_handlers as api_exception_handlers
from tuneloop.store_feedback import (
    LOOKUP,
    Feedback,
    Lookup,
    RequestInfo,
    RequestNotFound,
    request_info,
    request_model_version,
    save_feedback,
)

MAX_TEXT = 100_000
MAX_LABELS = 32
MAX_LABEL_CHARS = 64
MAX_CLASS_CHARS = 256
#: the body fields that are feedback (at least one is required)
FEEDBACK_FIELDS = ("rating", "correction", "comment", "labels", "label")
SOURCE_RE = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")


# JSON Schema of what :func:`normalise` accepts (for the OpenAPI document: ``extra_json_schema`` validates nothing).
# Its whitespace is what str.strip() removes (str.isspace()), spelled out: a regex's \s means less in JSON Schema.
WHITESPACE = r"[\u0009-\u000d\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
_WS, _NOT_WS = WHITESPACE, "[^" + WHITESPACE[1:]
_TEXT = msgspec.Meta(extra_json_schema={"maxLength": MAX_TEXT})
_THUMBS = msgspec.Meta(extra_json_schema={"pattern": f"^{_WS}*([Uu][Pp]|[Dd][Oo][Ww][Nn]){_WS}*$"})
_STARS = msgspec.Meta(extra_json_schema={"minimum": 1, "maximum": 5})
#: a label: 1..MAX_LABEL_CHARS characters once stripped
_LABEL = msgspec.Meta(
    extra_json_schema={"pattern": f"^{_WS}*{_NOT_WS}([\\s\\S]{{0,{MAX_LABEL_CHARS - 2}}}{_NOT_WS})?{_WS}*$"}
)


class FeedbackIn(msgspec.Struct, forbid_unknown_fields=True):
    """Feedback on one served response."""

    #: for the OpenAPI document (:func:`tuneloop.server.app.document_api`): at least one of these (else 400
    #: ``missing_feedback``)
    json_schema_extra: ClassVar[dict[str, Any]] = {"anyOf": [{"required": [name]} for name in FEEDBACK_FIELDS]}

    request_id: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=200,
            description="id of the chat/completion response (also its X-Request-Id header).",
            extra_json_schema={"pattern": _NOT_WS},
        ),
    ]
    rating: Annotated[
        Annotated[int, _STARS] | Annotated[str, _THUMBS] | msgspec.UnsetType | None,
        msgspec.Meta(description='"up" or "down" (thumbs), or an integer 1..5 (stars).'),
    ] = msgspec.UNSET
    correction: Annotated[
        Annotated[str, _TEXT] | msgspec.UnsetType | None,
        msgspec.Meta(description="The response the model should have given (used for SFT / DPO)."),
    ] = msgspec.UNSET
    comment: Annotated[Annotated[str, _TEXT] | msgspec.UnsetType | None, msgspec.Meta(description="Free text.")] = (
        msgspec.UNSET
    )
    labels: Annotated[
        Annotated[list[Annotated[str, _LABEL]], msgspec.Meta(extra_json_schema={"maxItems": MAX_LABELS})]
        | msgspec.UnsetType
        | None,
        msgspec.Meta(description='Short tags, e.g. ["wrong-fact", "too-long"].'),
    ] = msgspec.UNSET
    label: Annotated[
        Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_CLASS_CHARS, extra_json_schema={"pattern": _NOT_WS})]
        | msgspec.UnsetType
        | None,
        msgspec.Meta(
            description="The correct class of a classify request (one of the classifier's labels; "
            "the predicted one confirms the prediction)."
        ),
    ] = msgspec.UNSET
    source: Annotated[
        str,
        msgspec.Meta(
            description="Who gives the feedback; one record per (request_id, source).",
            extra_json_schema={"pattern": SOURCE_RE.pattern},
        ),
    ] = "api"


class FeedbackOut(msgspec.Struct):
    """A stored feedback record."""

    id: str
    request_id: str
    source: str
    rating: int | str | None
    rating_kind: str | None
    correction: str | None
    comment: str | None
    labels: list[str]
    model_version: str | None
    created_at: str
    label: str | None = None
    object: str = "feedback"


class FeedbackList(msgspec.Struct):
    data: list[FeedbackOut]
    object: str = "list"


# -- validation ------------------------------------------------------------------------


def normalise(body: FeedbackIn) -> dict[str, Any]:
    """Validated column values for the fields present in ``body`` (raises APIError 400)."""

    def bad(param: str, message: str) -> APIError:
        return APIError(400, message, "invalid_value", param)

    out: dict[str, Any] = {}
    if not body.request_id.strip():
        raise bad("request_id", "request_id must not be empty")
    if not SOURCE_RE.match(body.source):
        raise bad("source", "source must be 1-64 characters of letters, digits and _ . : / -")
    r = body.rating
    if r is not msgspec.UNSET:
        if r is None:
            out["rating"], out["rating_kind"] = None, None
        elif isinstance(r, str):
            if r.strip().lower() not in THUMBS:
                raise bad("rating", f'rating must be "up", "down" or an integer 1..5, got {r!r}')
            out["rating"], out["rating_kind"] = THUMBS[r.strip().lower()], "thumbs"
        elif isinstance(r, bool) or not 1 <= r <= 5:
            raise bad("rating", f'rating must be "up", "down" or an integer 1..5, got {r!r}')
        else:
            out["rating"], out["rating_kind"] = int(r), "stars"
    for name in ("correction", "comment"):
        v = getattr(body, name)
        if v is not msgspec.UNSET:
            if v is not None and len(v) > MAX_TEXT:
                raise bad(name, f"{name} is longer than {MAX_TEXT} characters")
            out[name] = v
    if body.labels is not msgspec.UNSET:
        labels = body.labels or []
        if len(labels) > MAX_LABELS:
            raise bad("labels", f"at most {MAX_LABELS} labels")
        cleaned = []
        for lab in labels:
            lab = lab.strip()
            if not lab or len(lab) > MAX_LABEL_CHARS:
                raise bad("labels", f"labels must be non-empty strings of at most {MAX_LABEL_CHARS} characters")
            if lab not in cleaned:
                cleaned.append(lab)
        out["labels"] = cleaned
    if body.label is not msgspec.UNSET:
        if body.label is not None and (not body.label.strip() or len(body.label) > MAX_CLASS_CHARS):
            raise bad("label", f"label must be a class name of 1..{MAX_CLASS_CHARS} characters, not blank")
        out["label"] = body.label
    return out


def check_label(label: str, request_id: str, info: RequestInfo) -> None:
    """400 unless ``label`` can be the correct class of the rated request (see module doc)."""
    if info.route != "classify":
        raise APIError(
            400,
            f"label is the correct class of a classify request; request {request_id!r} was served by route "
            f"{info.route!r} (rate it with rating, or give the right answer as correction)",
            "invalid_label",
            "label",
        )
    if info.scores and label not in info.scores:
        valid = ", ".join(repr(k) for k in sorted(info.scores))
        raise APIError(
            400,
            f"label {label!r} is not one of the classifier's labels: {valid}",
            "invalid_label",
            "label",
        )


def _out(f: Feedback) -> FeedbackOut:
    return FeedbackOut(
        id=f.id,
        request_id=f.request_id,
        source=f.source,
        rating=api_value(f.rating, f.rating_kind),
        rating_kind=f.rating_kind,
        correction=f.correction,
        comment=f.comment,
        labels=f.labels,
        model_version=f.model_version,
        created_at=f.created_at.isoformat(timespec="milliseconds") + "Z",
        label=f.label,
    )


# -- storage (blocking; run in a worker thread): the SQL is tuneloop.store_feedback's --------------------------


def upsert_feedback(
    db: Database, request_id: str, source: str, fields: dict[str, Any], model_version: str | Lookup | None = LOOKUP
) -> tuple[FeedbackOut, bool, tuple[int | None, str | None] | None]:
    """Create or update the (request_id, source) record: (record, created, previous (rating, kind) or None).
    With ``model_version=LOOKUP`` the request must be in ``requests`` (else :class:`RequestNotFound`)."""
    saved = save_feedback(db, request_id, source, fields, model_version)
    return _out(saved.feedback), saved.created, saved.previous


def list_feedback(db: Database, request_id: str) -> list[FeedbackOut]:
    return [_out(f) for f in store_feedback.list_feedback(db, request_id)]


def _not_found(request_id: str) -> APIError:
    return APIError(
        404,
        f"No request with id {request_id!r} (use the 'id' of a chat/completion response or its X-Request-Id header).",
        "request_not_found",
        "request_id",
    )


def _busy(e: Exception) -> APIError:
    return APIError(
        503,
        f"The database is busy, try again shortly ({e.__class__.__name__}).",
        "database_busy",
        headers={"Retry-After": "2"},
    )


class FeedbackController(Controller):
    """Feedback on served responses; see module docstring."""

    path = "/v1/feedback"
    tags = ["feedback"]
    guards = [inference_guard]
    exception_handlers = api_exception_handlers()

    @staticmethod
    def _db(request: Request) -> Database:
        db: Database = request.app.state.db
        return db.with_options(lock_timeout_s=min(db.lock_timeout_s, 5.0))

    @post(
        "/",
        status_code=201,
        summary="Rate or correct a served response",
        description="Create (201) or update (200) the feedback of one (request_id, source). "
        'rating: "up" | "down" | 1..5; correction: the ideal answer; labels: short tags; '
        "label: the correct class of a classify request.",
        responses={
            200: ResponseSpec(
                FeedbackOut, description="the (request_id, source) record, updated", generate_examples=False
            ),
            **error_responses(
                400,
                401,
                404,
                413,
                503,
                notes={
                    400: "invalid request: bad JSON, an unknown field, a wrong type or value (`param` names it; "
                    "`invalid_label`: a label on a request that is not a classify request, or outside the "
                    "classifier's labels), "
                    "or none of rating, correction, comment, labels and label (`missing_feedback`)",
                    404: "no served request has this id (`request_not_found`)",
                    503: "the database is busy (`database_busy`, with Retry-After)",
                },
            ),
        },
    )
    async def create(self, request: Request, data: JSONBody[FeedbackIn]) -> Response[FeedbackOut]:
        fields = normalise(data)
        if not fields:
            raise APIError(
                400,
                "feedback needs at least one of rating, correction, comment, labels or label",
                "missing_feedback",
                "rating",
            )
        request_id = data.request_id.strip()
        model_version = self._pending_version(request, request_id)
        db = self._db(request)
        if fields.get("label") is not None:
            check_label(fields["label"], request_id, await self._request_info(request, request_id))
        try:
            out, created, prev = await asyncio.to_thread(
                upsert_feedback, db, request_id, data.source, fields, model_version
            )
        except DatabaseBusy as e:
            raise _busy(e) from None
        except RequestNotFound:
            raise _not_found(request_id) from None
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            if created:
                metrics.observe_feedback(fields.get("rating"), fields.get("rating_kind"), out.model_version)
            elif fields.get("rating") is not None and prev != (fields["rating"], fields["rating_kind"]):
                metrics.observe_feedback(fields["rating"], fields["rating_kind"], out.model_version)
        return Response(content=out, status_code=201 if created else 200)

    @get(
        "/{request_id:str}",
        summary="Feedback recorded for one response (every source)",
        responses=error_responses(
            400,
            401,
            404,
            503,
            notes={
                404: "no served request has this id (`request_not_found`)",
                503: "the database is busy (`database_busy`, with Retry-After)",
            },
        ),
    )
    async def show(self, request: Request, request_id: FromPath[str]) -> FeedbackList:
        db = self._db(request)
        try:
            items = await asyncio.to_thread(list_feedback, db, request_id)
        except DatabaseBusy as e:
            raise _busy(e) from None
        if not items:
            await self._check_request(request, request_id)  # 404 for an unknown request
        return FeedbackList(data=items)

    @staticmethod
    def _pending_version(request: Request, request_id: str) -> str | Lookup | None:
        """The serving version of a request still in the log writer's queue, else LOOKUP (read the table)."""
        writer = getattr(request.app.state, "log_writer", None)
        if writer is not None:
            rec = writer.pending(request_id)
            if rec is not None:
                return rec.model_version
        return LOOKUP

    async def _request_info(self, request: Request, request_id: str) -> RequestInfo:
        """The request's route and scores: from the log writer's queue, else ``requests`` (404 when neither)."""
        writer = getattr(request.app.state, "log_writer", None)
        rec = writer.pending(request_id) if writer is not None else None
        if rec is not None:
            return RequestInfo(rec.model_version, rec.route, getattr(rec, "scores", None))
        try:
            info = await asyncio.to_thread(request_info, self._db(request), request_id)
        except DatabaseBusy as e:
            raise _busy(e) from None
        if info is None:
            raise _not_found(request_id)
        return info

    async def _check_request(self, request: Request, request_id: str) -> None:
        """404 unless the request is queued in the log writer or logged in ``requests``."""
        if self._pending_version(request, request_id) is not LOOKUP:
            return
        try:
            found, _ = await asyncio.to_thread(request_model_version, self._db(request), request_id)
        except DatabaseBusy as e:
            raise _busy(e) from None
        if not found:
            raise _not_found(request_id)
