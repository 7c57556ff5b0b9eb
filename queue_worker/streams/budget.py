"""The retry budget (as Envoy's): retries are at most a share of the fleet's dispatches.

Over a sliding window of ``BUDGET_WINDOW_S`` seconds, the whole fleet may schedule
``max(RETRY_BUDGET_MIN, RETRY_BUDGET_PERCENT % of dispatches)`` retries. Every
``task.dispatched`` is counted by the append script (``claims.py``) in a per-second
bucket ``{<prefix>}:budget:<second>``; :meth:`RetryBudget.admit` sums the window's
buckets and takes a retry from the budget in one script, so replicas never both take
the last one. When the retries outgrow the budget (a fleet-wide outage), failures stop
multiplying the load: the task fails as ``retry_budget_exhausted``.
"""

from __future__ import annotations

import time
from typing import cast

import msgspec
import redis.asyncio as aioredis

from queue_worker.streams.claims import BUDGET_BUCKET_TTL_MS
from queue_worker.streams.connection import RedisClient
from queue_worker.streams.keys import Keys

BUDGET_WINDOW_S = 10

# ARGV[1] = key tag, ARGV[2] = now (unix s), ARGV[3] = window (s), ARGV[4] = percent,
# ARGV[5] = minimum retries, ARGV[6] = bucket ttl (ms).
# Returns {admitted (0/1), retries in the window (with this one), dispatches, allowed}.
ADMIT = """
local tag, now = ARGV[1], tonumber(ARGV[2])
local window, percent, least = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local dispatches, retries = 0, 0
for second = now - window + 1, now do
  local counts = redis.call('HMGET', tag .. 'budget:' .. second, 'd', 'r')
  dispatches = dispatches + (tonumber(counts[1]) or 0)
  retries = retries + (tonumber(counts[2]) or 0)
end
local allowed = math.max(least, math.floor(dispatches * percent / 100))
if retries >= allowed then
  return {0, retries, dispatches, allowed}
end
local bucket = tag .. 'budget:' .. now
redis.call('HINCRBY', bucket, 'r', 1)
redis.call('PEXPIRE', bucket, ARGV[6])
return {1, retries + 1, dispatches, allowed}
"""


class Verdict(msgspec.Struct, frozen=True):
    """Whether a retry was admitted, and the window's figures it was judged on."""

    admitted: bool
    retries: int
    dispatches: int
    allowed: int

    def explain(self, percent: float, least: int) -> str:
        return (
            f"{self.retries} retries for {self.dispatches} dispatches in the fleet over the "
            f"last {BUDGET_WINDOW_S} s; the budget allows {self.allowed} "
            f"(RETRY_BUDGET_PERCENT={percent:g}, at least RETRY_BUDGET_MIN={least})"
        )


class RetryBudget:
    """Admits retries while the fleet's retries stay within the budget."""

    def __init__(self, redis: RedisClient, keys: Keys, percent: float, least: int) -> None:
        self.keys = keys
        self.percent = percent
        self.least = least
        # RedisCluster has register_script too; redis-py types it for Redis only.
        self._admit = cast(aioredis.Redis, redis).register_script(ADMIT)

    async def admit(self, now_s: float | None = None) -> Verdict:
        """Take one retry from the budget, or say why there is none. Raises what Redis
        raised."""
        now = int(time.time() if now_s is None else now_s)
        args: list[str | int | float] = [
            self.keys.tag, now, BUDGET_WINDOW_S, self.percent, self.least, BUDGET_BUCKET_TTL_MS,
        ]  # fmt: skip
        # The key only routes the call to the deployment's shard in a Redis Cluster.
        reply = await self._admit(keys=[self.keys.budget(now)], args=args)
        admitted, retries, dispatches, allowed = (int(x) for x in reply)
        return Verdict(bool(admitted), retries, dispatches, allowed)
