"""The Redis client as the worker opens it.

It must let a cancellation through; our loops' shutdown depends on it.
redis-py 8.0 and 8.1 swallow a ``CancelledError`` that arrives while a command
completes, so a cancelled projector kept running and shutdown hung; this test
fails on those versions (hence ``redis<8`` in pyproject.toml).

Its connections pack commands with hiredis: the bytes must be redis-py's own.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from queue_worker.streams.connection import HiredisPacking, open_redis


@pytest.mark.parametrize("opened_by", ["redis-py", "open_redis"])
async def test_cancelling_a_command_loop_always_stops_it(redis_url: str, opened_by: str) -> None:
    client = (
        aioredis.Redis.from_url(redis_url)
        if opened_by == "redis-py"
        else await open_redis(redis_url)
    )
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


COMMANDS = [
    ("XADD", "{p}:events", "*", "type", "task.pulled", "ts", 1764361234567, "data", b'{"a":1}'),
    ("CONFIG GET", "maxmemory"),
    (b"CLIENT SETNAME", "w\u00e9"),
    ("SET", "k", 1.5, "EX", 10),
    ("XACK", "s", "g", *(f"{i}-0" for i in range(300))),
    ("SET", "big", b"x" * 100_000),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: str(c[0]))
def test_hiredis_packing_sends_what_redis_py_would(command: tuple[Any, ...]) -> None:
    ours = type("Packed", (HiredisPacking, Connection), {})()
    assert b"".join(ours.pack_command(*command)) == b"".join(Connection().pack_command(*command))


def test_hiredis_packing_refuses_what_redis_py_refuses() -> None:
    ours = type("Packed", (HiredisPacking, Connection), {})()
    unpackable: Any = object()
    with pytest.raises(DataError):
        ours.pack_command("SET", "k", unpackable)
    with pytest.raises(DataError):
        Connection().pack_command("SET", "k", unpackable)


async def test_open_redis_packs_with_hiredis_and_round_trips(redis_url: str) -> None:
    client = await open_redis(redis_url)
    try:
        assert isinstance(client, aioredis.Redis)
        assert issubclass(client.connection_pool.connection_class, HiredisPacking)
        await client.set("qw:packing", "caf\u00e9", ex=5)
        assert await client.get("qw:packing") == "caf\u00e9".encode()
        async with client.pipeline(transaction=True) as pipe:
            pipe.xadd("qw:packing:s", {"n": 1, "f": 2.5, "b": b"\x00\xff"})
            pipe.xrange("qw:packing:s")
            _, entries = await pipe.execute()
        assert entries[0][1] == {b"n": b"1", b"f": b"2.5", b"b": b"\x00\xff"}
    finally:
        await client.aclose()
