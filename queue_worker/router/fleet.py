"""Running several replicas on one log: shared executor slots and takeover of dead peers.

* Executor slots are leased in Redis, one sorted set per executor
  (``{<prefix>}:slots:<url>``, members scored by their expiry), so replicas
  together never send an executor more than its capacity; a dead replica's
  slots expire on their own. Acquiring is one atomic script.
* A per-executor rate limit (``EXECUTOR_RATE_LIMIT`` tasks per second) is shared
  the same way: one key per executor (``{<prefix>}:rate:<url>``) holds the GCRA's
  theoretical arrival time, advanced by one script on Redis's own clock, so the
  replicas together never send an executor more than its rate.
* A replica whose liveness key (``{<prefix>}:alive:<worker_id>``) is gone while
  the stream still shows it with unfinished tasks or an open pull is dead;
  exactly one live replica wins the takeover claim
  (``{<prefix>}:takeover:<worker_id>``) and, in the same script, fences the dead
  worker's generation (``{<prefix>}:fenced``): the stream accepts nothing more
  from it, so a worker that was only slow cannot act on tasks recovered here.
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

# GCRA. KEYS[1] = the executor's rate key; ARGV[1] = interval (us), ARGV[2] = burst.
# Returns 0 when a dispatch may go now (and counts it), else the microseconds to wait.
PACE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or now), now)
local wait = tat - (burst - 1) * interval - now
if wait > 0 then
  return wait
end
redis.call('SET', KEYS[1], tat + interval, 'PX', math.ceil((tat + interval - now) / 1000) + 1000)
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


# KEYS: alive:<dead>, takeover:<dead>, fenced, generation:<dead>, stream, epoch.
# ARGV: dead, me, claim ttl ms, the epoch this replica knows, the dead worker's newest
# generation seen in the stream. Won: {1, fenced generation, the stream's last id}.
FENCE = """
if redis.call('GET', KEYS[6]) ~= ARGV[4] then return {0, 'epoch'} end
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, 'alive'} end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[2] then return {0, 'claimed'} end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
local gen = math.max(tonumber(redis.call('GET', KEYS[4]) or '0'), tonumber(ARGV[5]))
if gen > tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '-1') then
  redis.call('HSET', KEYS[3], ARGV[1], gen)
end
local last = redis.call('XREVRANGE', KEYS[5], '+', '-', 'COUNT', 1)
return {1, tostring(gen), last[1] and last[1][1] or '0-0'}
"""


async def fence(
    redis: RedisClient, keys: Keys, dead: str, me: str, epoch: str, seen_generation: int
) -> tuple[int, str] | None:
    """Claim the takeover of ``dead`` and fence its generation, unless it is alive, another
    replica claimed it, or Redis lost its data since this replica's ``epoch``. Won: the
    generation fenced and the stream's last id at that moment."""
    script = cast(aioredis.Redis, redis).register_script(FENCE)
    reply = await script(
        keys=[
            keys.alive(dead),
            keys.takeover(dead),
            keys.fenced,
            keys.generation(dead),
            keys.events,
            keys.epoch,
        ],
        args=[dead, me, TAKEOVER_TTL_MS, epoch, seen_generation],
    )
    if int(reply[0]) != 1:
        return None
    return int(reply[1]), reply[2].decode()


async def claim(redis: RedisClient, key: str, me: str, *, keep: bool = False) -> bool:
    """Take ``key`` for ``me`` when it is free or already mine. A kept claim (a
    takeover) outlives the recovery, so peers fold its events before it expires."""
    script = cast(aioredis.Redis, redis).register_script(CLAIM)
    ttl_ms = TAKEOVER_TTL_MS if keep else TAKEOVER_TTL_MS // 2
    return bool(await script(keys=[key], args=[me, ttl_ms]))


async def release_claim(redis: RedisClient, key: str, me: str) -> None:
    script = cast(aioredis.Redis, redis).register_script(RELEASE)
    await script(keys=[key], args=[me])


class SharedRate:
    """At most ``per_s`` dispatches per second to each executor across the fleet (a burst
    of ``burst`` allowed), paced in Redis."""

    def __init__(self, redis: RedisClient, keys: Keys, per_s: float, burst: int = 1) -> None:
        self.keys = keys
        self.per_s = per_s
        self.interval_us = max(round(1_000_000 / per_s), 1)
        self.burst = burst
        self._pace = cast(aioredis.Redis, redis).register_script(PACE)

    async def take(self, url: str) -> float:
        """Count one dispatch to ``url`` now (0.0), or say how many seconds to wait for
        one (nothing counted). Raises what Redis raised."""
        wait_us = await self._pace(keys=[self.keys.rate(url)], args=[self.interval_us, self.burst])
        return int(wait_us) / 1_000_000
