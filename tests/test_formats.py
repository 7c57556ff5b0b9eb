"""A worker does not work beside live workers of another stream format (an earlier
version): it waits, says so in /health, and goes on by itself once they are gone; on a
real Redis with the devstack queue and executors."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
import pytest
import redis.asyncio as aioredis

from queue_worker import __version__
from queue_worker.http.state import STATUS
from queue_worker.router.formats import FormatGuard, Peer, peer_of
from queue_worker.streams.checkpoint import Checkpoint
from queue_worker.streams.connection import open_redis
from queue_worker.streams.fleet_events import WorkerStarted
from queue_worker.streams.keys import STREAM_FORMAT, Keys
from queue_worker.streams.store import EventStore
from queue_worker.streams.views import StatusView, WorkerView
from tests.harness import Stack, eventually

LEGACY_GROUPS = {"publisher", "reporter", "index"}  # what format 1 read on the main stream
FAST = {"heartbeat_interval_s": 0.1, "retention_interval_s": 0.1}


@pytest.mark.parametrize(
    ("alive", "recorded", "peer"),
    [
        (b"0.1.0", None, Peer("w", 1, "0.1.0")),
        (b"0.1.0", b"2 0.2.0", Peer("w", 1, "0.1.0")),  # the key's value decides
        (b"7", f"{STREAM_FORMAT} {__version__}".encode(), None),
        (b"7", None, None),  # no format recorded: taken for ours
        (b"7", b"3 0.3.0", Peer("w", 3, "0.3.0")),
        (b"7", b"junk", Peer("w", 0, "unknown")),
    ],
)
def test_a_liveness_key_tells_the_format_of_its_worker(
    alive: bytes, recorded: bytes | None, peer: Peer | None
) -> None:
    assert peer_of("w", alive, recorded) == peer


def test_the_alive_pattern_takes_the_prefix_literally() -> None:
    assert Keys("queue-worker").alive_pattern == "{queue-worker}:alive:*"
    assert Keys("a*b?[c]").alive_pattern == r"{a\*b\?\[c\]}:alive:*"


async def _health(stack: Stack) -> tuple[int, Any]:
    return await stack.get_json("/health")


async def test_a_worker_waits_while_a_worker_of_the_earlier_version_is_alive(
    stack_factory: Any,
) -> None:
    stack: Stack = await stack_factory(start_worker=False)
    keys, redis = stack.store.keys, stack.redis
    for group in LEGACY_GROUPS:  # as the earlier version left them
        await redis.xgroup_create(keys.events, group, id="$", mkstream=True)
    # A worker of the earlier version: its liveness key holds its package version.
    await redis.set(keys.alive("old-1"), "0.1.0", px=60_000)
    await stack.enqueue_many(3)
    await stack.start_worker(**FAST)

    async def waiting() -> Any:
        status, body = await _health(stack)
        reasons = [r for r in body["reasons"] if "incompatible version" in r]
        return reasons[0] if status == 503 and reasons else None

    reason = await eventually(waiting)
    assert "old-1 (0.1.0, stream format 1)" in reason
    assert "stop them" in reason and "docs/OPERATIONS.md" in reason
    live_status, live = await stack.get_json("/health/live")
    assert (live_status, live["status"]) == (200, "alive")
    # Several looks later: nothing pulled, nothing recovered, the groups kept.
    await asyncio.sleep(1.0)
    assert stack.queue_state.stats()["queued"] == 3
    types = {e.event.type for e in await stack.entries()}
    assert not types & {"task.pulled", "worker.started", "pull.started"}
    assert {g["name"] for g in await stack.store.info_groups()} == LEGACY_GROUPS
    assert (await _health(stack))[0] == 503

    # The earlier worker stops (its key is deleted, or expires): this one goes on.
    await redis.delete(keys.alive("old-1"))
    await stack.wait_terminal(3, timeout_s=30)
    assert stack.queue_state.stats()["completed"] == 3

    async def handed_over() -> bool:
        return not {g["name"] for g in await stack.store.info_groups()}

    await eventually(handed_over)

    async def healthy() -> bool:
        status, body = await _health(stack)
        return status == 200 and not body["reasons"]

    await eventually(healthy)
    await stack.wait_event("worker.started")


async def test_a_live_peer_of_this_version_does_not_hold_a_worker_back(
    stack_factory: Any,
) -> None:
    stack: Stack = await stack_factory(start_worker=False)
    keys, redis = stack.store.keys, stack.redis
    # A peer of this version: its generation in its liveness key, its format recorded.
    await redis.set(keys.alive("peer-1"), "4", px=60_000)
    await redis.hset(keys.formats, "peer-1", f"{STREAM_FORMAT} {__version__}")  # type: ignore[misc]
    await stack.enqueue_many(3)
    await stack.start_worker(**FAST)
    await stack.wait_terminal(3, timeout_s=30)
    _, body = await _health(stack)
    assert not [r for r in body["reasons"] if "incompatible" in r or "looking for" in r]
    # This worker recorded its own format where peers read it; a clean stop removes it.
    own = stack.settings.worker_id
    assert await redis.hget(keys.formats, own) == f"{STREAM_FORMAT} {__version__}".encode()  # type: ignore[misc]
    await stack.stop_worker()
    assert await redis.hget(keys.formats, own) is None  # type: ignore[misc]
    assert await redis.hget(keys.formats, "peer-1") is not None  # type: ignore[misc]


async def test_a_peer_recorded_with_another_format_holds_a_worker_back(
    stack_factory: Any,
) -> None:
    stack: Stack = await stack_factory(start_worker=False)
    keys, redis = stack.store.keys, stack.redis
    await redis.set(keys.alive("later-1"), "9", px=60_000)
    await redis.hset(keys.formats, "later-1", f"{STREAM_FORMAT + 1} 9.0.0")  # type: ignore[misc]
    await stack.enqueue_many(2)
    await stack.start_worker(**FAST)

    async def reason() -> str | None:
        status, body = await _health(stack)
        found = [r for r in body["reasons"] if "incompatible version" in r]
        return found[0] if status == 503 and found else None

    text = await eventually(reason)
    assert f"later-1 (9.0.0, stream format {STREAM_FORMAT + 1})" in text
    await asyncio.sleep(0.5)
    assert stack.queue_state.stats()["queued"] == 2
    # Its key expires (it was stopped without a clean stop): this worker goes on.
    await redis.pexpire(keys.alive("later-1"), 1)
    await stack.wait_terminal(2, timeout_s=30)


def _earlier_worker_started(worker_id: str, executors: list[str]) -> dict[str, Any]:
    """A ``worker.started`` entry's fields as the earlier version (0.1.x) wrote them:
    no generation, and no ``stream_format`` in its data."""
    data = {"type": "worker.started", "v": 1, "version": "0.1.0", "executors": executors,
            "strategy": "least_loaded", "capacity": 2}  # fmt: skip
    return {"type": "worker.started", "eval_id": "", "worker_id": worker_id,
            "ts": str(int(time.time() * 1000)), "data": msgspec.json.encode(data)}  # fmt: skip


async def test_a_worker_of_the_earlier_version_started_later_stops_the_pulling(
    stack_factory: Any,
) -> None:
    stack: Stack = await stack_factory(start_worker=False)
    keys, redis = stack.store.keys, stack.redis
    await stack.start_worker(**FAST)
    await stack.enqueue_many(2, prefix="before")
    await stack.wait_terminal(2, timeout_s=30)  # working, the start-up look long clear
    # A worker of the earlier version starts: its liveness key, then its worker.started.
    await redis.set(keys.alive("old-late"), "0.1.0", px=60_000)
    await redis.xadd(keys.events, _earlier_worker_started("old-late", ["http://x"]))  # type: ignore[arg-type]
    started = [e for e in await stack.entries() if e.worker_id == "old-late"]
    assert [e.event.type for e in started] == ["worker.started"]
    assert isinstance(started[0].event, WorkerStarted) and started[0].event.stream_format == 1

    async def waiting() -> Any:
        status, body = await _health(stack)
        reasons = [r for r in body["reasons"] if "incompatible version" in r]
        return reasons[0] if status == 503 and reasons else None

    reason = await eventually(waiting, timeout_s=10)
    assert "old-late (0.1.0, stream format 1)" in reason and "stop them" in reason
    live_status, live = await stack.get_json("/health/live")
    assert (live_status, live["status"]) == (200, "alive")
    # A long poll asked before it was seen may still bring a task: let it end first.
    await asyncio.sleep(stack.settings.queue_wait_s + 0.5)
    await stack.enqueue_many(3, prefix="after")
    await asyncio.sleep(1.5)
    assert stack.queue_state.stats()["queued"] == 3
    assert (await _health(stack))[0] == 503
    # Its key goes (it stopped, or it died): this worker goes on by itself.
    await redis.delete(keys.alive("old-late"))
    await stack.wait_terminal(5, timeout_s=30)

    async def healthy() -> bool:
        status, body = await _health(stack)
        return status == 200 and not body["reasons"]

    await eventually(healthy)
    starts = [e for e in await stack.entries() if e.event.type == "worker.started"]
    assert len(starts) == 2  # not started again (nor the hand-over run again)


async def test_a_peer_of_this_format_started_later_does_not_stop_the_pulling(
    stack_factory: Any,
) -> None:
    stack: Stack = await stack_factory(start_worker=False)
    keys, redis = stack.store.keys, stack.redis
    worker = await stack.start_worker(**FAST)
    await stack.enqueue_many(2, prefix="before")
    await stack.wait_terminal(2, timeout_s=30)
    await redis.set(keys.alive("peer-late"), "4", px=60_000)
    peer = EventStore(redis, keys, "peer-late")
    await peer.append(WorkerStarted(version=__version__, executors=[], strategy="least_loaded",
                                    capacity=2, stream_format=STREAM_FORMAT))  # fmt: skip
    view = worker.app[STATUS].view
    await eventually(lambda: "peer-late" in view.workers)
    workers = view.workers
    assert workers["peer-late"].stream_format == STREAM_FORMAT
    assert workers[stack.settings.worker_id].stream_format == STREAM_FORMAT  # written by it
    await stack.enqueue_many(3, prefix="after")
    await stack.wait_terminal(5, timeout_s=30)
    _, body = await _health(stack)
    assert not [r for r in body["reasons"] if "incompatible" in r]


def test_a_checkpoint_from_before_stream_format_loads_as_format_1() -> None:
    view = StatusView()
    view.workers["old"] = WorkerView(version="0.1.0", running=True, stream_format=7)
    view.last_id = "1-0"
    raw = msgspec.msgpack.decode(msgspec.msgpack.encode(Checkpoint(1, "1-0", view)))
    del raw["view"]["workers"]["old"]["stream_format"]  # as a checkpoint saved before it
    loaded = msgspec.msgpack.Decoder(Checkpoint).decode(msgspec.msgpack.encode(raw))
    assert loaded.view.workers["old"].stream_format == 1
    assert loaded.view.workers["old"].version == "0.1.0"


@pytest.mark.parametrize("on", ["single", "cluster"])
async def test_the_look_finds_workers_of_another_format_on_a_cluster_too(
    request: pytest.FixtureRequest, prefix: str, on: str
) -> None:
    url = request.getfixturevalue("redis_url" if on == "single" else "cluster_url")
    redis = await open_redis(url)
    keys = Keys(prefix)
    guard = FormatGuard(EventStore(redis, keys, "me"), interval_s=0.05)
    try:
        assert isinstance(redis, aioredis.RedisCluster) == (on == "cluster")
        await redis.set(keys.alive("me"), "3", px=60_000)  # its own key is not a peer
        await redis.set(keys.alive("same"), "5", px=60_000)
        await redis.set(Keys(prefix + "-other").alive("elsewhere"), "0.1.0", px=60_000)
        assert await guard.check() and guard.clear.is_set() and guard.problem() is None
        guard.clear.clear()
        for i in range(3):
            await redis.set(keys.alive(f"old-{i}"), "0.1.0", px=60_000)
        assert not await guard.check()
        assert guard.peers == tuple(Peer(f"old-{i}", 1, "0.1.0") for i in range(3))
        problem = guard.problem() or ""
        assert "old-0 (0.1.0, stream format 1), old-1 (0.1.0, stream format 1)" in problem
        runner = asyncio.create_task(guard.run())
        await asyncio.sleep(0.2)
        assert not runner.done()
        await redis.delete(*(keys.alive(f"old-{i}") for i in range(3)))
        await asyncio.wait_for(runner, 5)
        assert guard.clear.is_set() and guard.peers == ()
    finally:
        await redis.aclose()


async def test_without_scan_the_look_asks_the_workers_the_stream_names(
    redis_url: str, prefix: str
) -> None:
    admin = await open_redis(redis_url)
    user = f"noscan-{prefix}"
    await admin.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "&*", "+@all", "-scan")
    parts = urlsplit(redis_url)
    limited = await open_redis(urlunsplit(parts._replace(netloc=f"{user}:pw@{parts.netloc}")))
    keys = Keys(prefix)
    named: list[str] = ["me", "old-1", "gone"]

    async def known() -> list[str]:
        return named

    try:
        await admin.set(keys.alive("old-1"), "0.1.0", px=60_000)
        await admin.set(keys.alive("elsewhere"), "0.1.0", px=60_000)  # the stream names it not
        guard = FormatGuard(EventStore(limited, keys, "me"), interval_s=0.05, known=known)
        assert not await guard.check()
        assert guard.peers == (Peer("old-1", 1, "0.1.0"),)
        assert guard.scan_denied is not None and "scan" in guard.scan_denied.lower()
        await admin.delete(keys.alive("old-1"))
        assert await guard.check() and guard.clear.is_set()
        # With nothing to ask instead, the refusal is what /health shows, and it waits.
        blind = FormatGuard(EventStore(limited, keys, "me"), interval_s=0.05)
        assert not await blind.check()
        assert "scan" in (blind.problem() or "").lower() and not blind.clear.is_set()
    finally:
        await admin.delete(keys.alive("elsewhere"))
        await admin.execute_command("ACL", "DELUSER", user)
        await limited.aclose()
        await admin.aclose()
