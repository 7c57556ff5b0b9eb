"""Settings: one frozen object, built once from the environment and passed in.

This is the only module that reads ``os.environ``. Every invalid value stops
start-up with a :class:`ConfigError` naming the variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

from queue_worker.errors import ConfigError

Strategy = Literal["least_loaded", "round_robin", "random", "weighted", "sticky"]
STRATEGIES: tuple[Strategy, ...] = ("least_loaded", "round_robin", "random", "weighted", "sticky")
LogFormat = Literal["json", "console"]
RecoveryPolicy = Literal["redispatch", "fail"]
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

T = TypeVar("T")
N = TypeVar("N", int, float)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the worker needs to know, validated."""

    queue_service_url: str = "http://queue:8081"
    queue_api_key: str | None = field(default=None, repr=False)
    redis_url: str = field(default="redis://redis:6379", repr=False)
    executor_count: int = 3
    executor_base_url: str = "http://executor"
    executor_port: int = 8083
    executor_urls: tuple[str, ...] = ()
    executor_capacity: int = 1
    pull_ahead: int = 1
    executor_capacities: tuple[tuple[str, int], ...] = ()
    executor_weights: tuple[tuple[str, float], ...] = ()
    learn_capacity: bool = False
    executor_dns_name: str | None = None
    executor_dns_server: tuple[str, int] | None = None
    discovery_interval_s: float = 30.0
    queue_service_urls: tuple[str, ...] = ()
    queue_weights: tuple[float, ...] = ()
    hostname: str = "queue-worker-1"
    host: str = "0.0.0.0"
    port: int = 8084
    routing_strategy: Strategy = "least_loaded"
    poll_interval_s: float = 1.0
    health_interval_s: float = 5.0
    health_timeout_s: float = 2.0
    health_stale_s: float = 10.0
    healthy_threshold: int = 1
    unhealthy_threshold: int = 1
    eject_after_failures: int = 5
    eject_base_s: float = 30.0
    eject_max_s: float = 300.0
    dispatch_margin_s: float = 10.0
    default_task_timeout_s: float = 30.0
    queue_timeout_s: float = 10.0
    queue_backoff_step_s: float = 5.0
    queue_backoff_max_s: float = 30.0
    report_backoff_max_s: float = 30.0
    shutdown_grace_s: float = 30.0
    max_attempts: int = 3
    retry_base_ms: int = 200
    retry_max_ms: int = 5000
    recovery_policy: RecoveryPolicy = "redispatch"
    queue_lease_s: float = 60.0
    max_deliveries: int = 5
    claim_idle_ms: int = 30_000
    max_code_bytes: int = 1 << 20
    max_output_bytes: int = 64 << 10
    stream_maxlen: int = 1_000_000
    retention_interval_s: float = 30.0
    event_buffer_max: int = 10_000
    shared_capacity: bool = False
    takeover_interval_s: float = 5.0
    heartbeat_interval_s: float = 2.0
    dead_after_s: float = 10.0
    stream_prefix: str = "queue-worker"
    projector_block_ms: int = 1000
    projector_batch: int = 256
    log_level: str = "INFO"
    log_format: LogFormat = "json"

    @property
    def worker_id(self) -> str:
        return self.hostname

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
        """Build the settings from ``env`` (default: ``os.environ``); raise ConfigError."""
        return _Reader(os.environ if env is None else env).settings()


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _http_url(variable: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(variable, f"expected an http(s) URL with a host, got {value!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(variable, f"bad port in {value!r}") from exc
    return value.rstrip("/")


def _items(variable: str, text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ConfigError(variable, "lists nothing")
    return items


def _url_and_value(variable: str, item: str) -> tuple[str, str | None]:
    """``url=value`` (the value after the last ``=``), or ``url`` alone."""
    url, sep, value = item.rpartition("=")
    if not sep:
        return _http_url(variable, item), None
    return _http_url(variable, url.strip()), value.strip()


def _positive(variable: str, text: str, kind: Callable[[str], N]) -> N:
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(variable, f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise ConfigError(variable, f"expected a positive number, got {text!r}")
    return value


def _per_executor(
    variable: str, text: str, executors: tuple[str, ...], kind: Callable[[str], N]
) -> tuple[tuple[str, N], ...]:
    """``url=value,...`` or values aligned with ``executors`` (the explicit or compose list)."""
    items = _items(variable, text)
    if all("=" not in item for item in items):
        if len(items) != len(executors):
            raise ConfigError(
                variable,
                f"{len(items)} values for {len(executors)} executors; "
                "give one per executor or url=value pairs",
            )
        return tuple(
            (url, _positive(variable, v, kind)) for url, v in zip(executors, items, strict=True)
        )
    pairs: list[tuple[str, N]] = []
    for item in items:
        url, value = _url_and_value(variable, item)
        if value is None:
            raise ConfigError(variable, f"expected url=value, got {item!r}")
        pairs.append((url, _positive(variable, value, kind)))
    return tuple(pairs)


def _host_port(variable: str, text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``."""
    parts = urlsplit(f"//{text}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None or parts.path:
        raise ConfigError(variable, f"expected host:port, got {text!r}")
    return parts.hostname, port


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def get(self, name: str, default: T, parse: Callable[[str], T]) -> T:
        value = self.raw(name)
        if value is None:
            return default
        try:
            return parse(value)
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(name, f"{exc} (got {value!r})") from exc

    def number(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        def parse(text: str) -> float:
            result = float(text)
            if not result >= minimum or result == float("inf"):
                raise ValueError(f"must be a finite number >= {minimum}")
            return result

        return self.get(name, default, parse)

    def integer(self, name: str, default: int, *, minimum: int, maximum: int = 1 << 31) -> int:
        def parse(text: str) -> int:
            result = int(text)
            if not minimum <= result <= maximum:
                raise ValueError(f"must be an integer from {minimum} to {maximum}")
            return result

        return self.get(name, default, parse)

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        def parse(text: str) -> str:
            if text not in choices:
                raise ValueError(f"must be one of {', '.join(choices)}")
            return text

        return self.get(name, default, parse)

    def settings(self) -> Settings:
        d = Settings()
        urls = self.raw("EXECUTOR_URLS")
        executor_urls: tuple[str, ...] = ()
        if urls is not None:
            items = [u.strip() for u in urls.split(",") if u.strip()]
            if not items:
                raise ConfigError("EXECUTOR_URLS", "lists no URL")
            executor_urls = tuple(_http_url("EXECUTOR_URLS", u) for u in items)
        redis_url = self.raw("REDIS_URL") or d.redis_url
        if urlsplit(redis_url).scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(
                "REDIS_URL",
                f"expected redis://, rediss:// or unix://, got {redact_url(redis_url)!r}",
            )
        prefix = self.raw("STREAM_PREFIX") or d.stream_prefix
        if any(c in prefix for c in "{} \t\n"):
            raise ConfigError("STREAM_PREFIX", "must not contain braces or white space")
        step = self.number("QUEUE_BACKOFF_STEP_S", d.queue_backoff_step_s)
        heartbeat = self.number("HEARTBEAT_INTERVAL_S", d.heartbeat_interval_s, minimum=0.05)
        queue_urls, queue_weights = self.queues()
        queue_url = self.raw("QUEUE_SERVICE_URL")
        dns_name = self.raw("EXECUTOR_DNS_NAME")
        if dns_name is not None:
            if executor_urls:
                raise ConfigError("EXECUTOR_DNS_NAME", "set EXECUTOR_URLS or EXECUTOR_DNS_NAME")
            labels = dns_name.rstrip(".").split(".")
            if not all(
                re.fullmatch(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?", x) for x in labels
            ):
                raise ConfigError("EXECUTOR_DNS_NAME", f"expected a host name, got {dns_name!r}")
        dns_server = self.raw("EXECUTOR_DNS_SERVER")
        eject_base = self.number("EJECT_BASE_S", d.eject_base_s, minimum=0.001)
        settings = Settings(
            queue_service_url=_http_url(
                "QUEUE_SERVICE_URL",
                queue_url or (queue_urls[0] if queue_urls else d.queue_service_url),
            ),
            queue_service_urls=queue_urls,
            queue_weights=queue_weights,
            queue_api_key=self.raw("QUEUE_API_KEY"),
            redis_url=redis_url,
            executor_count=self.integer(
                "EXECUTOR_COUNT", d.executor_count, minimum=1, maximum=1000
            ),
            executor_base_url=_http_url(
                "EXECUTOR_BASE_URL", self.raw("EXECUTOR_BASE_URL") or d.executor_base_url
            ),
            executor_port=self.integer("EXECUTOR_PORT", d.executor_port, minimum=1, maximum=65535),
            executor_urls=executor_urls,
            executor_capacity=self.integer(
                "EXECUTOR_CAPACITY", d.executor_capacity, minimum=1, maximum=10_000
            ),
            pull_ahead=self.integer("PULL_AHEAD", d.pull_ahead, minimum=0, maximum=10_000),
            executor_dns_name=dns_name,
            executor_dns_server=(
                None if dns_server is None else _host_port("EXECUTOR_DNS_SERVER", dns_server)
            ),
            discovery_interval_s=self.number(
                "DISCOVERY_INTERVAL_S", d.discovery_interval_s, minimum=0.01
            ),
            learn_capacity=self.get("LEARN_CAPACITY", d.learn_capacity, _boolean),
            hostname=self.raw("HOSTNAME") or d.hostname,
            host=self.raw("HOST") or d.host,
            port=self.integer("PORT", d.port, minimum=0, maximum=65535),
            routing_strategy=cast(
                Strategy, self.choice("ROUTING_STRATEGY", d.routing_strategy, STRATEGIES)
            ),
            poll_interval_s=self.number("POLL_INTERVAL_S", d.poll_interval_s, minimum=0.001),
            health_interval_s=self.number("HEALTH_INTERVAL_S", d.health_interval_s, minimum=0.01),
            health_timeout_s=self.number("HEALTH_TIMEOUT_S", d.health_timeout_s, minimum=0.01),
            health_stale_s=self.number("HEALTH_STALE_S", d.health_stale_s),
            healthy_threshold=self.integer(
                "HEALTHY_THRESHOLD", d.healthy_threshold, minimum=1, maximum=100
            ),
            unhealthy_threshold=self.integer(
                "UNHEALTHY_THRESHOLD", d.unhealthy_threshold, minimum=1, maximum=100
            ),
            eject_after_failures=self.integer(
                "EJECT_AFTER_FAILURES", d.eject_after_failures, minimum=0, maximum=10_000
            ),
            eject_base_s=eject_base,
            eject_max_s=self.number(
                "EJECT_MAX_S", max(d.eject_max_s, eject_base), minimum=eject_base
            ),
            dispatch_margin_s=self.number("DISPATCH_MARGIN_S", d.dispatch_margin_s),
            default_task_timeout_s=self.number(
                "DEFAULT_TASK_TIMEOUT_S", d.default_task_timeout_s, minimum=0.001
            ),
            queue_timeout_s=self.number("QUEUE_TIMEOUT_S", d.queue_timeout_s, minimum=0.01),
            queue_backoff_step_s=step,
            queue_backoff_max_s=self.number(
                "QUEUE_BACKOFF_MAX_S", d.queue_backoff_max_s, minimum=step
            ),
            report_backoff_max_s=self.number(
                "REPORT_BACKOFF_MAX_S", d.report_backoff_max_s, minimum=0.01
            ),
            shutdown_grace_s=self.number("SHUTDOWN_GRACE_S", d.shutdown_grace_s),
            max_attempts=self.integer("MAX_ATTEMPTS", d.max_attempts, minimum=1, maximum=100),
            retry_base_ms=self.integer("RETRY_BASE_MS", d.retry_base_ms, minimum=0),
            retry_max_ms=self.integer("RETRY_MAX_MS", d.retry_max_ms, minimum=0),
            recovery_policy=cast(
                RecoveryPolicy,
                self.choice("RECOVERY_POLICY", d.recovery_policy, ("redispatch", "fail")),
            ),
            queue_lease_s=self.number("QUEUE_LEASE_S", d.queue_lease_s),
            max_deliveries=self.integer("MAX_DELIVERIES", d.max_deliveries, minimum=1),
            claim_idle_ms=self.integer("CLAIM_IDLE_MS", d.claim_idle_ms, minimum=10),
            max_code_bytes=self.integer("MAX_CODE_BYTES", d.max_code_bytes, minimum=1),
            max_output_bytes=self.integer("MAX_OUTPUT_BYTES", d.max_output_bytes, minimum=256),
            stream_maxlen=self.integer("STREAM_MAXLEN", d.stream_maxlen, minimum=0),
            retention_interval_s=self.number(
                "RETENTION_INTERVAL_S", d.retention_interval_s, minimum=0.01
            ),
            event_buffer_max=self.integer("EVENT_BUFFER_MAX", d.event_buffer_max, minimum=1),
            shared_capacity=self.get("SHARED_CAPACITY", d.shared_capacity, _boolean),
            takeover_interval_s=self.number(
                "TAKEOVER_INTERVAL_S", d.takeover_interval_s, minimum=0.05
            ),
            heartbeat_interval_s=heartbeat,
            dead_after_s=self.number("DEAD_AFTER_S", d.dead_after_s, minimum=2 * heartbeat),
            stream_prefix=prefix,
            projector_block_ms=self.integer(
                "PROJECTOR_BLOCK_MS", d.projector_block_ms, minimum=1, maximum=60_000
            ),
            projector_batch=self.integer(
                "PROJECTOR_BATCH", d.projector_batch, minimum=1, maximum=10_000
            ),
            log_level=self.choice("LOG_LEVEL", d.log_level, LOG_LEVELS),
            log_format=cast(
                LogFormat, self.choice("LOG_FORMAT", d.log_format, ("json", "console"))
            ),
        )
        return self.per_executor(settings)

    def queues(self) -> tuple[tuple[str, ...], tuple[float, ...]]:
        """``QUEUE_SERVICE_URLS``: the URLs in priority order, and weights when any is given."""
        text = self.raw("QUEUE_SERVICE_URLS")
        if text is None:
            return (), ()
        urls: list[str] = []
        weights: list[float] = []
        for item in _items("QUEUE_SERVICE_URLS", text):
            url, value = _url_and_value("QUEUE_SERVICE_URLS", item)
            if url in urls:
                raise ConfigError("QUEUE_SERVICE_URLS", f"{url} is listed twice")
            urls.append(url)
            weights.append(1.0 if value is None else _positive("QUEUE_SERVICE_URLS", value, float))
        weighted = any("=" in item for item in text.split(","))
        return tuple(urls), tuple(weights) if weighted else ()

    def per_executor(self, settings: Settings) -> Settings:
        """``EXECUTOR_CAPACITIES`` and ``EXECUTOR_WEIGHTS``, aligned with the executor list."""
        endpoints = settings.executor_endpoints() if settings.discovery != "dns" else ()
        changes: dict[str, object] = {}
        capacities = self.raw("EXECUTOR_CAPACITIES")
        if capacities is not None:
            changes["executor_capacities"] = _per_executor(
                "EXECUTOR_CAPACITIES", capacities, endpoints, int
            )
        weights = self.raw("EXECUTOR_WEIGHTS")
        if weights is not None:
            changes["executor_weights"] = _per_executor(
                "EXECUTOR_WEIGHTS", weights, endpoints, float
            )
        return settings.with_(**changes) if changes else settings


# (variable, default, meaning) for --help and the README; kept beside the reader.
ENVIRONMENT: tuple[tuple[str, str, str], ...] = (
    ("QUEUE_SERVICE_URL", "http://queue:8081", "Queue Service base URL"),
    ("QUEUE_API_KEY", "(none)", "sent as X-API-Key to the queue; never logged"),
    ("REDIS_URL", "redis://redis:6379", "Redis holding the event stream"),
    ("EXECUTOR_COUNT", "3", "executors named <base>-1..N (compose naming)"),
    ("EXECUTOR_BASE_URL", "http://executor", "base of the compose naming"),
    ("EXECUTOR_PORT", "8083", "port of the compose naming when the base has none"),
    ("EXECUTOR_URLS", "(none)", "comma list of executor URLs; overrides the naming"),
    ("EXECUTOR_CAPACITY", "1", "concurrent tasks per executor"),
    (
        "PULL_AHEAD",
        "1",
        "tasks pulled beyond free capacity, to wait for the next free slot; 0: none",
    ),
    (
        "EXECUTOR_CAPACITIES",
        "(none)",
        "per-executor capacity: url=N,... or N,... aligned with the executors",
    ),
    ("LEARN_CAPACITY", "false", "take an executor's capacity from its GET /health answer"),
    (
        "EXECUTOR_WEIGHTS",
        "(none)",
        "weights of the weighted strategy: url=W,... or W,... (default: capacities)",
    ),
    ("EXECUTOR_DNS_NAME", "(none)", "discover executors: every address of this name"),
    ("EXECUTOR_DNS_SERVER", "(none)", "host:port of a DNS server to ask (default: the system's)"),
    ("DISCOVERY_INTERVAL_S", "30", "how often EXECUTOR_DNS_NAME is resolved again"),
    (
        "QUEUE_SERVICE_URLS",
        "(none)",
        "several queues, highest priority first; url=W,... shares pulls by weight",
    ),
    ("HOSTNAME", "queue-worker-1", "worker id written on every event"),
    ("HOST", "0.0.0.0", "address the HTTP API listens on"),
    ("PORT", "8084", "HTTP API port (`run --port` wins)"),
    (
        "ROUTING_STRATEGY",
        "least_loaded",
        "least_loaded, round_robin, random, weighted or sticky",
    ),
    ("POLL_INTERVAL_S", "1.0", "wait after an empty poll"),
    ("HEALTH_INTERVAL_S", "5.0", "period of the background health checks"),
    ("HEALTH_TIMEOUT_S", "2.0", "timeout of one GET /health"),
    ("HEALTH_STALE_S", "10.0", "a check older than this is redone before routing"),
    ("HEALTHY_THRESHOLD", "1", "passed checks in a row that make an executor healthy"),
    ("UNHEALTHY_THRESHOLD", "1", "failed checks in a row that make an executor unhealthy"),
    (
        "EJECT_AFTER_FAILURES",
        "5",
        "retryable dispatch failures in a row that eject an executor; 0 never ejects",
    ),
    ("EJECT_BASE_S", "30", "first ejection time; doubles with each repeated ejection"),
    ("EJECT_MAX_S", "300", "longest ejection time"),
    ("DISPATCH_MARGIN_S", "10.0", "HTTP timeout of /execute = task timeout + this"),
    ("DEFAULT_TASK_TIMEOUT_S", "30.0", "timeout for a task that names none"),
    ("QUEUE_TIMEOUT_S", "10.0", "HTTP timeout of calls to the queue"),
    ("QUEUE_BACKOFF_STEP_S", "5.0", "queue unreachable: wait step, 2*step, ... up to max"),
    ("QUEUE_BACKOFF_MAX_S", "30.0", "longest wait between pull attempts"),
    ("REPORT_BACKOFF_MAX_S", "30.0", "longest wait between report retries"),
    ("SHUTDOWN_GRACE_S", "30.0", "on SIGTERM, how long in-flight tasks may finish"),
    ("MAX_ATTEMPTS", "3", "tries of a task on retryable failures (a different executor each)"),
    ("RETRY_BASE_MS", "200", "retry backoff: full jitter up to base * 2^(attempt-1)"),
    ("RETRY_MAX_MS", "5000", "retry backoff cap"),
    ("RECOVERY_POLICY", "redispatch", "unfinished tasks found at start-up: redispatch or fail"),
    ("QUEUE_LEASE_S", "60", "lease asked of the queue (?lease_s=); 0 asks none"),
    ("MAX_DELIVERIES", "5", "a projector entry delivered more often is dead-lettered"),
    ("CLAIM_IDLE_MS", "30000", "pending entries idle this long are taken over (XAUTOCLAIM)"),
    ("MAX_CODE_BYTES", "1048576", "larger task code is rejected"),
    ("MAX_OUTPUT_BYTES", "65536", "executor output kept in the stream (the queue gets it all)"),
    ("STREAM_MAXLEN", "1000000", "approximate stream length kept; 0 never trims"),
    ("RETENTION_INTERVAL_S", "30", "how often the stream is trimmed"),
    ("EVENT_BUFFER_MAX", "10000", "events held in memory while Redis is unreachable"),
    ("SHARED_CAPACITY", "false", "replicas lease executor slots in Redis (capacity shared)"),
    ("TAKEOVER_INTERVAL_S", "5", "how often a replica looks for dead peers to take over"),
    ("HEARTBEAT_INTERVAL_S", "2", "how often a worker refreshes its liveness key"),
    ("DEAD_AFTER_S", "10", "a worker whose liveness key is this old is dead (its TTL)"),
    ("STREAM_PREFIX", "queue-worker", "stream key is {<prefix>}:events"),
    ("PROJECTOR_BLOCK_MS", "1000", "how long a projector blocks on an empty stream"),
    ("PROJECTOR_BATCH", "256", "entries a projector reads at once"),
    ("LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING, ERROR or CRITICAL"),
    ("LOG_FORMAT", "json", "json or console"),
)
