"""The fault matrix: Redis in a container, faulted while tasks flow through a worker process.

Each fault (Redis killed and started again with its AOF, restarted empty, paused, out of
memory, turned read-only) is applied for a few seconds while 60 tasks flow through a
real worker process and three simulated executors; then Redis is put right. Each time:

* every task ends completed at the queue (none failed, none left running);
* no task is published twice (and, where the test's subscriber stays connected through
  the fault, every one is published);
* no task runs twice on an executor unless the queue had it running during the fault;
* the worker is never half-alive: every ``/health`` asked during the fault answers
  (within seconds) and at least one says 503 with a reason; afterwards the process is
  still running, ``/health`` and ``/health/live`` say 200.

docs/FAULTS.md describes each fault, what the worker does and what it guarantees.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
import pytest
import redis.asyncio as aioredis

from queue_worker.devstack.serve import free_port
from queue_worker.streams.keys import COMPLETED_CHANNEL, FAILED_CHANNEL
from tests.containers import RedisInContainer
from tests.harness import Stack, eventually, spawn_worker

TASKS = 60
FAULT_S = 3.0
HEALTH_TIMEOUT_S = 5.0


@dataclass
class Fault:
    apply: Callable[[RedisInContainer], None]
    undo: Callable[[RedisInContainer], None]
    keeps_subscribers: bool  # the subscriber's connection survives it
    resets: bool = False  # Redis comes back without the data


def _read_only(redis: RedisInContainer) -> None:
    with redis.client() as client:  # a replica of a master that is not there: read-only
        client.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))


def _writable(redis: RedisInContainer) -> None:
    with redis.client() as client:
        client.execute_command("REPLICAOF", "NO", "ONE")


def _noop(redis: RedisInContainer) -> None:
    return None


FAULTS = {
    "killed_and_back_with_aof": Fault(
        apply=lambda r: r.kill(), undo=lambda r: r.start(), keeps_subscribers=False
    ),
    "restarted_empty": Fault(
        apply=lambda r: r.restart_empty(), undo=_noop, keeps_subscribers=False, resets=True
    ),
    "paused": Fault(apply=lambda r: r.pause(), undo=lambda r: r.unpause(), keeps_subscribers=True),
    "out_of_memory": Fault(
        apply=lambda r: r.set_maxmemory(1),
        undo=lambda r: r.set_maxmemory(0),
        keeps_subscribers=True,
    ),
    "read_only": Fault(apply=_read_only, undo=_writable, keeps_subscribers=True),
}


@dataclass
class Listener:
    """A subscriber of evaluation:* that connects again after Redis went away."""

    url: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    reconnects: int = 0

    async def run(self, ready: asyncio.Event) -> None:
        while True:
            client = aioredis.Redis.from_url(self.url)
            try:
                pubsub = client.pubsub()
                await pubsub.subscribe(COMPLETED_CHANNEL, FAILED_CHANNEL)
                ready.set()
                async for msg in pubsub.listen():
                    if msg["type"] == "message":
                        self.messages.append(msgspec.json.decode(msg["data"]))
            except (aioredis.RedisError, OSError):
                self.reconnects += 1
                await asyncio.sleep(0.1)
            finally:
                with contextlib.suppress(aioredis.RedisError, OSError):
                    await client.aclose()


async def _health(http: aiohttp.ClientSession, base: str, path: str) -> tuple[int, Any]:
    timeout = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)
    async with http.get(f"{base}{path}", timeout=timeout) as resp:
        return resp.status, msgspec.json.decode(await resp.read())


def _running(stack: Stack) -> set[str]:
    return {t.eval_id for t in stack.queue_state.tasks.values() if t.status == "running"}


@pytest.mark.parametrize("name", sorted(FAULTS))
async def test_fault(name: str, redis_container: RedisInContainer, stack_factory) -> None:
    fault = FAULTS[name]
    stack: Stack = await stack_factory(
        redis=redis_container.url,
        start_worker=False,
        latency_s=0.2,
        executor_options=[{"capacity": 2}] * 3,
    )
    listener = Listener(redis_container.url)
    ready = asyncio.Event()
    listening = asyncio.create_task(listener.run(ready))
    await ready.wait()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = stack.process_env(
        "fault-worker",
        PORT=str(port),
        EXECUTOR_CAPACITY="2",
        QUEUE_LEASE_S="30",
        HEARTBEAT_INTERVAL_S="0.5",
        DEAD_AFTER_S="3",
        CLAIM_IDLE_MS="1000",
        SHUTDOWN_GRACE_S="2",
        LOG_LEVEL="ERROR",
    )
    worker = await spawn_worker(env)
    try:
        ids = await stack.enqueue_many(TASKS)
        await eventually(lambda: stack.terminal_in_queue() >= 15, 60)

        # The fault: meanwhile, /health is asked every 0.2 s and the queue watched.
        at_fault = _running(stack)
        healths: list[tuple[float, int, list[str]]] = []
        stop = asyncio.Event()

        async def watch() -> None:
            while not stop.is_set():
                at_fault.update(_running(stack))
                started = time.monotonic()
                status, body = await _health(stack.http, base, "/health")
                healths.append((time.monotonic() - started, status, body["reasons"]))
                await asyncio.sleep(0.2)

        watching = asyncio.create_task(watch())
        await asyncio.to_thread(fault.apply, redis_container)
        await asyncio.sleep(FAULT_S)
        await asyncio.to_thread(fault.undo, redis_container)
        stop.set()
        await watching
        at_fault.update(_running(stack))

        await stack.wait_terminal(TASKS, timeout_s=120)
        await eventually(lambda: _settled(listener, fault, TASKS), 60)
        await asyncio.sleep(1.0)  # any second message would arrive now

        # Never half-alive: every /health answered; at least one said why it cannot work.
        assert healths and all(seconds < HEALTH_TIMEOUT_S for seconds, _, _ in healths)
        down = [reasons for _, status, reasons in healths if status == 503]
        assert down and all(down), healths
        assert worker.returncode is None
        assert (await _health(stack.http, base, "/health"))[0] == 200
        assert (await _health(stack.http, base, "/health/live"))[0] == 200
    finally:
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
        if worker.returncode is None:
            worker.terminate()
            await asyncio.wait_for(worker.wait(), 30)

    # Every task ended once, completed, at the queue.
    assert {t.status for t in stack.queue_state.tasks.values()} == {"completed"}
    assert sorted(stack.queue_state.tasks) == sorted(ids)
    # Published at most once (and all of them, when the subscriber stayed connected).
    per_task = Counter(m["eval_id"] for m in listener.messages)
    assert set(per_task.values()) <= {1}, per_task.most_common(5)
    if fault.keeps_subscribers:
        assert set(per_task) == set(ids)
    # Executed at most once, unless the queue had it running during the fault.
    executions: Counter[str] = Counter()
    for i in range(3):
        executions.update(stack.executor_state(i).eval_ids)
    assert set(executions) == set(ids)
    twice = {eval_id for eval_id, n in executions.items() if n > 1}
    assert twice <= at_fault, (twice - at_fault, at_fault)
    types = Counter(e.event.type for e in await stack.entries())
    assert (types["stream.reset"] > 0) == fault.resets, types
    crashes = [e.event for e in await stack.entries() if e.event.type == "loop.crashed"]
    assert crashes == [], crashes


def _settled(listener: Listener, fault: Fault, n: int) -> bool:
    """Every task's message has come, or (a subscriber cut off by the fault may have missed
    some) at least the ones published after it reconnected."""
    seen = {m["eval_id"] for m in listener.messages}
    return len(seen) >= n if fault.keeps_subscribers else len(seen) > 0
