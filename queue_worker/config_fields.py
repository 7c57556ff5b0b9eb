"""Every setting, declared once: the fields of :class:`~queue_worker.config.Settings`.

Each field, made by :func:`~queue_worker.config_reader.setting`, names its
environment variable (the field's name in capitals), type, default, parser
(bounds, choices), meaning and the rule relating it to others
(:mod:`queue_worker.config_rules`). The order here is the order of ``--help`` and
of the README's settings table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from queue_worker.config_reader import Rule, setting
from queue_worker.config_rules import (
    ALIGNED,
    TLS_URL,
    at_least,
    eject_max,
    first_queue,
    not_with_urls,
    paired,
    paired_tls,
    per_client,
)
from queue_worker.config_values import (
    Tokens,
    boolean,
    choice,
    dns_name,
    host_port,
    http_url,
    http_urls,
    number,
    one_of,
    optional_text,
    otlp_headers,
    per_executor,
    queue_urls,
    readable_file,
    redis_url,
    stream_prefix,
    text,
    token_file,
    tokens,
    whole,
)

Strategy = Literal["least_loaded", "round_robin", "random", "weighted", "sticky"]
STRATEGIES: tuple[Strategy, ...] = ("least_loaded", "round_robin", "random", "weighted", "sticky")
LogFormat = Literal["json", "console"]
LOG_FORMATS: tuple[LogFormat, ...] = ("json", "console")
RecoveryPolicy = Literal["redispatch", "fail"]
RECOVERY_POLICIES: tuple[RecoveryPolicy, ...] = ("redispatch", "fail")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
OtlpCompression = Literal["none", "gzip"]
OTLP_COMPRESSIONS: tuple[OtlpCompression, ...] = ("none", "gzip")
MAX_QUEUE_WAIT_S = 30.0  # the longest long poll asked of the queue
# Where the platform's API gateway announces a submission (just before it enqueues it).
DEFAULT_WAKE_CHANNEL: str | None = "evaluation:queued"


@dataclass(frozen=True, slots=True)
class SettingsFields:
    """The declared settings; :class:`~queue_worker.config.Settings` adds what they mean
    together."""

    queue_service_url: str = setting(
        "http://queue:8081",
        http_url,
        "Queue Service base URL",
        rule=Rule(("queue_service_urls",), first_queue),
    )
    queue_api_key: str | None = setting(
        None, text, "sent as X-API-Key to the queue; never logged", secret=True
    )
    # HTTP Basic credentials given in the queue and executor URLs: (origin, user, password).
    # The URLs themselves are kept without them, so they never show.
    credentials: tuple[tuple[str, str, str], ...] = field(default=(), repr=False)
    redis_url: str = setting(
        "redis://redis:6379", redis_url, "Redis holding the event stream", secret=True
    )
    redis_ca_file: str | None = setting(
        None,
        readable_file,
        "PEM CA certificates that verify a rediss:// server",
        shown="(the system's)",
        rule=TLS_URL,
    )
    redis_cert_file: str | None = setting(
        None,
        readable_file,
        "PEM client certificate for rediss:// (mutual TLS)",
        rule=TLS_URL,
    )
    redis_key_file: str | None = setting(
        None,
        readable_file,
        "PEM private key of REDIS_CERT_FILE (both or neither)",
        rule=Rule(("redis_cert_file", "redis_url"), paired_tls),
    )
    executor_count: int = setting(3, whole(1, 1000), "executors named <base>-1..N (compose naming)")
    executor_base_url: str = setting("http://executor", http_url, "base of the compose naming")
    executor_port: int = setting(
        8083, whole(1, 65535), "port of the compose naming when the base has none"
    )
    executor_urls: tuple[str, ...] = setting(
        (), http_urls, "comma list of executor URLs; overrides the naming"
    )
    executor_capacity: int = setting(1, whole(1, 10_000), "concurrent tasks per executor")
    pull_ahead: int = setting(
        1,
        whole(0, 10_000),
        "tasks pulled beyond free capacity, to wait for the next free slot; 0: none",
    )
    executor_capacities: tuple[tuple[str, int], ...] = setting(
        (),
        per_executor(whole(1)),
        "per-executor capacity: url=N,... or N,... aligned with the executors",
        rule=ALIGNED,
    )
    executor_weights: tuple[tuple[str, float], ...] = setting(
        (),
        per_executor(number(0, above=True)),
        "weights of the weighted strategy: url=W,... or W,...",
        shown="(the capacities)",
        rule=ALIGNED,
    )
    learn_capacity: bool = setting(
        False, boolean, "take an executor's capacity from its GET /health answer"
    )
    executor_dns_name: str | None = setting(
        None,
        dns_name,
        "discover executors: every address of this name",
        rule=Rule(("executor_urls",), not_with_urls),
    )
    executor_dns_server: tuple[str, int] | None = setting(
        None, host_port, "host:port of a DNS server to ask", shown="(the system's)"
    )
    discovery_interval_s: float = setting(
        30.0, number(0.01), "how often EXECUTOR_DNS_NAME is resolved again"
    )
    queue_service_urls: tuple[str, ...] = setting(
        (),
        queue_urls,
        "several queues, highest priority first; url=W,... shares pulls by weight",
    )
    queue_weights: tuple[float, ...] = ()  # from QUEUE_SERVICE_URLS, when it gives weights
    hostname: str = setting("queue-worker-1", text, "worker id written on every event")
    host: str = setting("0.0.0.0", text, "address the HTTP API listens on")
    port: int = setting(8084, whole(0, 65535), "HTTP API port (`run --port` wins)")
    api_token: Tokens = setting(
        (),
        tokens,
        "read tokens of the HTTP API: [name:]token,... (Authorization: Bearer)",
        secret=True,
    )
    api_token_file: Tokens = setting(
        (), token_file, "a file holding more read tokens (a mounted Secret)", secret=True
    )
    admin_token: Tokens = setting(
        (), tokens, "admin tokens: [name:]token,...; they read too, with full payloads", secret=True
    )
    admin_token_file: Tokens = setting(
        (), token_file, "a file holding more admin tokens (a mounted Secret)", secret=True
    )
    auth_disabled: bool = setting(
        False, boolean, "no token needed to read, from anywhere (a warning at start)"
    )
    metrics_public: bool = setting(False, boolean, "GET /metrics needs no token (for scrapers)")
    routing_strategy: Strategy = setting("least_loaded", choice(STRATEGIES), one_of(STRATEGIES))
    poll_interval_s: float = setting(
        1.0,
        number(0.001),
        "longest wait after empty polls (they back off from 5 ms up to this)",
    )
    queue_wait_s: float = setting(
        1.0,
        number(0, most=MAX_QUEUE_WAIT_S),
        "long poll asked of the queue after an empty poll (?wait_s=); 0 asks none",
    )
    wake_channel: str | None = setting(
        DEFAULT_WAKE_CHANNEL,
        optional_text,
        "pub/sub channel announcing submissions: poll at once on a message; empty: none",
        blank=True,
    )
    health_interval_s: float = setting(5.0, number(0.01), "period of the background health checks")
    health_timeout_s: float = setting(2.0, number(0.01), "timeout of one GET /health")
    health_stale_s: float = setting(
        10.0, number(), "a check older than this is redone before routing"
    )
    healthy_threshold: int = setting(
        1, whole(1, 100), "passed checks in a row that make an executor healthy"
    )
    unhealthy_threshold: int = setting(
        1, whole(1, 100), "failed checks in a row that make an executor unhealthy"
    )
    eject_after_failures: int = setting(
        5,
        whole(0, 10_000),
        "retryable dispatch failures in a row that eject an executor; 0 never ejects",
    )
    eject_base_s: float = setting(
        30.0, number(0.001), "first ejection time; doubles with each repeated ejection"
    )
    eject_max_s: float = setting(
        300.0,
        number(0.001),
        "longest ejection time",
        rule=Rule(("eject_base_s",), eject_max),
    )
    executor_rate_limit: float = setting(
        0.0,
        number(0),
        "tasks per second sent to each executor by the whole fleet (paced in Redis); 0: no limit",
    )
    max_ejection_percent: float = setting(
        10.0,
        number(0, most=100),
        "never eject more than this share of the executors (at least one); 0 never ejects",
    )
    panic_threshold: float = setting(
        0.0,
        number(0, most=100),
        "below this percent of healthy executors, route across all of them; 0: never",
    )
    slow_start_s: float = setting(
        0.0,
        number(0, most=3600),
        "an executor turning healthy, rejoining or added takes a share ramping up over this",
    )
    dispatch_margin_s: float = setting(
        10.0, number(), "HTTP timeout of /execute = task timeout + this"
    )
    default_task_timeout_s: float = setting(
        30.0, number(0.001), "timeout for a task that names none"
    )
    queue_timeout_s: float = setting(10.0, number(0.01), "HTTP timeout of calls to the queue")
    queue_backoff_step_s: float = setting(
        5.0, number(), "queue unreachable: wait step, 2*step, ... up to max"
    )
    queue_backoff_max_s: float = setting(
        30.0,
        number(),
        "longest wait between pull attempts",
        rule=at_least("queue_backoff_step_s"),
    )
    report_backoff_max_s: float = setting(30.0, number(0.01), "longest wait between report retries")
    shutdown_grace_s: float = setting(
        30.0, number(), "on SIGTERM, how long in-flight tasks may finish"
    )
    max_attempts: int = setting(
        3, whole(1, 100), "tries of a task on retryable failures (a different executor each)"
    )
    retry_base_ms: int = setting(
        200, whole(0), "retry backoff: full jitter up to base * 2^(attempt-1)"
    )
    retry_max_ms: int = setting(5000, whole(0), "retry backoff cap")
    retry_budget_percent: float = setting(
        20.0,
        number(0, most=100),
        "retries allowed as a share of the fleet's dispatches over 10 s; 100: no budget",
    )
    retry_budget_min: int = setting(
        3, whole(0), "retries the budget allows over 10 s however few the dispatches"
    )
    priority_aging_s: float = setting(
        30.0,
        number(0),
        "a task waiting for a slot gains one priority level per this many seconds; 0: none",
    )
    task_deadline_s: float = setting(
        0.0,
        number(),
        "a task not dispatched within this of its pull fails (deadline_exceeded); 0: none",
    )
    recovery_policy: RecoveryPolicy = setting(
        "redispatch",
        choice(RECOVERY_POLICIES),
        f"unfinished tasks found at start-up: {one_of(RECOVERY_POLICIES)}",
    )
    queue_lease_s: float = setting(
        60.0, number(), "lease asked of the queue (?lease_s=); 0 asks none"
    )
    max_deliveries: int = setting(
        5, whole(1), "a projector entry delivered more often is dead-lettered"
    )
    claim_idle_ms: int = setting(
        30_000, whole(10), "pending entries idle this long are taken over (XAUTOCLAIM)"
    )
    max_code_bytes: int = setting(1 << 20, whole(1), "larger task code is rejected")
    max_output_bytes: int = setting(
        64 << 10, whole(256), "executor output kept in the stream (the queue gets it all)"
    )
    max_response_bytes: int = setting(
        16 << 20,
        whole(64 << 10),
        "largest executor answer read; a larger one fails the task (too_large)",
    )
    publish_max_bytes: int = setting(
        1 << 20,
        whole(64 << 10),
        "largest pub/sub message; a larger result is cut to fit, with result_key",
    )
    stream_maxlen: int = setting(
        1_000_000, whole(0), "approximate stream length kept; 0 never trims"
    )
    retention_interval_s: float = setting(30.0, number(0.01), "how often the stream is trimmed")
    checkpoint_every: int = setting(
        10_000,
        whole(0),
        "save the status view every this many entries: a start folds only what follows; 0: never",
    )
    event_buffer_max: int = setting(
        10_000, whole(1), "events held in memory while Redis is unreachable"
    )
    shared_capacity: bool = setting(
        False, boolean, "replicas lease executor slots in Redis (capacity shared)"
    )
    takeover_interval_s: float = setting(
        5.0, number(0.05), "how often a replica looks for dead peers to take over"
    )
    heartbeat_interval_s: float = setting(
        2.0, number(0.05), "how often a worker refreshes its liveness key"
    )
    dead_after_s: float = setting(
        10.0,
        number(),
        "a worker whose liveness key is this old is dead (its TTL)",
        rule=at_least("heartbeat_interval_s", 2),
    )
    stream_prefix: str = setting(
        "queue-worker", stream_prefix, "stream keys are {<prefix>}:events and {<prefix>}:outcomes"
    )
    projector_block_ms: int = setting(
        1000, whole(1, 60_000), "how long a projector blocks on an empty stream"
    )
    projector_batch: int = setting(256, whole(1, 10_000), "entries a projector reads at once")
    tls_cert_file: str | None = setting(
        None, readable_file, "PEM certificate (chain) of the HTTP API: serve HTTPS"
    )
    tls_key_file: str | None = setting(
        None,
        readable_file,
        "PEM private key of TLS_CERT_FILE (both or neither)",
        rule=paired("tls_cert_file"),
    )
    http_max_body_bytes: int = setting(
        64 << 10,
        whole(1024, 1 << 30),
        "largest request body the HTTP API takes; a larger one gets 413",
    )
    stream_max_clients: int = setting(
        32, whole(1, 100_000), "live event streams (GET /events/stream) served at once, in all"
    )
    stream_max_per_client: int = setting(
        4,
        whole(1, 100_000),
        "live event streams served at once to one client address",
        rule=Rule(("stream_max_clients",), per_client),
    )
    otel_exporter_otlp_endpoint: str | None = setting(
        None,
        http_url,
        "OTLP/HTTP base URL (spans go to <url>/v1/traces); set, it turns tracing on",
        shown="(tracing off)",
    )
    otel_exporter_otlp_traces_endpoint: str | None = setting(
        None,
        http_url,
        "OTLP/HTTP URL the spans are posted to, as given (wins over the base URL)",
        shown="(tracing off)",
    )
    otel_exporter_otlp_headers: tuple[tuple[str, str], ...] = setting(
        (), otlp_headers, "headers of every export: name=value,... (percent-encoded values)",
        shown="(none)", secret=True,
    )  # fmt: skip
    otel_exporter_otlp_timeout: int = setting(
        10_000, whole(1, 600_000), "ms an export may take (retries included)"
    )
    otel_exporter_otlp_compression: OtlpCompression = setting(
        "none", choice(OTLP_COMPRESSIONS), one_of(OTLP_COMPRESSIONS)
    )
    otel_service_name: str = setting("queue-worker", text, "service.name of the exported spans")
    otel_sdk_disabled: bool = setting(
        False, boolean, "no spans are exported even with an endpoint (tracing off)"
    )
    log_level: str = setting("INFO", choice(LOG_LEVELS), one_of(LOG_LEVELS))
    log_format: LogFormat = setting("json", choice(LOG_FORMATS), one_of(LOG_FORMATS))
