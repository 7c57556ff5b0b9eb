"""The status view folds this process's own appends as they land and reads back only
others' entries, yet always ends as the fold of ``XRANGE``, whatever the interleaving."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from queue_worker.http.state import STATUS
from queue_worker.streams import events as ev
from queue_worker.streams.connection import RedisClient, open_redis
from queue_worker.streams.entries import parse_entries
from queue_worker.streams.keys import Keys
from queue_worker.streams.store import EventStore
from queue_worker.streams.tail import TailProjector
from queue_worker.streams.views import StatusView, fold
from tests.harness import Stack

EXECUTORS = ("http://x1:8083", "http://x2:8083")


def _as_data(view: StatusView) -> Any:
    return msgspec.to_builtins(view)


async def _stream_fold(redis: RedisClient, keys: Keys) -> StatusView:
    return fold(parse_entries(await redis.xrange(keys.events)))


async def _caught_up(projector: TailProjector, redis: RedisClient, keys: Keys) -> None:
    newest = await redis.xrevrange(keys.events, count=1)
    await projector.wait_folded(newest[0][0].decode(), timeout_s=10)


class Writer:
    """One writer's plausible history: its own tasks, and moves on shared state."""

    def __init__(self, store: EventStore, name: str, rnd: random.Random) -> None:
        self.store, self.name, self.rnd = store, name, rnd
        self.tasks: list[str] = []
        self.n = 0

    def events(self, kind: str) -> list[ev.Event]:
        rnd = self.rnd
        executor = rnd.choice(EXECUTORS)
        if kind == "task":
            self.n += 1
            eval_id = f"{self.name}-{self.n}"
            self.tasks.append(eval_id)
            task = ev.Task(eval_id=eval_id, code="print(1)")
            pull = f"{eval_id}-pull"
            return [
                ev.PullStarted(pull_id=pull),
                ev.TaskPulled(eval_id=eval_id, pull_id=pull, task=task, code_bytes=8),
                ev.ExecutorSelected(
                    eval_id=eval_id,
                    executor=executor,
                    attempt=1,
                    strategy="least_loaded",
                    candidates=[],
                ),
                ev.TaskDispatched(eval_id=eval_id, executor=executor, attempt=1, timeout_s=5.0),
            ]
        if kind == "finish" and self.tasks:
            eval_id = self.tasks.pop(rnd.randrange(len(self.tasks)))
            if rnd.random() < 0.5:
                return [
                    ev.TaskCompleted(
                        eval_id=eval_id,
                        executor=executor,
                        attempt=1,
                        result={"output": "1"},
                        duration_ms=rnd.uniform(1, 50),
                    )
                ]
            return [
                ev.TaskFailed(
                    eval_id=eval_id, executor=executor, attempt=1, reason="boom", error="boom"
                )
            ]
        if kind == "health":
            healthy = rnd.random() < 0.5
            return [ev.ExecutorHealthChanged(executor=executor, healthy=healthy, reason=kind)]
        if kind == "pause":
            if rnd.random() < 0.5:
                return [ev.ControlPaused(scope="fleet", by=self.name, reason="maintenance")]
            return [ev.ControlResumed(scope="fleet", by=self.name, reason="done")]
        if kind == "drain":
            return [ev.ExecutorDrained(executor=executor, by=self.name, reason="patching")]
        return [ev.PullClosed(pull_id=f"{self.name}-idle-{rnd.random()}", reason="empty")]


KINDS = ("task", "task", "finish", "health", "pause", "drain", "idle")


async def _scenario(
    redis_url: str, ops: list[tuple[int, str, int, int]], seed: int
) -> tuple[TailProjector, StatusView]:
    redis = await open_redis(redis_url)
    keys = Keys(f"fold-{uuid.uuid4().hex[:12]}")
    mine, theirs = EventStore(redis, keys, "A"), EventStore(redis, keys, "B")
    projector = TailProjector(mine, block_ms=50, batch=3, linger_ms=0)
    rnd = random.Random(seed)
    writers = [Writer(mine, "A", rnd), Writer(theirs, "B", rnd)]
    await mine.start()
    await theirs.start()
    running = asyncio.create_task(projector.run())
    try:
        await projector.replayed.wait()
        for who, kind, burst, pause in ops:
            writer = writers[who]
            appends: list[Awaitable[list[str]]] = []
            for _ in range(burst):  # a burst: both writers at once, group-committed
                for w in (writer, writers[1 - who]) if burst > 1 else (writer,):
                    appends.append(w.store.append(*w.events(kind)))
            await asyncio.gather(*appends)
            if pause:
                await asyncio.sleep(pause / 1000)
        await _caught_up(projector, redis, keys)
        return projector, await _stream_fold(redis, keys)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await mine.stop()
        await theirs.stop()
        await redis.aclose()


async def test_a_write_after_anothers_entry_is_folded_in_its_place(redis_url: str) -> None:
    redis = await open_redis(redis_url)
    keys = Keys(f"fold-{uuid.uuid4().hex[:12]}")
    mine, theirs = EventStore(redis, keys, "A"), EventStore(redis, keys, "B")
    projector = TailProjector(mine, block_ms=50, linger_ms=0)
    x = EXECUTORS[0]
    try:
        await projector.replay()  # folded up to the (empty) stream; no read running yet
        await mine.append(ev.ExecutorHealthChanged(executor=x, healthy=True, reason="up"))
        assert projector.folded_as_written == 1  # folded as written: nothing in between
        assert projector.view.executors[x].healthy is True
        await theirs.append(ev.ExecutorHealthChanged(executor=x, healthy=False, reason="down"))
        await mine.append(ev.ExecutorHealthChanged(executor=x, healthy=True, reason="up again"))
        # Another writer's entry came in between: ours waits for the read, in its place.
        assert projector.folded_as_written == 1
        assert projector.view.executors[x].health_reason == "up"
        running = asyncio.create_task(projector.run())
        try:
            await _caught_up(projector, redis, keys)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
        assert (projector.folded_parked, projector.read_back) == (1, 1)
        assert projector.view.executors[x].health_reason == "up again"
        assert _as_data(projector.view) == _as_data(await _stream_fold(redis, keys))
    finally:
        await redis.aclose()


async def test_alone_its_own_entries_are_never_read_back(redis_url: str) -> None:
    projector, folded = await _scenario(
        redis_url, [(0, "task", 1, 0)] * 20 + [(0, "finish", 1, 1)] * 20, 7
    )
    assert projector.read_back == 0
    assert projector.folded_as_written == projector.view.events > 0
    assert _as_data(projector.view) == _as_data(folded)


OPS = st.lists(
    st.tuples(
        st.integers(0, 1),  # who writes
        st.sampled_from(KINDS),
        st.integers(1, 3),  # a burst of > 1: both writers at once
        st.sampled_from((0, 0, 1, 3)),  # ms to wait after it (the read gets in or not)
    ),
    min_size=1,
    max_size=40,
)


def test_the_live_view_is_the_fold_of_the_stream_after_any_interleaving(redis_url: str) -> None:
    seen = {"as_written": 0, "parked": 0, "read_back": 0}

    @settings(max_examples=40, deadline=None, database=None)
    @given(ops=OPS, seed=st.integers(0, 2**32))
    def interleaving(ops: list[tuple[int, str, int, int]], seed: int) -> None:
        projector, folded = asyncio.run(_scenario(redis_url, ops, seed))
        assert _as_data(projector.view) == _as_data(folded)
        seen["as_written"] += projector.folded_as_written
        seen["parked"] += projector.folded_parked
        seen["read_back"] += projector.read_back

    interleaving()
    # The examples went through every path: folded as written, parked, and read back.
    assert all(seen.values()), seen


async def test_a_running_worker_reads_back_almost_nothing_of_its_own(
    stack_factory: Callable[..., Awaitable[Stack]],
) -> None:
    """End to end, one worker: its status view is the stream's fold, and it got there
    without decoding its own entries from reads."""
    stack = await stack_factory(executor_capacity=4)
    await stack.enqueue_many(60)
    await stack.wait_terminal(60)
    await stack.wait_messages(60)
    assert stack.worker is not None
    projector = stack.worker.app[STATUS]
    redis = projector.store.redis
    await _caught_up(projector, redis, projector.store.keys)
    status, body = await stack.get_json("/status")
    assert status == 200
    live = body["live"]
    assert live["folded_as_written"] >= 60 * 5  # pulled, selected, dispatched, done, reported
    # What the read decodes: entries written during the replay at start, and ones whose
    # write's reply lost the race by more than OWN_REPLY_WAIT_S; none here.
    assert live["read_back"] <= 5, live
    assert _as_data(projector.view) == _as_data(await _stream_fold(redis, projector.store.keys))


async def test_a_failure_to_fold_a_write_is_raised_by_the_loop_not_swallowed(
    redis_url: str,
) -> None:
    """The append that landed succeeds; the projector's loop raises (its supervisor records
    the crash and restarts it) instead of running on with a view that missed an entry."""
    redis = await open_redis(redis_url)
    keys = Keys(f"fold-{uuid.uuid4().hex[:12]}")
    store = EventStore(redis, keys, "A")

    def observe(entry: ev.Entry) -> None:
        if isinstance(entry.event, ev.ControlPaused):
            raise ValueError("observer bug")

    projector = TailProjector(store, block_ms=50, linger_ms=0, on_entry=[observe])
    try:
        await projector.replay()
        running = asyncio.create_task(projector.run())
        ids = await store.append(ev.ControlPaused(scope="fleet", by="t", reason="r"))
        assert len(ids) == 1  # recorded all the same
        with pytest.raises(RuntimeError, match="observer bug"):
            async with asyncio.timeout(5):
                await running
    finally:
        await redis.aclose()
