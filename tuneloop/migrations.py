"""The schema of tuneloop, as an append-only list of migrations applied to both backends (DuckDB and PostgreSQL).

Contract: ``MIGRATIONS[i]`` is applied exactly once, in order, and recorded in
``schema_migrations`` with version ``i + 1``. Never edit or reorder an entry
that has shipped: add a new one at the end. ``tests/test_schema.py`` checks
every table column by column.

Conventions: timestamps are UTC ``TIMESTAMP`` columns named ``*_at``; durations
are seconds (``DOUBLE``) named ``*_s``; ids are UUIDv7 strings; structured
values are ``JSON``.
"""

from __future__ import annotations

import re

#: first line of a migration that only PostgreSQL applies (DuckDB records its version and runs nothing)
POSTGRES_ONLY = "-- postgres only\n"

MIGRATIONS: list[str] = [
    # 1: lineage core — datasets, training runs, model versions
    """
    CREATE TABLE datasets (
        id VARCHAR PRIMARY KEY,            -- '<name>@<hash12>'
        name VARCHAR NOT NULL,
        content_hash VARCHAR NOT NULL,     -- sha256 of the saved splits
        kind VARCHAR NOT NULL,             -- 'sft' | 'preference'
        path VARCHAR NOT NULL,             -- HF datasets folder (save_to_disk)
        source JSON,                       -- inputs and options that built it
        card JSON,                         -- data card: counts per cleaning step
        rows_train BIGINT NOT NULL,
        rows_validation BIGINT NOT NULL,
        rows_test BIGINT NOT NULL,
        parent_ids JSON,                   -- datasets it was sampled/mixed from
        created_at TIMESTAMP NOT NULL
    );
    CREATE TABLE runs (
        id VARCHAR PRIMARY KEY,
        method VARCHAR NOT NULL,           -- lora | qlora | full | prompt_tuning | dpo
        base_model VARCHAR NOT NULL,
        dataset_id VARCHAR,
        config JSON NOT NULL,
        status VARCHAR NOT NULL,           -- running | succeeded | failed
        started_at TIMESTAMP NOT NULL,
        finished_at TIMESTAMP,
        duration_s DOUBLE,
        metrics JSON,
        output_path VARCHAR,
        artifact_hash VARCHAR,
        error VARCHAR
    );
    CREATE TABLE model_versions (
        name VARCHAR PRIMARY KEY,          -- e.g. 'chat-v1'
        kind VARCHAR NOT NULL,             -- adapter | merged | base
        base_model VARCHAR NOT NULL,       -- folder of the base weights
        path VARCHAR NOT NULL,
        content_hash VARCHAR NOT NULL,
        parent_version VARCHAR,
        dataset_id VARCHAR,
        run_id VARCHAR,
        config JSON,
        metrics JSON,
        created_at TIMESTAMP NOT NULL,
        stage VARCHAR NOT NULL DEFAULT 'candidate',  -- candidate | canary | production | retired
        stage_changed_at TIMESTAMP
    );
    CREATE TABLE eval_reports (
        id VARCHAR PRIMARY KEY,
        dataset_id VARCHAR,
        models JSON NOT NULL,              -- names compared, first is the candidate
        report JSON NOT NULL,
        path VARCHAR,
        created_at TIMESTAMP NOT NULL
    );
    """,
    # 2: serving — request log and API keys
    """
    CREATE TABLE requests (
        id VARCHAR PRIMARY KEY,            -- also the OpenAI response id / X-Request-Id
        received_at TIMESTAMP NOT NULL,
        route VARCHAR NOT NULL,            -- chat.completions | completions
        model VARCHAR,                     -- as requested (may be an alias)
        model_version VARCHAR,             -- resolved version (or base name)
        arm VARCHAR,                       -- production | canary | direct
        prompt JSON,                       -- messages or prompt (NULL if redacted)
        response VARCHAR,
        finish_reason VARCHAR,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        ttft_s DOUBLE,
        latency_s DOUBLE,
        status INTEGER NOT NULL,           -- HTTP status; 499 = client aborted
        error VARCHAR,
        stream BOOLEAN,
        params JSON,                       -- sampling parameters
        user_id VARCHAR,
        key_id VARCHAR
    );
    CREATE TABLE api_keys (
        id VARCHAR PRIMARY KEY,
        name VARCHAR,
        scope VARCHAR NOT NULL,            -- inference | admin
        key_hash VARCHAR NOT NULL UNIQUE,  -- sha256 of the secret
        prefix VARCHAR NOT NULL,           -- first characters, for display
        created_at TIMESTAMP NOT NULL,
        revoked_at TIMESTAMP
    );
    """,
    # 3: monitoring — reference profiles and drift reports
    """
    CREATE TABLE reference_profiles (
        model_version VARCHAR PRIMARY KEY,
        dataset_id VARCHAR,
        profile JSON NOT NULL,             -- lengths, unigram counts, finish mix ...
        embeddings BLOB,                   -- float32 sample, row-major
        embedding_dim INTEGER,
        created_at TIMESTAMP NOT NULL
    );
    CREATE TABLE drift_reports (
        id VARCHAR NOT NULL,               -- one computation; several features share it
        model_version VARCHAR NOT NULL,
        window_start TIMESTAMP,
        window_end TIMESTAMP,
        n_requests BIGINT,
        feature VARCHAR NOT NULL,          -- prompt_length | vocabulary | oov | embedding | ... | overall
        statistic VARCHAR NOT NULL,        -- psi | ks | js | mmd | share_delta | score
        value DOUBLE,
        threshold DOUBLE,
        drifted BOOLEAN,
        details JSON,
        created_at TIMESTAMP NOT NULL
    );
    """,
    # 4: feedback, deploy and the loop
    """
    CREATE TABLE feedback (
        id VARCHAR PRIMARY KEY,
        request_id VARCHAR NOT NULL,
        source VARCHAR NOT NULL DEFAULT 'api',
        rating INTEGER,                    -- -1/+1 (down/up) or 1..5
        rating_kind VARCHAR,               -- thumbs | stars
        correction VARCHAR,
        comment VARCHAR,
        labels JSON,
        model_version VARCHAR,
        created_at TIMESTAMP NOT NULL,
        UNIQUE (request_id, source)
    );
    CREATE TABLE dataset_rows (
        dataset_id VARCHAR NOT NULL,
        row_id VARCHAR NOT NULL,
        split VARCHAR NOT NULL,
        request_id VARCHAR,                -- the production request a row came from
        origin VARCHAR                     -- production | feedback | replay | file
    );
    CREATE TABLE deploy_events (
        id VARCHAR PRIMARY KEY,
        model_version VARCHAR NOT NULL,
        from_stage VARCHAR,
        to_stage VARCHAR NOT NULL,
        actor VARCHAR,
        reason VARCHAR,
        details JSON,
        occurred_at TIMESTAMP NOT NULL
    );
    CREATE TABLE canaries (
        id VARCHAR PRIMARY KEY,
        candidate VARCHAR NOT NULL,
        production VARCHAR,
        share DOUBLE NOT NULL,
        status VARCHAR NOT NULL,           -- running | promoted | rolled_back
        started_at TIMESTAMP NOT NULL,
        decided_at TIMESTAMP,
        decision JSON
    );
    CREATE TABLE loop_runs (
        id VARCHAR NOT NULL,               -- one cycle
        step VARCHAR NOT NULL,             -- sample | train | gate | canary | decide
        status VARCHAR NOT NULL,           -- running | done | failed | skipped
        started_at TIMESTAMP NOT NULL,
        finished_at TIMESTAMP,
        details JSON,
        error VARCHAR,
        PRIMARY KEY (id, step)
    );
    """,
    # 5: tool calling — the parsed tool calls of a chat answer (the definitions are in params.tools)
    """
    ALTER TABLE requests ADD COLUMN tool_calls JSON;  -- choice 0's tool calls, OpenAI shape; NULL when none
    """,
    # 6: shared storage — which replica served a request (server.replica); NULL for rows logged before
    """
    ALTER TABLE requests ADD COLUMN replica VARCHAR;
    """,
    # 7: PostgreSQL indexes for the time-window reads (drift, canary statistics, sampling, exports copy one
    # window of the log) and for feedback by request. DuckDB scans by its zone maps instead, and an index there
    # would slow every request-log append.
    POSTGRES_ONLY
    + """
    CREATE INDEX requests_received_at ON requests (received_at);
    CREATE INDEX requests_version_received_at ON requests (model_version, received_at);
    CREATE INDEX feedback_request_id ON feedback (request_id);
    CREATE INDEX feedback_created_at ON feedback (created_at);
    """,
    # 8: experiment tracking — where a run was also tracked ({"tensorboard": dir, "mlflow": {...}}); the runs
    # table stays the source of truth
    """
    ALTER TABLE runs ADD COLUMN tracking JSON;
    """,
    # 9: classifiers — a classify request's probabilities {label: probability}; the predicted label is `response`
    """
    ALTER TABLE requests ADD COLUMN scores JSON;
    """,
    # 10: classifiers — the correct class of a classify request, given as feedback (NULL for other feedback)
    """
    ALTER TABLE feedback ADD COLUMN label VARCHAR;
    """,
    # 11: task-scoped stages — what a version does (chat | classification); production and canary are held per
    # task, so a classifier and a chat model are each in production at once. Versions before it are chat models.
    """
    ALTER TABLE model_versions ADD COLUMN task VARCHAR DEFAULT 'chat';
    """,
    # 12: the web console's annotation queue — which logged request is assigned to which reviewer, and when it
    # was reviewed (the review itself is a feedback row with source 'review:<reviewer>')
    """
    CREATE TABLE review_assignments (
        request_id VARCHAR PRIMARY KEY,
        reviewer VARCHAR NOT NULL,
        reason VARCHAR NOT NULL,           -- the queue rule that picked it: thumbs_down | truncated | unreviewed | drifted
        assigned_at TIMESTAMP NOT NULL,
        reviewed_at TIMESTAMP
    );
    """,
    # 13: the web console's sessions and signing secret, shared by every replica of the database (a session is
    # keyed by the SHA-256 of its cookie, never the cookie itself)
    """
    CREATE TABLE console_sessions (
        id_hash VARCHAR PRIMARY KEY,
        data BLOB NOT NULL,                -- the session (JSON: the signed-in key's id)
        expires_at TIMESTAMP
    );
    CREATE TABLE console_secrets (
        name VARCHAR PRIMARY KEY,          -- 'csrf': signs the console's CSRF tokens
        value VARCHAR NOT NULL,
        created_at TIMESTAMP NOT NULL
    );
    """,
]


def render(sql: str, backend: str) -> str:
    """``sql`` (written in DuckDB's types) for ``backend``: PostgreSQL spells ``DOUBLE`` as ``DOUBLE PRECISION``
    and ``BLOB`` as ``BYTEA``; everything else in these migrations means the same on both (``JSON`` stays
    ``JSON``: text kept as written, like DuckDB's)."""
    if backend == "duckdb":
        return "SELECT 1" if sql.startswith(POSTGRES_ONLY) else sql
    if backend != "postgres":
        raise ValueError(f"unknown backend {backend!r}")
    sql = re.sub(r"\bDOUBLE\b(?!\s+PRECISION)", "DOUBLE PRECISION", sql)
    return re.sub(r"\bBLOB\b", "BYTEA", sql)
