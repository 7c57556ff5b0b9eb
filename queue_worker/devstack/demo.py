"""``queue-worker demo``: the whole stack in one process, on loopback.

A private redis-server, the reference queue, three simulated executors and
the worker; it enqueues sample tasks, shows progress, then prints a summary
and the event history of one evaluation. With ``keep`` it then leaves the stack
running with a trickle of tasks (one every ``TRICKLE_S``) and prints the
dashboard's address and an admin token for it. SIGTERM or SIGINT stop it, its
servers and its redis-server.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

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

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
TRICKLE_S = 0.5  # with keep: a new task this often


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
    keep: bool = False,
) -> DemoSummary:
    redis_server = RedisServer(die_with_parent=True).start()
    try:
        return await _run(redis_server, tasks, latency_ms, capacity, out, keep)
    finally:
        redis_server.close()


async def _run(
    redis_server: RedisServer,
    tasks: int,
    latency_ms: float,
    capacity: int,
    out: Callable[[str], None],
    keep: bool,
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
        admin_token=(("demo", token := secrets.token_urlsafe(18)),),
    )
    worker = Server(create_app(settings))
    summary = DemoSummary(tasks=tasks)
    redis = aioredis.Redis.from_url(redis_server.url)
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with aiohttp.ClientSession(headers=headers) as http:
            for server in (queue, *executors, worker):
                await server.start()
            out(f"queue {queue.url}; executors {', '.join(x.url for x in executors)}")
            out(f"worker {worker.url} (its API and dashboard take the admin token {token})")
            await _route(summary, redis, queue, worker, http, out)
            store = EventStore(redis, Keys(settings.stream_prefix), settings.worker_id)
            await _report(summary, store, out)
            if keep:
                out("")
                out(f"dashboard {worker.url}/dashboard (sign in with {token})")
                out(f"a new task every {TRICKLE_S:g} s; Ctrl+C stops the stack")
                await _trickle(http, queue.url, start=tasks)
    finally:
        await redis.aclose()
        for server in (worker, *executors, queue):
            await server.stop()
    return summary


async def _trickle(http: aiohttp.ClientSession, queue_url: str, start: int) -> None:
    """Enqueue a sample task every ``TRICKLE_S``, until cancelled."""
    for i in itertools.count(start):
        body = {"eval_id": f"demo-{i:04d}", "code": sample_code(i), "timeout": 10}
        async with http.post(f"{queue_url}/tasks", json=body) as resp:
            resp.raise_for_status()
        await asyncio.sleep(TRICKLE_S)


async def _route(
    summary: DemoSummary,
    redis: aioredis.Redis,
    queue: Server,
    worker: Server,
    http: aiohttp.ClientSession,
    out: Callable[[str], None],
) -> None:
    """Enqueue the tasks and wait for every outcome."""
    tasks = summary.tasks
    pubsub = redis.pubsub()
    try:
        await pubsub.subscribe(COMPLETED_CHANNEL, FAILED_CHANNEL)
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


async def _report(summary: DemoSummary, store: EventStore, out: Callable[[str], None]) -> None:
    tasks = summary.tasks
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


def _open(stats: dict[str, int]) -> bool:
    return stats["queued"] + stats["running"] > 0


async def _until_signalled(demo: Coroutine[Any, Any, DemoSummary]) -> DemoSummary | int:
    """Run ``demo``; SIGTERM or SIGINT cancel it (so it stops its servers and its
    redis-server) and the signal's number is returned instead of the summary."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(demo)
    received: list[int] = []

    def stop(signum: int) -> None:
        received.append(signum)
        task.cancel()

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop, signum)
    try:
        return await task
    except asyncio.CancelledError:
        if not received:
            raise
        return received[0]
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)


def main(tasks: int, latency_ms: float, capacity: int, keep: bool = False) -> int:
    outcome = asyncio.run(_until_signalled(run_demo(tasks, latency_ms, capacity, keep=keep)))
    if isinstance(outcome, int):
        print(f"demo stopped by {signal.Signals(outcome).name}", file=sys.stderr)
        return 0 if keep else 128 + outcome  # with --keep, a signal is how it ends
    return 0 if outcome.completed + outcome.failed == tasks else 1
