"""The request log: every served request becomes one row of the ``requests`` table (DuckDB file or PostgreSQL).

Contract
--------
* A row is a :class:`monitoring.records.RequestRecord` (the columns of the
  ``requests`` table, :mod:`tuneloop.migrations`, migration 2, plus
  ``tool_calls`` added by migration 5, ``replica`` by migration 6 and
  ``scores`` by migration 9); :data:`COLUMNS` is their order in the table.
  A ``classify`` request with several inputs is one row per input (see
  :mod:`tuneloop.server.classify_routes`), submitted with
  ``count_request=False`` for all but the first so the per-request metrics
  count the request once.
* :class:`RequestLogWriter` writes records in batches from a background
  thread, so a response never waits on the database:

  - :meth:`~RequestLogWriter.submit` never blocks (a dict insert under a lock
    held for microseconds). It also calls ``metrics.observe(rec)``, so the
    Prometheus counters and the log are fed from the same records.
  - A synthetic record (``arm == "synthetic"``, :data:`monitoring.records.SYNTHETIC`) is counted by
    ``metrics.observe_synthetic`` only and never queued: ``submit`` returns False without counting a drop.
  - Each row records the replica that served it: a record whose ``replica``
    is None gets the writer's ``replica`` (the app passes
    ``settings.server.replica_name``); None leaves the column NULL.
  - The queue is bounded by ``log.queue_max``. **When it is full the NEW row
    is dropped** (``submit`` returns False) and counted in
    ``tuneloop_log_rows_dropped_total`` and ``rows_dropped``; rows already
    queued are kept, in order.
  - A flush happens every ``log.flush_interval_s`` seconds and as soon as
    ``log.flush_rows`` rows are queued. Each flush is one
    :meth:`tuneloop.db.Database.connect` block (``log_only``: no change
    notification), so writing is all-or-nothing per flush, and re-writing a
    batch is harmless (ids are primary keys):

    * DuckDB: the whole batch goes in through a pyarrow table with one
      ``INSERT INTO requests SELECT ... FROM batch`` (again as ``INSERT OR
      IGNORE`` if an id is already there); the file is opened for the flush
      (or kept open, see below), so other processes can write between flushes.
    * PostgreSQL: one ``COPY requests FROM STDIN`` of the batch (JSON columns
      as JSON text, timestamps naive UTC; NUL characters, which PostgreSQL
      text cannot hold, become U+FFFD) after ``SET LOCAL lock_timeout`` to
      the writer's lock timeout. If an id is already there (a flush retried
      after a commit whose acknowledgement was lost) the batch is copied
      again into a temporary table and moved with ``INSERT ... ON CONFLICT
      (id) DO NOTHING``: the plain COPY is tried first because the detour
      costs more on every flush, for a case that is rare.
  - DuckDB only: under steady traffic the writer thread keeps the file open between its
    flushes (``Database.connect(keep_open=True)``) for up to ``log.hold_s``
    at a time, saving the open and the checkpoint of every flush. It closes
    it when a flush finds nothing to write, every ``log.hold_s``, at close,
    and within one flush interval when another process knocks
    (``Database.knocked``: a tuneloop process that finds the file locked
    touches ``<db>.knock``); after a knock it reopens per flush for
    ``10 x log.flush_interval_s`` (at least 10 s), so a CLI command of many
    short writes is not held up at each of them. (PostgreSQL connections
    are pooled by the backend.)
  - If the database is busy or unreachable, the flush fails: the rows stay
    queued (still bounded by ``queue_max``; overflow is dropped and counted as
    above), ``tuneloop_log_flush_errors_total`` is incremented and the flush
    is retried with back-off: one interval later, doubling with each failure
    in a row up to ``max(flush_interval_s, 5 s)``, back to one interval after
    a success. Busy or unreachable means: DuckDB file held by another process
    past the lock timeout, or an I/O error; PostgreSQL down, restarting or out
    of connections (:class:`~tuneloop.db.DatabaseBusy` from the pool), the
    connection cut mid-COPY or at commit, a lock wait past the lock timeout,
    and any other server error that is not about the rows' data. The writer
    recovers by itself, without a restart, at its first retry after the
    backend hands out a connection again (PostgreSQL: when the pool has
    reconnected, :mod:`tuneloop.db_postgres`). A flush attempt blocks only
    the writer thread, at most about the writer's lock timeout (default
    ``max(2 s, 2 x flush_interval_s)``): it bounds the wait for a pooled
    connection and for table locks. It does not bound a connection that
    hangs without being cut (a network partition mid-COPY): that is left to
    TCP and the pool's connection settings. If the database rejects the
    batch's data (DuckDB: any other error; PostgreSQL: a data or integrity
    error, or a value the driver cannot encode), rows are retried one by one
    (PostgreSQL: each in a savepoint of one transaction) and only the
    rejected rows are dropped (counted, logged without their content).
  - :meth:`~RequestLogWriter.close` (lifespan shutdown, i.e. SIGTERM) drains
    every queued row within ``timeout_s`` and returns how many it could not
    write (during an outage: every queued row, counted as dropped). SIGKILL
    loses at most the rows of one flush interval plus the flush in progress
    (the next interval starts when a flush ends; tests bound it by 0.3 s),
    and during an outage the rows queued since it began; DuckDB's WAL and
    the per-flush transaction leave a database that opens.
  - ``log.redact_prompts`` stores no prompt/response text and no tool calls
    (NULL), only sizes and timings (a ``classify`` row keeps its predicted
    label and ``scores``: class names, not user text); ``log.scrub_pii`` replaces emails, phones,
    card numbers and IPs in prompt and response text and in the tool calls'
    names and arguments with :func:`tuneloop.pii.scrub`. Both are
    applied in the writer thread, never on the request path.
  - ``log.enabled = false`` keeps the metrics but writes nothing.
* Nothing here is module-global: the app owns one writer
  (``app.state.log_writer``), started in the lifespan and closed on shutdown.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

from tuneloop.db import Database, DatabaseBusy
from tuneloop.errors import UserError
from tuneloop.monitoring.records import SYNTHETIC, RequestRecord
from tuneloop.pii import scrub

if TYPE_CHECKING:  # pragma: no cover
    import duckdb
    import pyarrow as pa

    from tuneloop.monitoring.metrics import ServingMetrics
    from tuneloop.settings import LogSettings

log = logging.getLogger(__name__)


# column order of the requests table (tests/test_requestlog.py checks it against the schema)
COLUMNS: tuple[str, ...] = (
    "id",
    "received_at",
    "route",
    "model",
    "model_version",
    "arm",
    "prompt",
    "response",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "ttft_s",
    "latency_s",
    "status",
    "error",
    "stream",
    "params",
    "user_id",
    "key_id",
    "tool_calls",
    "replica",
    "scores",
)
_JSON_COLUMNS = ("prompt", "params", "tool_calls", "scores")
# columns that are not text (their Arrow types in _arrow_schema); the others are VARCHAR or JSON
_TYPED_COLUMNS = ("received_at", "prompt_tokens", "completion_tokens", "ttft_s", "latency_s", "status", "stream")
# VARCHAR columns: PostgreSQL text cannot hold NUL (JSON text escapes it as \u0000)
_TEXT_COLUMNS = tuple(c for c in COLUMNS if c not in _JSON_COLUMNS and c not in _TYPED_COLUMNS)
_INSERT_COLUMNS = ", ".join(COLUMNS)
# retries of a failed flush back off up to this (or the flush interval, if longer)
MAX_BACKOFF_S = 5.0


def _arrow_schema() -> pa.Schema:
    import pyarrow as pa

    types = {
        "received_at": pa.timestamp("us"),
        "prompt_tokens": pa.int32(),
        "completion_tokens": pa.int32(),
        "ttft_s": pa.float64(),
        "latency_s": pa.float64(),
        "status": pa.int32(),
        "stream": pa.bool_(),
    }
    return pa.schema([(c, types.get(c, pa.string())) for c in COLUMNS])


def _json(v: Any) -> str | None:
    if v is None:
        return None
    try:
        return msgspec.json.encode(v).decode()
    except (TypeError, msgspec.EncodeError):
        return json.dumps(v, default=str)


def _naive_utc(t: datetime) -> datetime:
    if t.tzinfo is not None:
        t = t.astimezone(UTC).replace(tzinfo=None)
    return t


def _reason(e: BaseException) -> str:
    """An error's message without the row it is about: PostgreSQL's DETAIL and CONTEXT can quote the row's
    values (prompts), so only its primary message is logged."""
    diag = getattr(e, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    return primary if primary else str(e).split("\n", 1)[0][:200]


def _map_strings(v: Any, fn: Callable[[str], str]) -> Any:
    """Apply ``fn`` to every string inside a JSON-like value (messages, content parts, prompt lists)."""
    if isinstance(v, str):
        return fn(v)
    if isinstance(v, list):
        return [_map_strings(x, fn) for x in v]
    if isinstance(v, dict):
        # keys and structural fields (role, type, name) stay; values are scrubbed
        return {k: (x if k in ("role", "type") else _map_strings(x, fn)) for k, x in v.items()}
    return v


class RequestLogWriter:
    """Bounded, batched, background writer of :class:`RequestRecord` rows; see module docstring."""

    # rows per INSERT transaction when a backlog is drained
    MAX_BATCH = 50_000

    def __init__(
        self,
        db: Database,
        settings: LogSettings,
        metrics: ServingMetrics | None = None,
        *,
        lock_timeout_s: float | None = None,
        replica: str | None = None,
    ):
        for name, low in (("flush_interval_s", 0.0), ("flush_rows", 0), ("queue_max", 0)):
            if not getattr(settings, name) > low:
                raise UserError(f"log.{name} must be > {low:g}, got {getattr(settings, name)!r}")
        if not settings.hold_s >= 0:
            raise UserError(
                f"log.hold_s must be >= 0 (0 = reopen the database for each flush), got {settings.hold_s!r}"
            )
        self.settings = settings
        self.metrics = metrics
        self.replica = replica or None  # recorded in rows that do not name their replica
        # our own handle: a flush must not wait the CLI's long lock timeout before it can retry
        if lock_timeout_s is None:
            lock_timeout_s = max(2.0, 2 * settings.flush_interval_s)
        self.db = db.with_options(lock_timeout_s=lock_timeout_s)
        self._scrub = settings.scrub_pii and not settings.redact_prompts
        self._pending: dict[str, RequestRecord] = {}
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._closed = False
        self._close_deadline = 0.0
        self._retry_at = 0.0
        self._failures = 0  # failed flushes in a row (back-off)
        self.rows_written = 0
        self.rows_dropped = 0
        self.flush_errors = 0
        self.flushes = 0
        self._held_since: float | None = None  # when the writer thread began keeping the file open
        self._no_hold_until = 0.0  # after a knock: reopen per flush until then

    # -- life cycle ------------------------------------------------------------
    def start(self) -> RequestLogWriter:
        """Start the background flush thread (idempotent)."""
        with self._cond:
            if self._thread is None and not self._closed and self.settings.enabled:
                self._thread = threading.Thread(target=self._run, name="tuneloop-requestlog", daemon=True)
                self._thread.start()
        return self

    def close(self, timeout_s: float = 10.0) -> int:
        """Stop accepting rows, write every queued row within ``timeout_s``; return rows left unwritten (dropped)."""
        with self._cond:
            if self._closed:
                return 0
            self._closing = True
            self._close_deadline = time.monotonic() + timeout_s
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        else:
            self._drain()
        with self._cond:
            self._closed = True
            left = len(self._pending)
            if left:
                self._pending.clear()
        if left:
            self._count_dropped(left)
            log.error("request log: %d rows could not be written before shutdown", left)
        self._set_depth()
        return left

    def __enter__(self) -> RequestLogWriter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- request path ------------------------------------------------------------
    def submit(self, rec: RequestRecord, count_request: bool = True) -> bool:
        """Queue ``rec`` (never blocks) and count it in the metrics; False if it was dropped. ``count_request``
        false: a further row of a request already counted (a classify request's other inputs). A synthetic
        record is counted apart and never written (module doc)."""
        if rec.arm == SYNTHETIC:
            if self.metrics is not None and count_request:
                self.metrics.observe_synthetic(rec)
            return False
        if self.metrics is not None:
            self.metrics.observe(rec, count_request)
        if not self.settings.enabled:
            return False
        with self._cond:
            if self._closing or self._closed or len(self._pending) >= self.settings.queue_max:
                accepted = False
            else:
                self._pending[rec.id] = rec
                accepted = True
                if len(self._pending) >= self.settings.flush_rows:
                    self._cond.notify()
            depth = len(self._pending)
        if not accepted:
            self._count_dropped(1)
        if self.metrics is not None:
            self.metrics.log_queue_depth.set(depth)
        return accepted

    def pending(self, request_id: str) -> RequestRecord | None:
        """The queued (not yet written) record ``request_id``, if any."""
        with self._cond:
            return self._pending.get(request_id)

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._pending)

    def stats(self) -> dict[str, int]:
        return {
            "queued": self.queue_depth,
            "written": self.rows_written,
            "dropped": self.rows_dropped,
            "flush_errors": self.flush_errors,
            "flushes": self.flushes,
        }

    # -- writing -------------------------------------------------------------
    def flush(self, hold: bool = False) -> int:
        """Write every queued row now, in the caller's thread; return rows written.

        ``hold=True`` (the writer thread only) may leave the file open for its next flush.

        Blocking (disk): from async code call it in a worker thread. On failure
        the rows stay queued for the next attempt and the error is counted.
        """
        # only the rows queued now: under steady traffic a flush must end, leaving the file to other processes
        todo = self.queue_depth
        total = 0
        while todo > 0:
            n, ok = self._write_batch(hold)
            total += n
            todo -= self.MAX_BATCH
            if not ok or n == 0:
                break
        return total

    def _drain(self) -> None:
        while self.queue_depth:
            _, ok = self._write_batch()
            if not ok:
                if time.monotonic() >= self._close_deadline:
                    return
                time.sleep(min(0.1, max(0.0, self._close_deadline - time.monotonic())))

    def _run(self) -> None:
        _arrow_schema()  # import pyarrow now, not inside the first flush
        interval = max(0.001, self.settings.flush_interval_s)
        next_flush = time.monotonic() + interval
        while True:
            with self._cond:
                while not self._closing:
                    now = time.monotonic()
                    due = next_flush
                    if len(self._pending) >= self.settings.flush_rows and now >= self._retry_at:
                        break
                    if now >= due:
                        break
                    wait = due - now
                    if len(self._pending) >= self.settings.flush_rows:
                        wait = min(wait, self._retry_at - now)
                    self._cond.wait(wait)
                closing = self._closing
            if closing:
                try:
                    self._drain()
                finally:
                    self.db.release()
                return
            try:
                wrote = self.flush(hold=self._may_hold())
                self._after_flush(wrote)
            except Exception:  # never let the writer thread die
                log.exception("request log: unexpected error in flush")
            next_flush = max(time.monotonic() + interval, self._retry_at)

    def _may_hold(self) -> bool:
        return self.settings.hold_s > 0 and time.monotonic() >= self._no_hold_until

    def _after_flush(self, wrote: int) -> None:
        """Let go of a file kept open: on a knock, when idle, and every ``hold_s`` (see module doc)."""
        now = time.monotonic()
        knocked = self.db.knocked()
        if not self.db.held:
            self._held_since = None
            return
        if self._held_since is None:
            self._held_since = now
        if knocked:
            self._no_hold_until = now + max(10.0, 10 * self.settings.flush_interval_s)
        if knocked or wrote == 0 or now - self._held_since >= self.settings.hold_s:
            self.db.release()
            self._held_since = None

    def _write_batch(self, hold: bool = False) -> tuple[int, bool]:
        """Write up to MAX_BATCH queued rows in one transaction: (rows written, ok)."""
        with self._write_lock:
            with self._cond:
                batch = []
                for rec in self._pending.values():
                    batch.append(rec)
                    if len(batch) >= self.MAX_BATCH:
                        break
            if not batch:
                return 0, True
            t0 = time.perf_counter()
            try:
                written = self._insert(batch, hold)
            except Exception as e:
                if self._unavailable(e):
                    return self._failed(e)
                log.warning("request log: batch of %d rejected (%s); retrying row by row", len(batch), type(e).__name__)
                try:
                    written = self._insert_one_by_one(batch)
                except Exception as e2:
                    if self._unavailable(e2):
                        return self._failed(e2)
                    raise
            self.flushes += 1
            with self._cond:
                for rec in batch:
                    if self._pending.get(rec.id) is rec:
                        del self._pending[rec.id]
                depth = len(self._pending)
            self.rows_written += written
            self._retry_at = 0.0
            self._failures = 0
            if self.metrics is not None:
                self.metrics.log_rows_written_total.inc(written)
                self.metrics.log_flush_duration_seconds.observe(time.perf_counter() - t0)
                self.metrics.log_queue_depth.set(depth)
            return written, True

    def _unavailable(self, e: BaseException) -> bool:
        """Whether ``e`` says the database is busy or unreachable (keep the rows, retry), not that it rejected the
        rows' data (retry them one by one); see module doc."""
        if isinstance(e, (DatabaseBusy, OSError)):
            return True
        if self.db.backend == "postgres":
            import psycopg

            return isinstance(e, psycopg.Error) and not isinstance(e, (psycopg.DataError, psycopg.IntegrityError))
        import duckdb

        return isinstance(e, duckdb.IOException)

    def _failed(self, e: BaseException) -> tuple[int, bool]:
        self.flush_errors += 1
        self._failures += 1
        interval = max(0.001, self.settings.flush_interval_s)
        backoff = min(interval * 2 ** min(self._failures - 1, 30), max(interval, MAX_BACKOFF_S))
        self._retry_at = time.monotonic() + backoff
        if self.metrics is not None:
            self.metrics.log_flush_errors_total.inc()
        log.warning("request log: flush failed, %d rows kept for retry: %s", self.queue_depth, _reason(e))
        return 0, False

    def _count_dropped(self, n: int) -> None:
        self.rows_dropped += n
        if self.metrics is not None:
            self.metrics.log_rows_dropped_total.inc(n)

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.log_queue_depth.set(self.queue_depth)

    # -- row preparation and SQL ---------------------------------------------------
    def _prepare(self, rec: RequestRecord) -> dict[str, Any]:
        row = {c: getattr(rec, c) for c in COLUMNS}
        row["received_at"] = _naive_utc(rec.received_at)
        if row["replica"] is None:
            row["replica"] = self.replica
        if self.settings.redact_prompts:
            row["prompt"] = None
            if rec.route != "classify":  # a classify response is the class name, not text: drift needs it
                row["response"] = None
            row["tool_calls"] = None  # the generated arguments are response text
        elif self._scrub:
            row["prompt"] = _map_strings(row["prompt"], lambda s: scrub(s)[0])
            row["tool_calls"] = _map_strings(row["tool_calls"], lambda s: scrub(s)[0])
            if row["response"] is not None:
                row["response"] = scrub(row["response"])[0]
        for c in _JSON_COLUMNS:
            row[c] = _json(row[c])
        return row

    def _table(self, batch: list[RequestRecord]) -> pa.Table:
        import pyarrow as pa

        rows = [self._prepare(r) for r in batch]
        return pa.Table.from_pylist(rows, schema=_arrow_schema())

    _SQL = f"INSERT INTO requests ({', '.join(COLUMNS)}) SELECT {', '.join(COLUMNS)} FROM _tuneloop_log_batch"

    def _insert_table(self, con: duckdb.DuckDBPyConnection, table: pa.Table) -> None:
        """Append ``table``'s rows. A row whose id is already logged (a batch retried after a
        commit whose success was not seen) is skipped: the plain INSERT is tried first because
        ``INSERT OR IGNORE`` costs twice as much on every flush, for a case that is rare. Runs
        inside the caller's transaction; a duplicate rolls that back and begins a new one."""
        import duckdb

        con.register("_tuneloop_log_batch", table)
        try:
            try:
                con.execute(self._SQL)
            except duckdb.ConstraintException:
                con.rollback()
                con.begin()
                con.execute(self._SQL.replace("INSERT INTO", "INSERT OR IGNORE INTO"))
        finally:
            try:
                con.unregister("_tuneloop_log_batch")
            except Exception:
                pass

    def _insert(self, batch: list[RequestRecord], hold: bool = False) -> int:
        if self.db.backend == "postgres":
            return self._copy_pg(batch)
        table = self._table(batch)
        with self.db.connect(log_only=True, keep_open=hold) as con:
            self._insert_table(con, table)
        return len(batch)

    def _insert_one_by_one(self, batch: list[RequestRecord]) -> int:
        """Each row in its own transaction on one connection; rows the database rejects are dropped."""
        if self.db.backend == "postgres":
            return self._insert_one_by_one_pg(batch)
        import duckdb

        written = 0
        with self.db.connect(transaction=False, log_only=True) as con:
            for rec in batch:
                try:
                    table = self._table([rec])
                    con.begin()
                    try:
                        self._insert_table(con, table)
                    except BaseException:
                        con.rollback()
                        raise
                    con.commit()
                    written += 1
                except duckdb.IOException:
                    raise
                except Exception as e:
                    self._count_dropped(1)
                    log.error("request log: dropped request %s: %s: %s", rec.id, type(e).__name__, _reason(e))
        return written

    # -- PostgreSQL ------------------------------------------------------------------
    def _pg_row(self, rec: RequestRecord) -> tuple[Any, ...]:
        row = self._prepare(rec)
        for c in _TEXT_COLUMNS:
            v = row[c]
            if v is not None and "\x00" in v:
                row[c] = v.replace("\x00", "\ufffd")
        return tuple(row[c] for c in COLUMNS)

    def _pg_begin(self, con: Any) -> None:
        """Bound this transaction's waits for table locks by the writer's lock timeout (see module doc)."""
        ms = max(1, int(self.db.lock_timeout_s * 1000))
        con.execute(f"SET LOCAL lock_timeout = {ms}")

    _PG_MOVE = (
        f"INSERT INTO requests ({_INSERT_COLUMNS}) SELECT {_INSERT_COLUMNS} FROM _tuneloop_log_batch "
        "ON CONFLICT (id) DO NOTHING"
    )

    def _copy_pg(self, batch: list[RequestRecord]) -> int:
        """COPY the batch in one transaction; if an id is already there, again through a temporary table."""
        import psycopg

        rows = [self._pg_row(r) for r in batch]
        try:
            with self.db.connect(log_only=True) as con:
                self._pg_begin(con)
                con.copy_rows("requests", COLUMNS, rows)
        except psycopg.errors.UniqueViolation:
            with self.db.connect(log_only=True) as con:
                self._pg_begin(con)
                con.execute("CREATE TEMPORARY TABLE _tuneloop_log_batch (LIKE requests) ON COMMIT DROP")
                con.copy_rows("_tuneloop_log_batch", COLUMNS, rows)
                con.execute(self._PG_MOVE)
        return len(rows)

    _PG_INSERT_ONE = (
        f"INSERT INTO requests ({_INSERT_COLUMNS}) VALUES ({', '.join('?' * len(COLUMNS))}) ON CONFLICT (id) DO NOTHING"
    )

    def _insert_one_by_one_pg(self, batch: list[RequestRecord]) -> int:
        """Each row in its own savepoint of one transaction; rows PostgreSQL rejects are dropped, and an outage
        (see :meth:`_unavailable`) propagates so the whole batch is retried."""
        written = 0
        with self.db.connect(log_only=True) as con:
            self._pg_begin(con)
            for rec in batch:
                try:
                    with con.conn.transaction():  # a savepoint: a rejected row leaves the others' transaction usable
                        con.execute(self._PG_INSERT_ONE, self._pg_row(rec))
                    written += 1
                except Exception as e:
                    if self._unavailable(e):
                        raise
                    self._count_dropped(1)
                    log.error("request log: dropped request %s: %s: %s", rec.id, type(e).__name__, _reason(e))
        return written
