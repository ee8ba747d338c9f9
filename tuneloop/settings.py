"""Platform settings: one typed dataclass per concern, loaded from ``tuneloop.yaml``.

Contract
--------
:func:`load_settings` merges, in increasing priority: defaults, the YAML file
(``--config``, else ``$TUNELOOP_CONFIG``, else ``./tuneloop.yaml`` if present),
env vars ``TUNELOOP_<SECTION>__<FIELD>`` (e.g. ``TUNELOOP_SERVER__PORT=9000``)
and ``section.field=value`` overrides. Any other ``TUNELOOP_*`` variable is an error
listing the valid ones, except the non-settings names in :data:`OTHER_ENV`. Secrets (API keys) never live here.
Paths are resolved against ``home`` (``$TUNELOOP_HOME`` or ``./.tuneloop``).
Training hyper-parameters are not here: they are ``trainer.config.TrainConfig``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tuneloop.config import build, load_yaml

if TYPE_CHECKING:
    from tuneloop.db import Database


def _home_default() -> str:
    return os.environ.get("TUNELOOP_HOME", ".tuneloop")


def _models_default() -> str:
    return os.environ.get(
        "TUNELOOP_MODEL_CACHE",
        str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tuneloop" / "models"),
    )


@dataclass
class PathSettings:
    home: str = field(
        default_factory=_home_default,
        metadata={"help": "Folder for the database, datasets, runs and reports ($TUNELOOP_HOME)."},
    )
    db: str = field(
        default="",
        metadata={
            "help": "DuckDB file of the embedded backend; empty means <home>/tuneloop.duckdb (see database.url)."
        },
    )
    models: str = field(
        default_factory=_models_default,
        metadata={"help": "Cache of pulled base models, shared across projects ($TUNELOOP_MODEL_CACHE)."},
    )

    @property
    def home_path(self) -> Path:
        return Path(self.home).expanduser().resolve()

    @property
    def db_path(self) -> Path:
        return Path(self.db).expanduser().resolve() if self.db else self.home_path / "tuneloop.duckdb"

    @property
    def models_path(self) -> Path:
        return Path(self.models).expanduser().resolve()

    def sub(self, name: str) -> Path:
        """``<home>/<name>``, created on demand (datasets, runs, reports ...)."""
        p = self.home_path / name
        p.mkdir(parents=True, exist_ok=True)
        return p


#: linear-layer name suffixes of common decoder blocks (Llama/Mistral/Qwen/Gemma, GPT-2/NeoX/Phi/Falcon styles)
LORA_TARGET_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "qkv_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "gate_up_proj",
    "c_attn",
    "c_proj",
    "c_fc",
    "query_key_value",
    "dense",
    "dense_h_to_4h",
    "dense_4h_to_h",
    "fc1",
    "fc2",
    "wqkv",
    "wo",
    "w1",
    "w2",
    "w3",
)


@dataclass
class EngineSettings:
    dtype: str = field(default="auto", metadata={"help": "Model dtype; 'auto' picks float32 on CPU, bfloat16 on GPU."})
    max_model_len: int = field(default=2048, metadata={"help": "Context length (prompt + completion tokens)."})
    kv_cache_gib: float = field(default=1.0, metadata={"help": "CPU KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)."})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "GPU only: share of GPU memory vLLM may use."})
    enforce_eager: bool = field(
        default=True, metadata={"help": "Skip graph compilation (faster start-up; right for CPU)."}
    )
    enable_lora: bool = field(default=True, metadata={"help": "Serve LoRA adapters per request."})
    max_loras: int = field(default=4, metadata={"help": "Adapters resident in one batch."})
    max_lora_rank: int = field(default=16, metadata={"help": "Largest LoRA rank the engine accepts."})
    max_num_seqs: int = field(default=64, metadata={"help": "Most sequences scheduled at once."})
    tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs per replica (tensor parallelism)."})
    seed: int = field(default=0, metadata={"help": "Engine seed."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(LORA_TARGET_MODULES),
        metadata={
            "help": "Module-name suffixes the engine applies LoRA to (the transformer blocks' linear layers). "
            "lm_head and the embeddings are left out: vLLM 0.32's LoRA wrapper of the output layer crashes the "
            "engine core when a request with prompt logprobs (completions' echo + logprobs, as log-likelihood "
            "evaluation sends) shares a step with another request (vLLM issue 16668). Adapters that train "
            "lm_head or embeddings are refused at load. Empty = every module vLLM supports."
        },
    )
    structured_outputs_backend: str = field(
        default="xgrammar",
        metadata={
            "help": "vLLM structured-output backend for response_format, tool_choice=required/named and "
            "structured_outputs: xgrammar, guidance (llguidance, wider JSON-schema support) or outlines."
        },
    )
    compact_json: bool = field(
        default=True,
        metadata={
            "help": "Structured JSON outputs carry no whitespace between tokens (vLLM's disable_any_whitespace; "
            "xgrammar and guidance only), so a model that pads JSON with spaces or newlines cannot run on to "
            "max_tokens. false = any whitespace, vLLM's default."
        },
    )
    cpu_reserved_cores: int = field(
        default=0, metadata={"help": "CPU only: cores vLLM keeps for its front end (VLLM_CPU_NUM_OF_RESERVED_CPU)."}
    )
    cpu_threads_bind: str = field(
        default="auto",
        metadata={"help": "CPU only: OMP thread binding (VLLM_CPU_OMP_THREADS_BIND), 'auto' = all cores."},
    )
    multiprocessing: bool = field(
        default=True,
        metadata={
            "help": "Offline engine of eval and the gate: run its engine core in its own process "
            "(VLLM_ENABLE_V1_MULTIPROCESSING). The server's engine core always runs in its own process."
        },
    )


@dataclass
class DatabaseSettings:
    url: str = field(
        default="",
        metadata={
            "help": "Where the system of record lives. Empty (default): the embedded DuckDB file paths.db, no server "
            "needed, one serving process. postgresql://USER:PASSWORD@HOST:PORT/DB: a shared PostgreSQL server that "
            "every replica and CLI command use at once (set it from a secret: TUNELOOP_DATABASE__URL)."
        },
    )
    pool_size: int = field(
        default=4, metadata={"help": "PostgreSQL connections each process keeps in its pool (shared backend only)."}
    )

    def open(self, paths: PathSettings) -> Database:
        """The database these settings name: PostgreSQL for a postgresql:// url, else the DuckDB file."""
        from tuneloop.db import open_database

        if self.url:
            return open_database(self.url, pool_size=self.pool_size)
        return open_database(paths.db_path)


@dataclass
class ServerSettings:
    host: str = field(default="127.0.0.1", metadata={"help": "Bind address."})
    port: int = field(default=8000, metadata={"help": "Bind port."})
    model: str = field(
        default="",
        metadata={
            "help": "Base model (folder, registered version or pulled name) to serve; empty = base of the production version, else the default base."
        },
    )
    adapters: list[str] = field(
        default_factory=list, metadata={"help": "Adapter versions (or name=path) to load at start-up."}
    )
    served_model_name: str = field(
        default="", metadata={"help": "Name the base model answers to in the API (default: its folder name)."}
    )
    max_body_bytes: int = field(default=4 * 1024 * 1024, metadata={"help": "Largest accepted request body."})
    tool_parser: str = field(
        default="auto",
        metadata={
            "help": "vLLM tool-call parser for tool_choice=auto (e.g. hermes, llama3_json, mistral, pythonic); 'auto' "
            "picks it from the chat template's model family (ChatML and <tool_call> -> hermes), 'none' refuses "
            "tool_choice=auto. tool_choice=required or a named function needs no parser (structured outputs "
            "enforce it)."
        },
    )
    state_refresh_s: float = field(
        default=1.0,
        metadata={
            "help": "How often the server checks whether deploy state (aliases, canary) or API keys changed in the "
            "database, and re-reads them if so (a stat of the DuckDB file, a NOTIFY from PostgreSQL: checking is "
            "free, so a change made anywhere reaches every replica within about this long)."
        },
    )
    drain_s: float = field(
        default=0.0,
        metadata={
            "help": "On SIGTERM, answer /readyz with 503 (draining) for this long while still serving, so load "
            "balancers stop sending new requests before the server stops accepting them; then drain in-flight "
            "requests and the request log. Set it above the balancer's health-check interval for rolling updates "
            "with zero failed requests (Kubernetes: a few seconds, within terminationGracePeriodSeconds)."
        },
    )
    classifier_engines: int = field(
        default=2,
        metadata={
            "help": "Classifier servers only: extra vLLM pooling engines for other classifier versions (one per "
            "folder; a classifier canary, a newly promoted classifier, a version asked for by name), started on "
            "first use; the least recently used idle one that is not production or canary is stopped to make room. "
            "Each costs its model's memory and engine.kv_cache_gib. 0 = serve only the server's own folder."
        },
    )
    replica: str = field(
        default="",
        metadata={
            "help": "This server's name in the request log (requests.replica) and its exports; empty means "
            "$TUNELOOP_REPLICA, else the host name (in Kubernetes, the pod name)."
        },
    )
    adapter_roots: list[str] = field(
        default_factory=lambda: ["runs", "models"],
        metadata={
            "help": "Folders the admin API may load adapter folders from (POST /admin/adapters {'path': ...}); "
            "a path outside all of them, after resolving symlinks and '..', is refused with 403. Relative entries "
            "are under paths.home: 'runs' (where `tuneloop train` writes adapters) and 'models' (merged models). "
            "Registered versions ({'version': ...}) and --adapter at start-up are not limited by it."
        },
    )

    @property
    def replica_name(self) -> str:
        """``replica``, else ``$TUNELOOP_REPLICA``, else the host name."""
        import socket

        return self.replica or os.environ.get("TUNELOOP_REPLICA") or socket.gethostname() or "replica"

    @property
    def local_api_url(self) -> str:
        """This machine's server's OpenAI base URL (``http://HOST:PORT/v1``; a wildcard bind address is reached
        on loopback)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}/v1"


@dataclass
class LogSettings:
    enabled: bool = field(default=True, metadata={"help": "Write every request to the request log."})
    flush_interval_s: float = field(
        default=1.0, metadata={"help": "Longest time a row waits in memory before it is written."}
    )
    flush_rows: int = field(default=1000, metadata={"help": "Flush as soon as this many rows are queued."})
    hold_s: float = field(
        default=10.0,
        metadata={
            "help": "Under steady traffic keep the database open between flushes for up to this long at a time (saves an open and a checkpoint per flush); another tuneloop process that needs the file gets it within one flush interval. 0 = open it for each flush."
        },
    )
    queue_max: int = field(
        default=100_000,
        metadata={
            "help": "Bounded queue size; when full, new rows are dropped and counted (tuneloop_log_rows_dropped_total)."
        },
    )
    redact_prompts: bool = field(
        default=False, metadata={"help": "Store no prompt/response text, only sizes and timings."}
    )
    scrub_pii: bool = field(
        default=False, metadata={"help": "Scrub emails, phones, card numbers and IPs from logged text."}
    )


@dataclass
class AuthSettings:
    require_keys: bool = field(
        default=False,
        metadata={
            "help": "Require a Bearer key on /v1 even when no key exists yet (keys are always required once one exists)."
        },
    )
    allow_open_admin: bool = field(
        default=False,
        metadata={
            "help": "Let `tuneloop serve` start on a non-loopback --host (0.0.0.0, a LAN address) while no admin key "
            "exists. Do not set it: create an admin key (`tuneloop keys create --scope admin`) instead. Without one "
            "the admin API is guarded only by the client address being loopback, so through a reverse proxy or "
            "tunnel on the server anyone who reaches the port can load adapters from server paths and change what "
            "is served."
        },
    )


@dataclass
class DriftSettings:
    interval_s: float = field(
        default=60.0, metadata={"help": "How often the server computes drift in the background (0 = off)."}
    )
    window: str = field(
        default="1h", metadata={"help": "Production window: a duration ('30m', '1h') or a request count ('500r')."}
    )
    min_requests: int = field(default=50, metadata={"help": "Skip drift for windows with fewer requests."})
    psi_threshold: float = field(
        default=0.2, metadata={"help": "PSI on prompt token length above which it is drifted."}
    )
    ks_pvalue: float = field(default=0.01, metadata={"help": "KS p-value below which prompt length is drifted."})
    js_threshold: float = field(
        default=0.1,
        metadata={"help": "Jensen-Shannon divergence (bits) of unigrams above which vocabulary is drifted."},
    )
    oov_threshold: float = field(
        default=0.1, metadata={"help": "Increase in out-of-vocabulary share above which it is drifted."}
    )
    embedding_pvalue: float = field(
        default=0.01, metadata={"help": "Permutation p-value of embedding MMD below which it is drifted."}
    )
    length_share_threshold: float = field(
        default=0.1, metadata={"help": "Increase in finish_reason=length share above which output is drifted."}
    )
    embedding_sample: int = field(default=256, metadata={"help": "Rows embedded per side for embedding drift."})
    word_sample: int = field(
        default=50_000,
        metadata={
            "help": "Most requests whose prompt words are counted for the vocabulary, OOV and new-word statistics; larger windows are sampled uniformly by request id (0 = count every request)."
        },
    )
    response_psi_threshold: float = field(
        default=0.2, metadata={"help": "PSI on response length (tokens) above which output length is drifted."}
    )
    empty_share_threshold: float = field(
        default=0.05, metadata={"help": "Increase in the share of empty responses above which output is drifted."}
    )
    negative_feedback_threshold: float = field(
        default=0.3, metadata={"help": "Share of rated requests rated negatively above which feedback is drifted."}
    )
    overall_threshold: float = field(
        default=0.2,
        metadata={
            "help": "Overall drift score (share of evaluated statistics that drifted) at or above which the version is drifted."
        },
    )
    psi_bins: int = field(default=10, metadata={"help": "Reference-quantile bins for PSI."})
    permutations: int = field(default=200, metadata={"help": "Permutations for the embedding MMD p-value."})
    vocab_size: int = field(
        default=10000,
        metadata={"help": "Most frequent reference words kept in a profile; rarer words count as out-of-vocabulary."},
    )
    embeddings: bool = field(
        default=True, metadata={"help": "Compute embedding drift (loads all-MiniLM-L6-v2 on CPU)."}
    )


@dataclass
class DeploySettings:
    canary_share: float = field(default=0.1, metadata={"help": "Share of 'production' traffic sent to the canary."})
    canary_min_requests: int = field(
        default=100,
        metadata={
            "help": "Requests on the canary before it can be promoted (a clearly worse canary is rolled back sooner)."
        },
    )
    canary_max_requests: int = field(
        default=2000,
        metadata={
            "help": "Traffic budget: once the canary has this many requests it is promoted if it is non-inferior on every "
            "metric, else rolled back (0 = only canary_max_minutes ends it)."
        },
    )
    canary_max_minutes: float = field(
        default=30.0,
        metadata={"help": "Time budget: after this long the canary is decided as at the traffic budget."},
    )
    canary_alpha: float = field(
        default=0.05,
        metadata={
            "help": "Error rate of the canary's sequential test: the chance that a canary worse than a margin is "
            "promoted, or one that is not is rolled back, however often it is judged (split over the metrics)."
        },
    )
    canary_max_error_rate_delta: float = field(
        default=0.02,
        metadata={"help": "Non-inferiority margin: the canary's error rate may exceed production's by at most this."},
    )
    canary_max_latency_ratio: float = field(
        default=1.5,
        metadata={
            "help": "Non-inferiority margin: the canary's geometric-mean time to first token of successful requests "
            "may be at most this times production's (TTFT, not total latency, which grows with the answer's length)."
        },
    )
    canary_max_negative_feedback_delta: float = field(
        default=0.1,
        metadata={
            "help": "Non-inferiority margin of the primary metric: the canary's thumbs-down share of rated requests may "
            "exceed production's by at most this. A canary whose share is higher with confidence is rolled back at once; "
            "one whose share is lower with confidence is promoted early."
        },
    )
    eval_backend: str = field(
        default="vllm",
        metadata={
            "help": "Where the gate and `tuneloop eval` generate answers: 'vllm' (vLLM's offline engine, adapters as "
            "LoRA requests; versions vLLM cannot serve fall back to transformers) or 'transformers' (`generate`)."
        },
    )
    gate_metric: str = field(
        default="token_f1",
        metadata={"help": "Per-example metric the gate compares (token_f1, rouge_l, exact_match, neg_loss)."},
    )
    gate_min_delta: float = field(
        default=0.0,
        metadata={"help": "Lower bound of the paired-bootstrap CI of (candidate - production) must be >= -this."},
    )
    gate_per_task: bool = field(
        default=False,
        metadata={
            "help": "For a candidate trained on a multi-task mix (train datasets=a:0.7,b:0.3): also evaluate it and "
            "production on each input dataset's test split and refuse it when any task regresses (that task's "
            "paired-bootstrap CI lower bound of the gate_metric difference < -gate_task_min_delta). "
            "`deploy gate --per-task/--no-per-task` overrides it."
        },
    )
    gate_task_min_delta: float = field(
        default=0.0,
        metadata={
            "help": "Per-task gate margin: on each task's test split the lower bound of the paired-bootstrap CI of "
            "(candidate - production) must be >= -this."
        },
    )
    gate_max_forgetting: float = field(
        default=0.1, metadata={"help": "Largest relative increase in general-set perplexity allowed."}
    )
    gate_min_golden_pass: float = field(
        default=1.0,
        metadata={"help": "Share of golden prompts a candidate must pass (relative to production if lower)."},
    )
    loop_continue_training: bool = field(
        default=True,
        metadata={
            "help": "The loop trains a new version by continuing the production LoRA adapter (train init_adapter) "
            "rather than a fresh one on the base: it keeps what production learned, and replay guards the rest."
        },
    )
    gate_golden: str = field(
        default="",
        metadata={
            "help": "Golden-prompts file (YAML/JSONL, see `tuneloop eval --golden`) every gate checks; empty = none "
            "unless the command names one."
        },
    )
    gate_max_shift: float = field(
        default=2.0,
        metadata={
            "help": "Largest allowed increase (nats per token) in the mean negative log-likelihood of production's "
            "logged answers under the candidate vs under production: an estimate of how far the candidate moved "
            "from what production says (KL). Negative = no limit."
        },
    )
    gate_max_new_tokens: int = field(
        default=64, metadata={"help": "Longest answer (tokens) the gate generates per held-out example."}
    )
    gate_shift_responses: int = field(
        default=100, metadata={"help": "Most logged production answers the shift check scores (the latest first)."}
    )
    canary_judge_interval_s: float = field(
        default=10.0,
        metadata={
            "help": "How often the live server judges a running canary and promotes or rolls it back by itself (0 = only `tuneloop deploy canary --watch`)."
        },
    )
    bootstrap_samples: int = field(default=1000, metadata={"help": "Paired bootstrap resamples."})
    loop_train_method: Literal["sft", "auto", "dpo", "kto"] = field(
        default="sft",
        metadata={
            "help": "What `tuneloop loop` trains when no --train method= is given: sft (a LoRA on the sampled SFT set), "
            "dpo (on the preference pairs from corrections), kto (on thumbs-up/down) or auto (dpo with at least "
            "loop_min_pairs pairs, else kto with both thumbs-up and thumbs-down, else sft)."
        },
    )
    loop_min_pairs: int = field(
        default=8,
        metadata={
            "help": "auto: fewest preference pairs (corrections differing from the served response, in the sampled "
            "train split) for the loop to train DPO."
        },
    )


@dataclass
class UISettings:
    enabled: bool = field(default=True, metadata={"help": "Serve the web console under /ui on the server's port."})
    queue_rules: list[str] = field(
        default_factory=lambda: ["thumbs_down", "truncated", "drifted", "unreviewed"],
        metadata={
            "help": "What enters the annotation queue, in priority order: thumbs_down (a negative rating without a "
            "reviewer's review), truncated (the answer hit the token limit), drifted (least like the serving "
            "version's training prompts, ui.queue_drift_min and above), unreviewed (a random ui.queue_sample_share "
            "of requests nobody rated)."
        },
    )
    queue_window: str = field(
        default="7d", metadata={"help": "Only requests logged within this long ('24h', '7d') enter the queue."}
    )
    queue_sample_share: float = field(
        default=0.1,
        metadata={"help": "Share (0..1) of unrated requests the 'unreviewed' rule samples (by request id hash)."},
    )
    queue_drift_min: float = field(
        default=0.6,
        metadata={
            "help": "The 'drifted' rule's bar: 1 - the best cosine similarity (hashed bag of words) of a request's "
            "prompt to its version's training prompts."
        },
    )
    queue_batch: int = field(
        default=10, metadata={"help": "Items assigned to a reviewer at a time (more when those are done)."}
    )
    page_size: int = field(default=50, metadata={"help": "Rows per page on the traffic and dataset pages."})
    session_max_age_s: int = field(
        default=8 * 3600, metadata={"help": "A console sign-in lasts this long (seconds) without activity."}
    )
    secret: str = field(
        default="",
        metadata={
            "help": "Secret that signs the console's CSRF tokens. Empty (default): a random one created once per "
            "database and shared by every replica of it."
        },
    )


@dataclass
class Settings:
    paths: PathSettings = field(default_factory=PathSettings, metadata={"help": "Where things live."})
    database: DatabaseSettings = field(
        default_factory=DatabaseSettings, metadata={"help": "The system of record: embedded DuckDB or PostgreSQL."}
    )
    engine: EngineSettings = field(default_factory=EngineSettings, metadata={"help": "vLLM engine arguments."})
    server: ServerSettings = field(default_factory=ServerSettings, metadata={"help": "HTTP server."})
    log: LogSettings = field(default_factory=LogSettings, metadata={"help": "Request log writer."})
    auth: AuthSettings = field(default_factory=AuthSettings, metadata={"help": "API keys."})
    drift: DriftSettings = field(default_factory=DriftSettings, metadata={"help": "Drift monitoring."})
    deploy: DeploySettings = field(default_factory=DeploySettings, metadata={"help": "Gates and canaries."})
    ui: UISettings = field(default_factory=UISettings, metadata={"help": "The web console (/ui)."})


# TUNELOOP_* environment variables that are not settings keys (every other TUNELOOP_* name must be
# TUNELOOP_<SECTION>__<KEY> naming a settings key, else load_settings fails listing the valid ones).
OTHER_ENV = frozenset(
    {
        "TUNELOOP_HOME",  # paths.home default
        "TUNELOOP_CONFIG",  # the settings YAML
        "TUNELOOP_MODEL_CACHE",  # paths.models default
        "TUNELOOP_REPLICA",  # `tuneloop export logs` replica name
        "TUNELOOP_ACTOR",  # who is recorded in deploy events
        "TUNELOOP_KEY",  # client-side API key (docs, examples)
        "TUNELOOP_API_KEY",  # client-side API key (traffic generator, k8s secret)
        "TUNELOOP_ADMIN_KEY",  # client-side admin key (docs)
        "TUNELOOP_ACCELERATE_CONFIG",  # `tuneloop train --nproc` through accelerate launch
        "TUNELOOP_DIST_DB_SNAPSHOT",  # set by `tuneloop train --nproc` for its workers
        "TUNELOOP_DIST_SCRATCH",  # set by `tuneloop train --nproc` for its workers
    }
)


def config_file(explicit: str | None = None) -> str | None:
    """The config file in effect: ``explicit``, ``$TUNELOOP_CONFIG`` or ``./tuneloop.yaml``."""
    if explicit:
        return explicit
    if os.environ.get("TUNELOOP_CONFIG"):
        return os.environ["TUNELOOP_CONFIG"]
    return "tuneloop.yaml" if Path("tuneloop.yaml").is_file() else None


def load_settings(path: str | None = None, overrides: list[str] | None = None) -> Settings:
    """Settings from defaults < YAML < env < overrides (see module doc)."""
    return build(Settings, load_yaml(config_file(path)), overrides, env_prefix="TUNELOOP_", env_other=OTHER_ENV)
