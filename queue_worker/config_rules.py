"""How settings relate to each other: the rules that check a setting against others.

A rule is declared on its setting (``rule=`` of :func:`~queue_worker.config_reader.setting`,
in :mod:`queue_worker.config_fields`) and run by :func:`~queue_worker.config_reader.read`
once the settings it needs are valid. It may also fill in a default from another setting
(``QUEUE_SERVICE_URL`` from ``QUEUE_SERVICE_URLS``, say). The parsers of one value alone
are in :mod:`queue_worker.config_values`.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, TypeVar

from queue_worker.config_reader import Rule
from queue_worker.config_values import Invalid, number_text, shown


class Known(Protocol):
    """What the rules read of the settings read so far (a
    :class:`~queue_worker.config.Settings`, which this module cannot import: its
    declarations name these rules)."""

    @property
    def queue_service_urls(self) -> tuple[str, ...]: ...
    @property
    def executor_urls(self) -> tuple[str, ...]: ...
    @property
    def eject_base_s(self) -> float: ...
    @property
    def stream_max_clients(self) -> int: ...
    @property
    def redis_url(self) -> str: ...
    @property
    def discovery(self) -> Literal["dns", "list", "compose"]: ...
    def executor_endpoints(self) -> tuple[str, ...]: ...


def first_queue(url: str, given: str | None, settings: Known) -> str:
    """``QUEUE_SERVICE_URL`` defaults to the first of ``QUEUE_SERVICE_URLS``."""
    if given is None and settings.queue_service_urls:
        return settings.queue_service_urls[0]
    return url


def not_with_urls(name: str | None, given: str | None, settings: Known) -> str | None:
    if name is not None and settings.executor_urls:
        raise Invalid("set EXECUTOR_URLS or EXECUTOR_DNS_NAME, not both")
    return name


def at_least(other: str, times: float = 1.0) -> Rule[float]:
    """A given value must be at least ``times`` the setting ``other`` (a field name)."""
    named = other.upper() if times == 1 else f"{number_text(times)} times {other.upper()}"

    def apply(value: float, given: str | None, settings: Known) -> float:
        least = times * getattr(settings, other)
        if given is not None and value < least:
            raise Invalid(f"expected at least {named} ({number_text(least)}), got {shown(given)}")
        return value

    return Rule((other,), apply)


def eject_max(value: float, given: str | None, settings: Known) -> float:
    """At least ``EJECT_BASE_S``, which also raises the default when it is larger."""
    if given is None:
        return max(value, settings.eject_base_s)
    return at_least("eject_base_s").apply(value, given, settings)


def per_client(value: int, given: str | None, settings: Known) -> int:
    """At most ``STREAM_MAX_CLIENTS``; the default follows a smaller total."""
    if given is None:
        return min(value, settings.stream_max_clients)
    if value > settings.stream_max_clients:
        raise Invalid(
            f"expected at most STREAM_MAX_CLIENTS ({settings.stream_max_clients}), "
            f"got {shown(given)}"
        )
    return value


def paired(other: str) -> Rule[str | None]:
    """A file setting given with the setting ``other`` (a field name), or neither."""

    def apply(value: str | None, given: str | None, settings: Known) -> str | None:
        if value is not None and getattr(settings, other) is None:
            raise Invalid(f"set {other.upper()} too (both or neither)")
        if value is None and getattr(settings, other) is not None:
            raise Invalid(f"not set, but {other.upper()} is: set both or neither")
        return value

    return Rule((other,), apply)


def rediss(value: str | None, given: str | None, settings: Known) -> str | None:
    """A Redis TLS file only with a ``rediss://`` ``REDIS_URL``."""
    if value is not None and not settings.redis_url.startswith("rediss://"):
        raise Invalid("needs a rediss:// REDIS_URL (TLS)")
    return value


TLS_URL: Rule[str | None] = Rule(("redis_url",), rediss)


def paired_tls(value: str | None, given: str | None, settings: Known) -> str | None:
    return rediss(paired("redis_cert_file").apply(value, given, settings), given, settings)


N = TypeVar("N", int, float)

EXECUTORS = ("executor_urls", "executor_count", "executor_base_url", "executor_port")


def aligned(
    pairs: tuple[tuple[str, N], ...], given: str | None, settings: Known
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


ALIGNED: Rule[Any] = Rule((*EXECUTORS, "executor_dns_name"), aligned)
