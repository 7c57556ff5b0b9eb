"""``queue-worker demo``: the whole stack in one process, on loopback.

A private redis-server, the reference queue, three simulated executors and
the worker; it enqueues sample tasks, shows progress, then prints a summary
and the event history of one evaluation.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import msgspec
import redis.asyncio as aioredis

from queue_worker.config import Settings
from queue_worker.devstack.executor import create_executor_app
from queue_worker.devstack.queue import QUEUE_STATE, create_queue_app
from queue_worker.devstack.redis import RedisServer
from queue_worker.devstack.serve import Server
from queue_worker.http.app import create_app
from queue_worker.streams.audit import format_history, history
from queue_worker.streams.keys import COMPLETED_CHANNEL, FAILED_CHANNEL, Keys
from queue_worker.streams.store import EventStore


@dataclass
class DemoSummary:
    tasks: int
    completed: int = 0
    failed: int = 0
    messages: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    events: int = 0
    by_executor: Counter[str] = field(default_factory=Counter)

    @property
    def tasks_per_s(self) -> float:
        return self.tasks / self.seconds if self.seconds else 0.0


def sample_code(i: int) -> str:
    if i % 10 == 7:
        return "raise SystemExit('SIMULATE_FAIL')\n"
    return f"print(sum(range({i})))\n"


async def run_demo(
    tasks: int = 30,
    latency_ms: float = 200.0,
    capacity: int = 2,
    out: Callable[[str], None] = print,
) -> DemoSummary:
    redis_server = RedisServer().start()
    try:
        return await _run(redis_server, tasks, latency_ms, capacity, out)
    finally:
        redis_server.close()


async def _run(
    redis_server: RedisServer,
    tasks: int,
    latency_ms: float,
    capacity: int,
    out: Callable[[str], None],
) -> DemoSummary:
    out(f"redis-server {redis_server.binary} on {redis_server.url}")
    queue = Server(create_queue_app())
    executors = [
        Server(create_executor_app(f"executor-{i}", latency_s=latency_ms / 1000, seed=i))
        for i in (1, 2, 3)
    ]
    settings = Settings(
        queue_service_url=queue.url,
        redis_url=redis_server.url,
        executor_urls=tuple(x.url for x in executors),
        executor_capacity=capacity,
        hostname="demo-worker",
        poll_interval_s=0.2,
        health_interval_s=2.0,
        log_level="WARNING",
    )
    worker = Server(create_app(settings))
    summary = DemoSummary(tasks=tasks)
    redis = aioredis.Redis.from_url(redis_server.url)
    pubsub = redis.pubsub()
    await pubsub.subscribe(COMPLETED_CHANNEL, FAILED_CHANNEL)
    for server in (queue, *executors, worker):
        await server.start()
    out(f"queue {queue.url}; executors {', '.join(x.url for x in executors)}")
    out(f"worker {worker.url} (try {worker.url}/status while it runs)")
    try:
        async with aiohttp.ClientSession() as http:
            for i in range(tasks):
                body = {"eval_id": f"demo-{i:04d}", "code": sample_code(i), "timeout": 10}
                async with http.post(f"{queue.url}/tasks", json=body) as resp:
                    resp.raise_for_status()
            out(f"enqueued {tasks} tasks")
            started = time.perf_counter()
            state = queue.app[QUEUE_STATE]
            last_shown = -1
            while sum(summary.messages.values()) < tasks or _open(state.stats()):
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                if msg is not None:
                    summary.messages[msg["channel"].decode()] += 1
                done = sum(summary.messages.values())
                if done != last_shown and (done % 10 == 0 or done == tasks):
                    out(f"  progress: {done}/{tasks} evaluations finished")
                    last_shown = done
                if time.perf_counter() - started > 120:
                    out("  giving up after 120 s")
                    break
            summary.seconds = time.perf_counter() - started
            stats = state.stats()
            summary.completed, summary.failed = stats["completed"], stats["failed"]
            async with http.get(f"{worker.url}/status") as resp:
                status = msgspec.json.decode(await resp.read())
            for x in status["executors"]:
                summary.by_executor[x["url"]] = x["routed"]
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        for server in (worker, *executors, queue):
            await server.stop()
    store = EventStore(redis, Keys(settings.stream_prefix), settings.worker_id)
    summary.events = await store.length()
    failed_example = next((i for i in range(tasks) if "SIMULATE_FAIL" in sample_code(i)), 0)
    out("")
    out(f"summary: {tasks} tasks in {summary.seconds:.2f} s ({summary.tasks_per_s:.1f} tasks/s)")
    out(f"  queue:    {summary.completed} completed, {summary.failed} failed")
    out(
        f"  pub/sub:  {summary.messages[COMPLETED_CHANNEL]} evaluation:completed, "
        f"{summary.messages[FAILED_CHANNEL]} evaluation:failed"
    )
    out(f"  routed:   {', '.join(f'{u} {n}' for u, n in summary.by_executor.items())}")
    out(f"  stream:   {summary.events} events in {store.keys.events}")
    for eval_id in ("demo-0000", f"demo-{failed_example:04d}"):
        if eval_id < f"demo-{tasks:04d}":
            out("")
            out(format_history(eval_id, await history(store, eval_id)))
    await redis.aclose()
    return summary


def _open(stats: dict[str, int]) -> bool:
    return stats["queued"] + stats["running"] > 0


def main(tasks: int, latency_ms: float, capacity: int) -> int:
    summary = asyncio.run(run_demo(tasks, latency_ms, capacity))
    return 0 if summary.completed + summary.failed == tasks else 1
