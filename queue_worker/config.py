"""Settings: one frozen object, built once from the environment and passed in.

This is the only module that reads ``os.environ``. Each setting is declared
once, as a field of :class:`~queue_worker.config_fields.SettingsFields` (its
variable, type, default, parser and meaning); :class:`Settings` adds what the
fields say together (the executors' URLs, the queues, where spans go). The
reading, the ``--help`` text and the README table (:data:`ENVIRONMENT`) all
come from those declarations. A bad environment stops start-up with one
:class:`ConfigError` listing every bad variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from queue_worker.config_fields import SettingsFields
from queue_worker.config_reader import environment, given, read
from queue_worker.config_values import (
    items,
    origin_of,
    redact_url,
    url_and_value,
    userinfo,
    weighted_urls,
)


@dataclass(frozen=True, slots=True)
class Settings(SettingsFields):
    """Everything the worker needs to know, validated."""

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
