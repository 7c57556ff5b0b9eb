"""Settings: one frozen object, built once from the environment and passed in.

This is the only module that reads ``os.environ``. Every invalid value stops
start-up with a :class:`ConfigError` naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

from queue_worker.errors import ConfigError

Strategy = Literal["round_robin", "random"]
STRATEGIES: tuple[Strategy, ...] = ("round_robin", "random")
LogFormat = Literal["json", "console"]
RecoveryPolicy = Literal["redispatch", "fail"]
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

T = TypeVar("T")


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
    hostname: str = "queue-worker-1"
    host: str = "0.0.0.0"
    port: int = 8084
    routing_strategy: Strategy = "round_robin"
    poll_interval_s: float = 1.0
    health_interval_s: float = 5.0
    health_timeout_s: float = 2.0
    health_stale_s: float = 10.0
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
        settings = Settings(
            queue_service_url=_http_url(
                "QUEUE_SERVICE_URL", self.raw("QUEUE_SERVICE_URL") or d.queue_service_url
            ),
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
        return settings


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
    ("HOSTNAME", "queue-worker-1", "worker id written on every event"),
    ("HOST", "0.0.0.0", "address the HTTP API listens on"),
    ("PORT", "8084", "HTTP API port (`run --port` wins)"),
    ("ROUTING_STRATEGY", "round_robin", "round_robin or random"),
    ("POLL_INTERVAL_S", "1.0", "wait after an empty poll"),
    ("HEALTH_INTERVAL_S", "5.0", "period of the background health checks"),
    ("HEALTH_TIMEOUT_S", "2.0", "timeout of one GET /health"),
    ("HEALTH_STALE_S", "10.0", "a check older than this is redone before routing"),
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
    ("STREAM_PREFIX", "queue-worker", "stream key is {<prefix>}:events"),
    ("PROJECTOR_BLOCK_MS", "1000", "how long a projector blocks on an empty stream"),
    ("PROJECTOR_BATCH", "256", "entries a projector reads at once"),
    ("LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING, ERROR or CRITICAL"),
    ("LOG_FORMAT", "json", "json or console"),
)
