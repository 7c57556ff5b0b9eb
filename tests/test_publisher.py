"""The publisher on a real Redis: one message per terminal event, acknowledged atomically."""

from __future__ import annotations

import asyncio

import msgspec
import redis.asyncio as aioredis

from queue_worker.streams import events as ev
from queue_worker.streams.keys import Keys
from queue_worker.streams.publisher import Publisher
from queue_worker.streams.store import EventStore
from tests.harness import eventually


async def test_publishes_terminal_events_once_and_acks_everything(
    redis_url: str, prefix: str
) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    store = EventStore(redis, Keys(prefix), "w")
    pubsub = redis.pubsub()
    await pubsub.subscribe("evaluation:completed", "evaluation:failed")
    received: list[tuple[str, dict[str, object]]] = []

    async def listen() -> None:
        async for msg in pubsub.listen():
            if msg["type"] == "message":
                received.append((msg["channel"].decode(), msgspec.json.decode(msg["data"])))

    listener = asyncio.create_task(listen())
    publisher = Publisher(store, "publisher", "c1", block_ms=50)
    runner = asyncio.create_task(publisher.run())
    try:
        result = {"status": "completed", "output": "ok", "exit_code": 0}
        await store.append(
            ev.PullStarted(pull_id="p"),
            ev.TaskCompleted(eval_id="a", executor="x", attempt=1, result=result, duration_ms=1),
            ev.TaskFailed(eval_id="b", attempt=1, reason="r", error="boom"),
            ev.TaskRejected(pull_id="p", eval_id="c", reason="bad", excerpt="{}"),
            ev.TaskRejected(pull_id="p", reason="not JSON", excerpt="<"),
        )
        await eventually(lambda: len(received) == 3)
        await asyncio.sleep(0.2)
        assert received == [
            ("evaluation:completed", {"eval_id": "a", "result": result}),
            ("evaluation:failed", {"eval_id": "b", "error": "boom", "result": None}),
            ("evaluation:failed",
             {"eval_id": "c", "error": "invalid task payload: bad", "result": None}),
        ]  # fmt: skip
        assert publisher.published == 3
        summary = await redis.xpending(store.keys.events, "publisher")
        assert summary["pending"] == 0  # every entry, published or not, is acknowledged
        info = {g["name"]: g for g in await store.info_groups()}
        assert info["publisher"]["entries-read"] == 5
    finally:
        for task in (runner, listener):
            task.cancel()
        await asyncio.gather(runner, listener, return_exceptions=True)
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await redis.aclose()
