"""Opening Redis: a single server or a Redis Cluster, told apart by asking it.

``REDIS_URL`` may name any node of a cluster; every key of a deployment
shares one hash tag (``{<prefix>}``), so the stream, its consumer groups and
the side keys live on one shard and scripts and transactions work there.

A ``rediss://`` URL connects over TLS, verifying the server against the CA
file of :class:`RedisTls` (else the system's CAs), with a client certificate
when one is given (mutual TLS). Every client of the worker and its commands is
made here (:func:`open_redis`, :func:`plain_client`), so they all use it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as redis_errors
import structlog
from redis.connection import HiredisRespSerializer

from queue_worker.errors import QueueWorkerError

log = structlog.get_logger(__name__)

RedisClient = aioredis.Redis | aioredis.RedisCluster
# Redis cannot be reached (a connection refused, reset or timed out).
REDIS_DOWN = (aioredis.ConnectionError, aioredis.TimeoutError, OSError)
# Redis answers but refuses for now: out of memory (maxmemory with noeviction), a
# read-only replica (after a failover), a cluster that is down or redirecting.
REDIS_REFUSED = (
    redis_errors.ReadOnlyError,
    redis_errors.OutOfMemoryError,
    redis_errors.ClusterError,
    redis_errors.TryAgainError,
    redis_errors.AskError,
)
# What passes with time: a loop that meets it waits and tries again.
REDIS_TRANSIENT = (*REDIS_DOWN, *REDIS_REFUSED)
# Anything a Redis call may raise: the above, or another refusal (NOGROUP, WRONGTYPE, ...).
REDIS_ERRORS = (aioredis.RedisError, OSError)


# What a script says when the ACL user may not run one of its commands (redis-py maps the
# NOPERM of a command sent directly to NoPermissionError; a script's is a plain error).
_SCRIPT_DENIED = "The user executing the script can't"


def denied(exc: BaseException) -> bool:
    """Whether Redis refused for lack of a permission of the ACL user: a command, a key or
    a channel (only the permissions change that; see the README's "Redis ACL user")."""
    if isinstance(exc, redis_errors.NoPermissionError):
        return True
    return isinstance(exc, aioredis.ResponseError) and (
        str(exc).startswith(("NOPERM", _SCRIPT_DENIED))
    )


def transient(exc: BaseException) -> bool:
    """Whether a Redis error passes with time (also a blocked read that a server turning
    replica unblocked: ``UNBLOCKED``, which redis-py does not map)."""
    if isinstance(exc, REDIS_TRANSIENT):
        return True
    return isinstance(exc, aioredis.ResponseError) and str(exc).startswith("UNBLOCKED")


class HiredisPacking:
    """Commands packed by hiredis's C packer.

    redis-py's synchronous connections use it (``HiredisRespSerializer``) when
    hiredis is installed; its asyncio connections pack in Python, which was ~8 %
    of the worker's CPU (a task costs about fifteen commands). Same bytes,
    several times faster.
    """

    _serializer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        packed: list[bytes] = self._serializer.pack(*args)
        return packed


def with_hiredis_packing(client: aioredis.Redis) -> aioredis.Redis:
    """``client`` with its connections packing commands through hiredis."""
    pool = client.connection_pool
    base = pool.connection_class
    if not issubclass(base, HiredisPacking):
        pool.connection_class = type(f"Hiredis{base.__name__}", (HiredisPacking, base), {})
    return client


@dataclass(frozen=True, slots=True)
class RedisTls:
    """TLS files for a ``rediss://`` URL (``REDIS_CA_FILE``, ``REDIS_CERT_FILE``,
    ``REDIS_KEY_FILE``); ignored for other URLs."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def options(self, url: str) -> dict[str, Any]:
        """redis-py's keyword arguments for a client of ``url``."""
        if not url.startswith("rediss://"):
            return {}
        options: dict[str, Any] = {}
        if self.ca_file is not None:
            options["ssl_ca_certs"] = self.ca_file
        if self.cert_file is not None and self.key_file is not None:
            options["ssl_certfile"], options["ssl_keyfile"] = self.cert_file, self.key_file
        return options


NO_TLS = RedisTls()


def plain_client(url: str, tls: RedisTls = NO_TLS) -> aioredis.Redis:
    """A client of the node ``url`` names (not a cluster client), e.g. for pub/sub."""
    return aioredis.Redis.from_url(url, **tls.options(url))


async def open_redis(url: str, tls: RedisTls = NO_TLS) -> RedisClient:
    """A client for ``url``: a cluster client when the server runs in cluster mode.

    No socket timeout is set: redis-py's asyncio client can lose a task's
    cancellation when a read timeout and a cancel meet (a stop would then hang).
    Callers that must answer while Redis stalls (``/health``) bound their own calls.
    Raises redis-py's ``ConnectionError``/``TimeoutError`` when nobody answers.
    """
    options = tls.options(url)
    client = with_hiredis_packing(aioredis.Redis.from_url(url, decode_responses=False, **options))
    try:
        info = await client.info("cluster")
    except BaseException:
        await client.aclose()
        raise
    if not info.get("cluster_enabled"):
        return client
    await client.aclose()
    # The cluster client creates its node connections itself (redis-py's packer).
    cluster = aioredis.RedisCluster.from_url(url, decode_responses=False, **options)
    await cluster.initialize()
    return cluster


class RedisUnavailable(QueueWorkerError):
    """Redis could not be reached (the message names ``REDIS_URL``, without its password)."""


class RedisDenied(QueueWorkerError):
    """Redis refused a command for lack of a permission of the ACL user (one line naming
    what was refused, and ``REDIS_URL`` without its password)."""

    def __init__(self, shown: str, exc: BaseException) -> None:
        reason = " ".join(str(exc).split())  # one line, whatever Redis said
        super().__init__(
            f"Redis at {shown} (REDIS_URL) refused: {reason} (the ACL user lacks a permission "
            'the worker needs; see "Redis ACL user" in the README)'
        )


async def connect(
    url: str, shown: str, *, attempts: int = 1, tls: RedisTls = NO_TLS
) -> RedisClient:
    """:func:`open_redis` tried ``attempts`` times with a doubling pause (0.2 s first);
    raises :class:`RedisUnavailable` naming ``shown`` (the URL as it may be shown)."""
    delay_s = 0.2
    for attempt in range(1, attempts + 1):
        try:
            return await open_redis(url, tls)
        except aioredis.ResponseError as exc:
            if denied(exc):
                raise RedisDenied(shown, exc) from None
            raise
        except REDIS_DOWN as exc:
            if attempt == attempts:
                raise RedisUnavailable(f"cannot reach Redis at {shown} (REDIS_URL): {exc}") from exc
            log.warning("redis_unreachable", attempt=attempt, retry_in_s=delay_s)
            await asyncio.sleep(delay_s)
            delay_s *= 2
    raise AssertionError("unreachable")
