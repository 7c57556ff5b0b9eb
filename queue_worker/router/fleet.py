"""Running several replicas on one log: shared executor slots and takeover of dead peers.

* Executor slots are leased in Redis, one sorted set per executor
  (``{<prefix>}:slots:<url>``, members scored by their expiry), so replicas
  together never send an executor more than its capacity; a dead replica's
  slots expire on their own. Acquiring is one atomic script.
* A replica whose liveness key (``{<prefix>}:alive:<worker_id>``) is gone while
  the stream still shows it with unfinished tasks or an open pull is dead;
  exactly one live replica wins ``SET {<prefix>}:takeover:<worker_id> NX`` and
  recovers its tasks by the recovery policy.
"""

from __future__ import annotations

import time
from typing import cast

import redis.asyncio as aioredis

from queue_worker.streams.connection import RedisClient
from queue_worker.streams.keys import Keys

# KEYS[1] = the executor's slot set; ARGV = now_ms, ttl_ms, capacity, token.
ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), ARGV[4])
  return 1
end
return 0
"""

TAKEOVER_TTL_MS = 60_000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class SharedSlots:
    """Fleet-wide in-flight slots per executor, leased in Redis with an expiry."""

    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        # RedisCluster has register_script too; redis-py types it for Redis only.
        self._acquire = cast(aioredis.Redis, redis).register_script(ACQUIRE)

    async def acquire(self, url: str, token: str, capacity: int, ttl_ms: int) -> bool:
        got = await self._acquire(
            keys=[self.keys.slots(url)], args=[now_ms(), ttl_ms, capacity, token]
        )
        return bool(got)

    async def release(self, url: str, token: str) -> None:
        await self.redis.zrem(self.keys.slots(url), token)

    async def release_worker(self, urls: list[str], worker_id: str) -> int:
        """Free every slot a (dead) worker held; returns how many."""
        freed = 0
        for url in urls:
            key = self.keys.slots(url)
            tokens = await self.redis.zrange(key, 0, -1)
            mine = [t for t in tokens if t.decode().startswith(f"{worker_id}:")]
            if mine:
                freed += await self.redis.zrem(key, *mine)
        return freed

    async def in_use(self, urls: list[str]) -> dict[str, int]:
        """Unexpired slots of each executor, across the fleet (one round trip)."""
        now = now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            for url in urls:
                pipe.zcount(self.keys.slots(url), now, "+inf")
            counts: list[int] = await pipe.execute()
        return dict(zip(urls, counts, strict=True))


async def dead_workers(redis: RedisClient, keys: Keys, candidates: list[str]) -> list[str]:
    """Those of ``candidates`` whose liveness key is gone."""
    if not candidates:
        return []
    alive = await redis.mget([keys.alive(w) for w in candidates])
    return [w for w, flag in zip(candidates, alive, strict=True) if flag is None]


# KEYS[1] = the claim; ARGV = holder, ttl_ms. Taken when free or already ours.
CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


async def claim(redis: RedisClient, key: str, me: str, *, keep: bool = False) -> bool:
    """Take ``key`` for ``me`` when it is free or already mine. A kept claim (a
    takeover) outlives the recovery, so peers fold its events before it expires."""
    script = cast(aioredis.Redis, redis).register_script(CLAIM)
    ttl_ms = TAKEOVER_TTL_MS if keep else TAKEOVER_TTL_MS // 2
    return bool(await script(keys=[key], args=[me, ttl_ms]))


async def release_claim(redis: RedisClient, key: str, me: str) -> None:
    script = cast(aioredis.Redis, redis).register_script(RELEASE)
    await script(keys=[key], args=[me])
