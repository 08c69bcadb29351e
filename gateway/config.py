"""Gateway settings, read from the environment (prefix `GATEWAY_`) by pydantic-settings."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REGISTRY = Path(__file__).with_name("default_registry.yaml")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    # Server processes (uvicorn workers). More than one needs redis_url: limits, usage and
    # the registry are then shared by the processes as by gateway replicas.
    workers: int = 1
    # The registry of accounts, keys, models and deployments (embedded YAML backend).
    registry_path: Path = DEFAULT_REGISTRY
    # Optional separate file of API keys (`{account_id: [sha256:...]}`), e.g. a mounted
    # Kubernetes Secret, merged into the registry's accounts.
    keys_path: Path | None = None
    # Shared state for several gateway replicas (registry, limits, usage); None runs on the
    # YAML registry and in-process state.
    redis_url: str | None = None
    # A second Redis for the bulk data (usage records, stored responses), so that it can
    # never fill the registry's and limits' memory (docs/operations.md, "Redis"); None:
    # everything in redis_url's.
    redis_bulk_url: str | None = None
    # Redis' password (AUTH) for both, or a file holding it (the chart mounts its Secret);
    # a password in a URL itself wins.
    redis_password: str | None = None
    redis_password_file: Path | None = None
    redis_prefix: str = "fwgw:"
    # How often each gateway looks for registry changes in Redis (seconds).
    registry_poll_interval: float = 0.25
    # Accounts whose deployments every account may use.
    public_accounts: list[str] = ["fireworks"]
    # The admin API's key, or a file holding it (the chart mounts its Secret); None disables
    # the admin API. /metrics also takes the metrics key, which opens nothing else (what
    # Prometheus holds).
    admin_key: str | None = None
    admin_key_file: Path | None = None
    metrics_key: str | None = None
    metrics_key_file: Path | None = None
    # Active health checks of every replica (seconds; 0 turns them off), and passive
    # ejection after this many consecutive failures.
    health_check_interval: float = 1.0
    health_check_timeout: float = 2.0
    eject_after_failures: int = 2
    # Replicas named dns+http://<name>:<port> (e.g. a headless Service) are every address of
    # the name, resolved again every discovery_interval seconds, through dns_server
    # ("host:port") or the system's resolver when unset.
    discovery_interval: float = 1.0
    dns_server: str | None = None
    # An ejected replica gets one trial request this many seconds after its ejection (how
    # it comes back when active checks are off or cannot reach it).
    ejection_seconds: float = 30.0
    # At most this share of a deployment's replicas is ejected at once (the replicas
    # ejected last stay in rotation); with every replica ejected, requests go to all.
    max_ejection_percent: int = Field(default=50, ge=0, le=100)
    # The gateway's queue (dataplane/queue.py): a replica whose load (requests running +
    # waiting, as its worker reports them) reaches queue_replica_load is saturated (0: no
    # queue; per deployment in the registry). Set it to the workers' --max-num-seqs, past
    # which vLLM queues requests in arrival order. A request waits at most queue_timeout
    # seconds, a deployment's queue holds at most queue_max_length requests.
    queue_replica_load: int = Field(default=256, ge=0)
    # Per replica, past queue_replica_load, for requests of accounts with nothing waiting.
    queue_reserve: int = Field(default=0, ge=0)
    queue_timeout: float = Field(default=30.0, gt=0)
    queue_max_length: int = Field(default=1000, ge=0)
    # Batch inference (gateway/batch/, docs/batch.md). Its lines take only the room past
    # batch_headroom requests per replica (kept for interactive ones, of queue_replica_load);
    # each gateway runs at most batch_concurrency lines at once.
    batch_headroom: int = Field(default=8, ge=0)
    batch_concurrency: int = Field(default=32, ge=1)
    # Where files live (a volume every gateway replica mounts: the chart's
    # PersistentVolumeClaim); None: in a directory of the system's temporary one.
    batch_dir: Path | None = None
    # The largest file, and what one account may keep in all (bytes); the most lines in one
    # file, and the most jobs one account may have running.
    batch_file_max_bytes: int = Field(default=100 << 20, gt=0)
    batch_account_max_bytes: int = Field(default=1 << 30, gt=0)
    batch_file_max_lines: int = Field(default=50_000, gt=0)
    batch_account_max_jobs: int = Field(default=16, gt=0)
    # A line a gateway took and has not confirmed for this many seconds (the gateway died)
    # is taken by another; each gateway confirms the lines it runs well within it.
    batch_claim_timeout: float = Field(default=60.0, gt=0)
    # Lines that share this many leading characters of their prompt run together, the first
    # one alone before the others (so the others find its prefix cached); 0: each line alone,
    # in the file's order.
    batch_prefix_chars: int = Field(default=512, ge=0)
    # How long stored responses (the Responses API's `store: true`) are kept, in seconds
    # (30 days): in Redis with redis_url, else in process (at most 10,000).
    responses_ttl: float = Field(default=30 * 86400, gt=0)
    # What one account may store: a stored response's size (encoded: its conversation and
    # output; a larger one is not stored), and how many it keeps and their bytes (its
    # oldest dropped).
    responses_max_bytes: int = Field(default=1 << 20, gt=0)
    responses_per_account: int = Field(default=1000, gt=0)
    responses_account_bytes: int = Field(default=64 << 20, gt=0)
    # The usage stream in Redis keeps about this many records (the oldest trimmed); each
    # record's idempotency marker (exactly-once across retries) lives this many seconds.
    usage_stream_max_length: int = Field(default=10_000_000, gt=0)
    usage_marker_ttl: int = Field(default=3600, gt=0)
    # How often each gateway reads Redis' memory (used, bound, evicted keys) into its metrics.
    redis_memory_interval: float = Field(default=15.0, gt=0)
    # Read each replica's load from its worker's /metrics in the health checks (every
    # gateway then sees the requests of all of them).
    load_from_workers: bool = True
    # Requests without an affinity key get one from the first this-many bytes of their
    # prompt's stable head (dataplane/affinity.py); 0 turns that off.
    prefix_affinity_bytes: int = 4096
    # A keyed request leaves its preferred replica when that one has this many more requests
    # in flight than the least loaded.
    affinity_max_imbalance: int = 4
    # Unknown request fields: 400 (strict, Fireworks' behaviour) or ignored (lenient).
    strict_validation: bool = True
    # Fireworks historically returns the matched stop sequence inside the text.
    stop_include_in_output: bool = True
    # Routing on the workers' KV caches tokenizes a text prompt on a worker first: at most
    # this many seconds, after which the request routes on its prefix hash instead.
    kv_tokenize_timeout: float = Field(default=0.5, gt=0)
    # A stream whose worker fails after its first token goes on on another replica this many
    # times at most (dataplane/request.py, migrate; 0: never).
    stream_migrations: int = Field(default=2, ge=0)
    # A replica drained through the admin API keeps its streams this many seconds; then those
    # that can go on elsewhere move.
    drain_seconds: float = Field(default=60.0, ge=0)
    # Seconds to wait for a worker to connect, and for each read from it.
    upstream_connect_timeout: float = 5.0
    upstream_read_timeout: float = 600.0
    # Workers reached over https are verified against the system's CAs, or against the
    # certificates in this PEM file when set (e.g. a cluster's own CA).
    upstream_ca_file: Path | None = None
    # The workers' key (engine_plugins/worker_auth.py), or a file holding it (the chart's
    # Secret), sent on every request to them; None: the workers take requests without one.
    worker_api_key: str | None = None
    worker_api_key_file: Path | None = None
    # repetition_penalty through vLLM's native field instead of the engine plugin.
    repetition_penalty_native: bool = False
    log_level: str = "info"
    # The edge (docs/operations.md, "Limits at the edge"): the largest request body (bytes)
    # and the most seconds for it to arrive after the headers; the most seconds for a
    # request's headers to arrive and their largest size; how long an idle keep-alive
    # connection stays open; how many connections one server process holds.
    max_body_bytes: int = 32 << 20
    # The most sequences one request may ask the workers for (prompts x n, embedding
    # inputs, documents): OpenAI's bound on the inputs of one embeddings request.
    max_sequences: int = Field(default=2048, ge=1)
    body_timeout: float = 60.0
    header_timeout: float = 10.0
    max_header_bytes: int = 32 << 10
    keep_alive_timeout: int = 5
    # Seconds a reply's write may wait for the client to read; past it the request ends as
    # aborted (its worker request, replica and slot freed), as if the client had left.
    # Below queue_timeout, so that requests queued behind an unread stream get its replica.
    client_write_timeout: float = Field(default=5.0, gt=0)
    max_connections: int = 4096

    @model_validator(mode="after")
    def _keys_from_files(self) -> Settings:
        """Keys and passwords given as files (mounted Secrets) are read once, at start."""
        for name in ("admin_key", "metrics_key", "redis_password", "worker_api_key"):
            path: Path | None = getattr(self, f"{name}_file")
            if path is not None:
                key = path.read_text().strip()
                if not key:
                    raise ValueError(f"{path} holds no key")
                setattr(self, name, key)
        return self
