"""The event store on a real Redis: group commit, order, and appends held through an outage."""

from __future__ import annotations

import asyncio

from queue_worker.devstack.redis import RedisServer
from queue_worker.streams import events as ev
from queue_worker.streams.connection import open_redis
from queue_worker.streams.entries import parse_entries
from queue_worker.streams.keys import Keys
from queue_worker.streams.store import EventStore


def dispatched(eval_id: str, attempt: int) -> ev.TaskDispatched:
    return ev.TaskDispatched(eval_id=eval_id, executor="http://x:1", attempt=attempt, timeout_s=1.0)


async def test_concurrent_appends_are_batched_and_each_keeps_its_order(
    redis_url: str, prefix: str
) -> None:
    redis = await open_redis(redis_url)
    store = EventStore(redis, Keys(prefix), "w1")
    await store.start()
    try:
        ids = await store.append(dispatched("solo", 1))  # nothing in flight: written at once
        assert len(ids) == 1 and store.round_trips == 1

        async def appender(n: int) -> list[str]:
            out: list[str] = []
            for attempt in (1, 2, 3):
                out += await store.append(dispatched(f"t{n}", attempt))
            return out

        results = await asyncio.gather(*(appender(n) for n in range(40)))
        assert store.appended == 121
        assert store.round_trips < 1 + 120 / 2  # appends that queued went out together
        entries = parse_entries(await redis.xrange(Keys(prefix).events))
        assert len(entries) == 121
        for n, returned in enumerate(results):
            mine = [e for e in entries if e.event.eval_id_or_empty == f"t{n}"]
            assert [e.id for e in mine] == returned
            attempts = [e.event.attempt for e in mine if isinstance(e.event, ev.TaskDispatched)]
            assert attempts == [1, 2, 3]
    finally:
        await store.stop()
        await redis.aclose()


async def test_an_append_while_redis_is_down_is_held_until_it_is_back(tmp_path, prefix) -> None:
    server = RedisServer(directory=str(tmp_path), appendonly=True, appendfsync="always").start()
    redis = await open_redis(server.url)
    store = EventStore(redis, Keys(prefix), "w1")
    await store.start()
    try:
        await store.append(dispatched("before", 1))
        server.kill()
        held = asyncio.create_task(store.append(dispatched("during", 1), dispatched("during", 2)))
        await asyncio.sleep(0.5)
        assert not held.done()
        assert store.held == 2 and store.available is False
        server.start()
        ids = await asyncio.wait_for(held, timeout=20)
        assert len(ids) == 2 and store.available is True
        entries = parse_entries(await redis.xrange(Keys(prefix).events))
        events = [e.event for e in entries if isinstance(e.event, ev.TaskDispatched)]
        assert len(events) == len(entries)
        assert [(e.eval_id, e.attempt) for e in events] == [
            ("before", 1),
            ("during", 1),
            ("during", 2),
        ]
    finally:
        await store.stop(timeout_s=1)
        await redis.aclose()
        server.close()
