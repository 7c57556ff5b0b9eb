"""Settings: one frozen object, built once from the environment and passed in.

This is the only module that reads ``os.environ``. Each setting is declared
once, as a field of :class:`Settings` made by :func:`setting`: its environment
variable (the field's name in capitals), type, default, parser (bounds,
choices) and meaning. The reading, the ``--help`` text and the README table
(:data:`ENVIRONMENT`) all come from those declarations. A bad environment
stops start-up with one :class:`ConfigError` listing every bad variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

from queue_worker.config_reader import Rule, environment, given, read, setting
from queue_worker.config_values import (
    Invalid,
    Tokens,
    boolean,
    choice,
    dns_name,
    host_port,
    http_url,
    http_urls,
    items,
    number,
    number_text,
    one_of,
    optional_text,
    origin_of,
    otlp_headers,
    per_executor,
    queue_urls,
    readable_file,
    redact_url,
    redis_url,
    shown,
    stream_prefix,
    text,
    token_file,
    tokens,
    url_and_value,
    userinfo,
    weighted_urls,
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


def _first_queue(url: str, given: str | None, settings: Settings) -> str:
    """``QUEUE_SERVICE_URL`` defaults to the first of ``QUEUE_SERVICE_URLS``."""
    if given is None and settings.queue_service_urls:
        return settings.queue_service_urls[0]
    return url


def _not_with_urls(name: str | None, given: str | None, settings: Settings) -> str | None:
    if name is not None and settings.executor_urls:
        raise Invalid("set EXECUTOR_URLS or EXECUTOR_DNS_NAME, not both")
    return name


def _at_least(other: str, times: float = 1.0) -> Rule[float]:
    """A given value must be at least ``times`` the setting ``other`` (a field name)."""
    named = other.upper() if times == 1 else f"{number_text(times)} times {other.upper()}"

    def apply(value: float, given: str | None, settings: Settings) -> float:
        least = times * getattr(settings, other)
        if given is not None and value < least:
            raise Invalid(f"expected at least {named} ({number_text(least)}), got {shown(given)}")
        return value

    return Rule((other,), apply)


def _eject_max(value: float, given: str | None, settings: Settings) -> float:
    """At least ``EJECT_BASE_S``, which also raises the default when it is larger."""
    if given is None:
        return max(value, settings.eject_base_s)
    return _at_least("eject_base_s").apply(value, given, settings)


def _per_client(value: int, given: str | None, settings: Settings) -> int:
    """At most ``STREAM_MAX_CLIENTS``; the default follows a smaller total."""
    if given is None:
        return min(value, settings.stream_max_clients)
    if value > settings.stream_max_clients:
        raise Invalid(
            f"expected at most STREAM_MAX_CLIENTS ({settings.stream_max_clients}), "
            f"got {shown(given)}"
        )
    return value


def _paired(other: str) -> Rule[str | None]:
    """A file setting given with the setting ``other`` (a field name), or neither."""

    def apply(value: str | None, given: str | None, settings: Settings) -> str | None:
        if value is not None and getattr(settings, other) is None:
            raise Invalid(f"set {other.upper()} too (both or neither)")
        if value is None and getattr(settings, other) is not None:
            raise Invalid(f"not set, but {other.upper()} is: set both or neither")
        return value

    return Rule((other,), apply)


def _rediss(value: str | None, given: str | None, settings: Settings) -> str | None:
    """A Redis TLS file only with a ``rediss://`` ``REDIS_URL``."""
    if value is not None and not settings.redis_url.startswith("rediss://"):
        raise Invalid("needs a rediss:// REDIS_URL (TLS)")
    return value


_TLS_URL: Rule[str | None] = Rule(("redis_url",), _rediss)


def _paired_tls(value: str | None, given: str | None, settings: Settings) -> str | None:
    return _rediss(_paired("redis_cert_file").apply(value, given, settings), given, settings)


N = TypeVar("N", int, float)

_EXECUTORS = ("executor_urls", "executor_count", "executor_base_url", "executor_port")


def _aligned(
    pairs: tuple[tuple[str, N], ...], given: str | None, settings: Settings
) -> tuple[tuple[str, N], ...]:
    """``EXECUTOR_CAPACITIES`` and ``EXECUTOR_WEIGHTS`` given as ``N,...``: one value per
    executor of the explicit or compose list, in its order."""
    if not pairs or pairs[0][0]:  # the default, or url=value pairs
        return pairs
    if settings.discovery == "dns":
        raise Invalid("executors found through EXECUTOR_DNS_NAME need url=value pairs")
    executors = settings.executor_endpoints()
    if len(pairs) != len(executors):
        raise Invalid(
            f"{len(pairs)} values for {len(executors)} executors; "
            "give one per executor or url=value pairs"
        )
    return tuple((url, value) for url, (_, value) in zip(executors, pairs, strict=True))


_ALIGNED: Rule[Any] = Rule((*_EXECUTORS, "executor_dns_name"), _aligned)


MAX_QUEUE_WAIT_S = 30.0  # the longest long poll asked of the queue
# Where the platform's API gateway announces a submission (just before it enqueues it).
DEFAULT_WAKE_CHANNEL: str | None = "evaluation:queued"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the worker needs to know, validated."""

    queue_service_url: str = setting(
        "http://queue:8081",
        http_url,
        "Queue Service base URL",
        rule=Rule(("queue_service_urls",), _first_queue),
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
        rule=_TLS_URL,
    )
    redis_cert_file: str | None = setting(
        None,
        readable_file,
        "PEM client certificate for rediss:// (mutual TLS)",
        rule=_TLS_URL,
    )
    redis_key_file: str | None = setting(
        None,
        readable_file,
        "PEM private key of REDIS_CERT_FILE (both or neither)",
        rule=Rule(("redis_cert_file", "redis_url"), _paired_tls),
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
        rule=_ALIGNED,
    )
    executor_weights: tuple[tuple[str, float], ...] = setting(
        (),
        per_executor(number(0, above=True)),
        "weights of the weighted strategy: url=W,... or W,...",
        shown="(the capacities)",
        rule=_ALIGNED,
    )
    learn_capacity: bool = setting(
        False, boolean, "take an executor's capacity from its GET /health answer"
    )
    executor_dns_name: str | None = setting(
        None,
        dns_name,
        "discover executors: every address of this name",
        rule=Rule(("executor_urls",), _not_with_urls),
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
        rule=Rule(("eject_base_s",), _eject_max),
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
        rule=_at_least("queue_backoff_step_s"),
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
        rule=_at_least("heartbeat_interval_s", 2),
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
        rule=_paired("tls_cert_file"),
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
        rule=Rule(("stream_max_clients",), _per_client),
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

    @property
    def worker_id(self) -> str:
        return self.hostname

    @property
    def traces_endpoint(self) -> str | None:
        """Where spans are exported; ``None``: tracing is off (no endpoint, or
        ``OTEL_SDK_DISABLED``). ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` as given, else
        ``OTEL_EXPORTER_OTLP_ENDPOINT`` with ``/v1/traces`` (the OTLP rule)."""
        if self.otel_sdk_disabled:
            return None
        if self.otel_exporter_otlp_traces_endpoint:
            return self.otel_exporter_otlp_traces_endpoint
        if self.otel_exporter_otlp_endpoint:
            return self.otel_exporter_otlp_endpoint.rstrip("/") + "/v1/traces"
        return None

    def executor_endpoints(self) -> tuple[str, ...]:
        """The executor base URLs: ``EXECUTOR_URLS`` or the compose naming."""
        if self.executor_urls:
            return self.executor_urls
        parts = urlsplit(self.executor_base_url)
        return tuple(
            urlunsplit(
                (
                    parts.scheme,
                    f"{parts.hostname}-{i}:{parts.port or self.executor_port}",
                    "",
                    "",
                    "",
                )
            )
            for i in range(1, self.executor_count + 1)
        )

    @property
    def discovery(self) -> Literal["dns", "list", "compose"]:
        """Where the executors come from: DNS, ``EXECUTOR_URLS`` or the compose naming."""
        if self.executor_dns_name:
            return "dns"
        return "list" if self.executor_urls else "compose"

    def queue_urls(self) -> tuple[str, ...]:
        """The queues in priority order: ``QUEUE_SERVICE_URLS``, else ``QUEUE_SERVICE_URL``."""
        return self.queue_service_urls or (self.queue_service_url,)

    def capacity_of(self, url: str) -> int:
        """An executor's capacity: ``EXECUTOR_CAPACITIES`` for it, else ``EXECUTOR_CAPACITY``."""
        return dict(self.executor_capacities).get(url, self.executor_capacity)

    def redacted_redis_url(self) -> str:
        return redact_url(self.redis_url)

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build the settings from ``env`` (default: ``os.environ``); raise ConfigError
        naming every bad variable."""
        env = os.environ if env is None else env
        return _with_derived(read(cls, env), env)


def _with_derived(settings: Settings, env: Mapping[str, str]) -> Settings:
    """The settings that come of others: the credentials taken out of the queue and
    executor URLs, and the queues' weights."""
    credentials: dict[str, tuple[str, str]] = {}  # origin -> (user, password); the last wins
    executors, queues = given(env, "EXECUTOR_URLS"), given(env, "QUEUE_SERVICE_URLS")
    urls = [
        *(items(executors) if executors else ()),
        *(url_and_value(item)[0] for item in (items(queues) if queues else ())),
        given(env, "QUEUE_SERVICE_URL"),
    ]
    for url in urls:
        if url is not None and (found := userinfo(url)) is not None:
            credentials[found[0]] = found[1:]
    base = userinfo(given(env, "EXECUTOR_BASE_URL") or settings.executor_base_url)
    if base is not None and not settings.executor_urls:  # every compose-named executor
        for url in settings.executor_endpoints():
            credentials[origin_of(url)] = base[1:]
    weighted = weighted_urls(queues) if queues else ()
    return settings.with_(
        credentials=tuple((o, u, p) for o, (u, p) in sorted(credentials.items())),
        queue_weights=(
            tuple(1.0 if weight is None else weight for _, weight in weighted)
            if any(weight is not None for _, weight in weighted)
            else ()
        ),
    )


# (variable, default, meaning) for --help and the README, from the declarations.
ENVIRONMENT: tuple[tuple[str, str, str], ...] = environment(Settings)
