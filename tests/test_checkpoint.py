"""Checkpoints of the status view: a start folds only what follows the latest one, gets the
view a full fold gives, ignores (and records) a checkpoint it cannot use, and keeps the
counters exact after retention trimmed the entries they came from. Real Redis and worker.
"""

from __future__ import annotations

from typing import Any

import msgspec

from queue_worker.devstack.serve import Server
from queue_worker.http.app import create_app
from queue_worker.http.state import STATUS
from queue_worker.streams import events as ev
from queue_worker.streams.checkpoint import CHECKPOINT_VERSION, Checkpoint
from queue_worker.streams.keys import Keys
from queue_worker.streams.store import EventStore
from queue_worker.streams.tail import TailProjector
from queue_worker.streams.views import StatusView, fold
from tests.harness import Stack, eventually


def _status(stack: Stack) -> TailProjector:
    assert stack.worker is not None
    return stack.worker.app[STATUS]


def _same(view: StatusView, other: StatusView) -> bool:
    return msgspec.json.encode(view) == msgspec.json.encode(other)


async def _caught_up(stack: Stack) -> bool:
    entries = await stack.entries()
    return _same(_status(stack).view, fold(entries))


async def test_a_start_folds_only_what_follows_the_checkpoint(stack_factory) -> None:
    stack: Stack = await stack_factory(checkpoint_every=20)
    await stack.enqueue_many(10)
    await stack.wait_terminal(10)
    await eventually(lambda: _status(stack).checkpoints_saved > 0)
    saved = await stack.redis.hget(stack.store.keys.checkpoint, "id")  # type: ignore[misc]
    assert saved is not None
    await stack.stop_worker()
    await stack.start_worker()
    status = _status(stack)
    assert status.checkpoint_loaded is not None
    total = len(await stack.entries())
    assert status.replay_events < total  # not the whole stream
    await eventually(lambda: _caught_up(stack))  # the same view a full fold gives
    _, body = await stack.get_json("/status")
    assert body["counters"]["completed"] == 10


async def _restart_with(stack: Stack, fields: dict[str, Any]) -> ev.CheckpointIgnored:
    await stack.stop_worker()
    before = (await stack.entries())[-1].id
    await stack.redis.hset(stack.store.keys.checkpoint, mapping=fields)  # type: ignore[misc]
    await stack.start_worker()
    assert _status(stack).checkpoint_loaded is None
    await eventually(lambda: _caught_up(stack))  # folded in full instead
    [found] = [
        e.event
        for e in await stack.entries()
        if e.id > before and isinstance(e.event, ev.CheckpointIgnored)
    ]
    return found


async def test_a_checkpoint_that_cannot_be_used_is_ignored_and_recorded(stack_factory) -> None:
    stack: Stack = await stack_factory(checkpoint_every=1_000_000)
    await stack.enqueue_many(3)
    await stack.wait_terminal(3)
    garbage = await _restart_with(stack, {"id": "1-0", "view": b"\xc1not msgpack"})
    assert "cannot be decoded" in garbage.reason and garbage.checkpoint_id == "1-0"
    entries = await stack.entries()
    view = fold(entries)
    older = msgspec.msgpack.encode(Checkpoint(CHECKPOINT_VERSION + 1, view.last_id or "", view))
    other = await _restart_with(stack, {"id": view.last_id, "view": older})
    assert f"schema version {CHECKPOINT_VERSION + 1}" in other.reason
    ahead = msgspec.structs.replace(view)
    ahead.last_id = "99999999999999-0"
    future = msgspec.msgpack.encode(Checkpoint(CHECKPOINT_VERSION, "99999999999999-0", ahead))
    lost = await _restart_with(stack, {"id": "99999999999999-0", "view": future})
    assert "past the stream's end" in lost.reason


async def test_counters_stay_exact_after_retention_trims(stack_factory) -> None:
    stack: Stack = await stack_factory(
        checkpoint_every=1_000_000, stream_maxlen=20, retention_interval_s=0.1
    )
    await stack.enqueue_many(20)
    await stack.wait_terminal(20)
    await eventually(lambda: _trimmed(stack, 60))  # ~6 entries a task: most are gone
    await stack.stop_worker()
    await stack.start_worker()
    assert _status(stack).checkpoint_loaded is not None
    _, body = await stack.get_json("/status")
    assert body["counters"]["completed"] == 20
    assert body["counters"]["pulled"] == 20


async def _trimmed(stack: Stack, below: int) -> bool:
    length: int = await stack.redis.xlen(stack.store.keys.events)
    return length < below


async def test_health_says_replaying_while_the_stream_is_folded(stack_factory, prefix) -> None:
    stack: Stack = await stack_factory(start_worker=False, checkpoint_every=0)
    store = EventStore(stack.redis, Keys(prefix), "earlier-worker")
    url = stack.executors[0].url
    for batch in range(12):  # 48,000 entries: a fold long enough to be seen
        events: list[ev.Event] = []
        for i in range(1000):
            eval_id = f"old-{batch:02d}-{i:04d}"
            events += [
                ev.TaskDispatched(eval_id=eval_id, executor=url, attempt=1, timeout_s=1.0),
                ev.TaskCompleted(
                    eval_id=eval_id, executor=url, attempt=1, result={}, duration_ms=1.0
                ),
                ev.TaskReported(eval_id=eval_id, outcome="completed", http_status=200),
                ev.PullStarted(pull_id=eval_id),
            ]
        await store.append(*events)
    worker = Server(create_app(stack.settings))
    await worker.start()  # serves at once; the fold runs in its loop
    stack.worker = worker
    seen: list[tuple[int, list[str]]] = []

    async def healthy() -> bool:
        status, body = await stack.get_json("/health")
        seen.append((status, body.get("reasons", [])))
        return status == 200

    await eventually(healthy, timeout_s=60, interval_s=0.005)
    replaying = [r for status, reasons in seen if status == 503 for r in reasons]
    assert any(r.startswith("replaying the event stream") for r in replaying), seen[:3]
    _, body = await stack.get_json("/status")
    earlier = {m["worker_id"]: m for m in body["fleet"]}["earlier-worker"]
    assert earlier["counters"]["completed"] == 12_000  # folded before it served "healthy"
