"""The publisher on a real Redis: one message per terminal event, acknowledged atomically."""

from __future__ import annotations

import asyncio
from typing import cast

import msgspec
import redis.asyncio as aioredis

from queue_worker.http.state import PUBLISHER, STATUS
from queue_worker.streams import events as ev
from queue_worker.streams.keys import Keys
from queue_worker.streams.publisher import Publisher
from queue_worker.streams.store import EventStore
from queue_worker.streams.views import StatusView
from tests.harness import Stack, eventually


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
        summary = await redis.xpending(store.keys.outcomes, "publisher")
        assert summary["pending"] == 0  # every entry, published or not, is acknowledged
        info = {g["name"]: g for g in await store.info_groups(store.keys.outcomes)}
        assert info["publisher"]["entries-read"] == 4  # the outcomes only
        assert "publisher" not in {g["name"] for g in await store.info_groups()}
    finally:
        for task in (runner, listener):
            task.cancel()
        await asyncio.gather(runner, listener, return_exceptions=True)
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await redis.aclose()


async def test_it_remembers_what_it_published_only_until_the_queue_acknowledged_it(
    redis_url: str, prefix: str
) -> None:
    """What a reset could re-record (outcomes the queue has not acknowledged) is kept; the
    rest is forgotten, so the memory follows the unreported outcomes, not the uptime."""
    redis = aioredis.Redis.from_url(redis_url)
    view = StatusView(last_id="5-0", unreported={"b": "completed"})
    publisher = Publisher(EventStore(redis, Keys(prefix), "w1"), "publisher", "w1", view=view)
    try:
        for eval_id, entry_id in (("a", "1-0"), ("b", "2-0"), ("c", "9-0")):
            publisher._remember(eval_id, entry_id)
        legacy = cast(Publisher, publisher.retiring())  # the main-stream hand-over shares it
        assert publisher.forget_acknowledged() == 1
        assert (
            legacy.recent is publisher.recent and legacy.recent_entries is publisher.recent_entries
        )
        # b: not acknowledged yet; c: its outcome is not folded into the view yet.
        assert publisher.recent == {"b": "2-0", "c": "9-0"}
        assert set(publisher.recent_entries) == {"2-0", "9-0"}
        assert publisher.was_published("b") and not publisher.was_published("a")
    finally:
        await redis.aclose()


async def test_a_running_worker_forgets_published_outcomes_once_reported(stack_factory) -> None:
    stack: Stack = await stack_factory(executor_capacity=4)
    await stack.enqueue_many(40)
    await stack.wait_terminal(40)
    await stack.wait_messages(40)
    assert stack.worker is not None
    publisher, view = stack.worker.app[PUBLISHER], stack.worker.app[STATUS].view
    await eventually(lambda: not view.unreported)  # every report folded

    def all_forgotten() -> bool:  # (the last message may reach us before it is remembered)
        publisher.forget_acknowledged()
        return publisher.published == 40 and not publisher.recent and not publisher.recent_entries

    await eventually(all_forgotten)
