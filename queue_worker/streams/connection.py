"""Opening Redis: a single server or a Redis Cluster, told apart by asking it.

``REDIS_URL`` may name any node of a cluster; every key of a deployment
shares one hash tag (``{<prefix>}``), so the stream, its consumer groups and
the side keys live on one shard and scripts and transactions work there.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.connection import HiredisRespSerializer

RedisClient = aioredis.Redis | aioredis.RedisCluster


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


async def open_redis(url: str) -> RedisClient:
    """A client for ``url``: a cluster client when the server runs in cluster mode.

    Raises redis-py's ``ConnectionError``/``TimeoutError`` when nobody answers.
    """
    client = with_hiredis_packing(aioredis.Redis.from_url(url, decode_responses=False))
    try:
        info = await client.info("cluster")
    except BaseException:
        await client.aclose()
        raise
    if not info.get("cluster_enabled"):
        return client
    await client.aclose()
    # The cluster client creates its node connections itself (redis-py's packer).
    cluster = aioredis.RedisCluster.from_url(url, decode_responses=False)
    await cluster.initialize()
    return cluster
