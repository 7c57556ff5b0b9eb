"""Opening Redis: a single server or a Redis Cluster, told apart by asking it.

``REDIS_URL`` may name any node of a cluster; every key of a deployment
shares one hash tag (``{<prefix>}``), so the stream, its consumer groups and
the side keys live on one shard and scripts and transactions work there.
"""

from __future__ import annotations

import redis.asyncio as aioredis

RedisClient = aioredis.Redis | aioredis.RedisCluster


async def open_redis(url: str) -> RedisClient:
    """A client for ``url``: a cluster client when the server runs in cluster mode.

    Raises redis-py's ``ConnectionError``/``TimeoutError`` when nobody answers.
    """
    client = aioredis.Redis.from_url(url, decode_responses=False)
    try:
        info = await client.info("cluster")
    except BaseException:
        await client.aclose()
        raise
    if not info.get("cluster_enabled"):
        return client
    await client.aclose()
    cluster = aioredis.RedisCluster.from_url(url, decode_responses=False)
    await cluster.initialize()
    return cluster
