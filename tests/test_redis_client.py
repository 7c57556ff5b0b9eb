"""The Redis client must let a cancellation through; our loops' shutdown depends on it.

redis-py 8.0 and 8.1 swallow a ``CancelledError`` that arrives while a command
completes, so a cancelled projector kept running and shutdown hung; this test
fails on those versions (hence ``redis<8`` in pyproject.toml).
"""

from __future__ import annotations

import asyncio
import random

import redis.asyncio as aioredis


async def test_cancelling_a_command_loop_always_stops_it(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    rng = random.Random(1)
    survived = 0
    try:
        for _ in range(200):

            async def loop() -> None:
                while True:
                    await client.ping()  # type: ignore[misc]

            task = asyncio.create_task(loop())
            await asyncio.sleep(rng.random() * 0.003)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=1.0)
            if not done:
                survived += 1
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    finally:
        await client.aclose()
    assert survived == 0, f"{survived} of 200 cancelled loops kept running"
