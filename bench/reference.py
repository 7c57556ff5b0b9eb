"""What the two reference routers (``bench.baseline``, ``bench.ceiling``) share.

The wire protocol exactly as the worker speaks it (``GET /tasks/next``,
``POST /execute``, ``POST /tasks/{id}/complete|fail``, ``PUBLISH
evaluation:completed|failed``) with the same bodies and messages, and the
child-process protocol of ``bench.run``: print ``{"ready": true}``, wait for
one line on stdin, route until the queue is empty, the task limit or the
deadline, then print a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec
import redis.asyncio as aioredis

from bench.common import emit
from queue_worker.streams.keys import COMPLETED_CHANNEL, FAILED_CHANNEL

_encode = msgspec.json.encode


class QueueTask(msgspec.Struct):
    eval_id: str
    code: str
    timeout: float | None = None


_task = msgspec.json.Decoder(QueueTask | None)


@dataclass
class Tally:
    routed: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    health_checks: int = 0
    stopped_by: str = "empty_queue"


@dataclass
class Protocol:
    """The HTTP and Redis calls of one router; no retries, no event log."""

    http: aiohttp.ClientSession
    redis: aioredis.Redis
    queue_url: str
    tally: Tally = field(default_factory=Tally)

    async def pull(self) -> QueueTask | None:
        async with self.http.get(f"{self.queue_url}/tasks/next") as resp:
            body = await resp.read()
            resp.raise_for_status()
        task: QueueTask | None = _task.decode(body)
        return task

    async def healthy(self, executor_url: str, timeout_s: float = 2.0) -> bool:
        """The seed's check: ``GET /health`` within 2 s answering ``status: healthy``."""
        self.tally.health_checks += 1
        try:
            async with self.http.get(
                f"{executor_url}/health", timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as resp:
                if resp.status != 200:
                    return False
                doc: Any = msgspec.json.decode(await resp.read())
        except (TimeoutError, aiohttp.ClientError, msgspec.DecodeError):
            return False
        return isinstance(doc, dict) and doc.get("status") == "healthy"

    async def execute(self, executor_url: str, task: QueueTask) -> tuple[bool, Any, str]:
        """(completed, result, error) of ``POST /execute``."""
        timeout_s = task.timeout or 30.0
        try:
            async with self.http.post(
                f"{executor_url}/execute",
                data=_encode({"eval_id": task.eval_id, "code": task.code, "timeout": timeout_s}),
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=timeout_s + 10),
            ) as resp:
                body = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            return False, None, f"{type(exc).__name__}: {exc}"
        if status != 200:
            return False, None, f"executor answered HTTP {status}"
        try:
            result: Any = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return False, None, "executor answer is not JSON"
        if isinstance(result, dict) and result.get("status") == "completed":
            return True, result, ""
        error = result.get("error") if isinstance(result, dict) else None
        return False, result, str(error or "execution failed")

    async def finish(self, task: QueueTask, completed: bool, result: Any, error: str) -> None:
        """Report to the queue, then publish, as the seed's steps 5 and 6."""
        eval_id = task.eval_id
        base = f"{self.queue_url}/tasks/{quote(eval_id, safe='')}"
        if completed:
            body, url = _encode({"output": result}), f"{base}/complete"
            message = _encode({"eval_id": eval_id, "result": result})
            channel = COMPLETED_CHANNEL
        else:
            body, url = _encode({"error": error}), f"{base}/fail"
            message = _encode({"eval_id": eval_id, "error": error, "result": result})
            channel = FAILED_CHANNEL
        async with self.http.post(
            url, data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            await resp.read()
        await self.redis.publish(channel, message)
        self.tally.outcomes["completed" if completed else "failed"] += 1


def parse_args(prog: str, doc: str | None, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=doc)
    parser.add_argument("--queue", required=True, help="Queue Service base URL")
    parser.add_argument("--executors", required=True, help="comma list of executor URLs")
    parser.add_argument("--redis", required=True, help="Redis URL for PUBLISH")
    parser.add_argument("--tasks", type=int, required=True, help="route at most this many")
    parser.add_argument("--deadline-s", type=float, required=True, help="stop routing after")
    parser.add_argument("--concurrency", type=int, default=1, help="loops (ceiling only)")
    parser.add_argument("--capacity", type=int, default=1, help="slots per executor (ceiling)")
    return parser.parse_args(argv)


Router = Callable[[Protocol, argparse.Namespace, float], Awaitable[None]]


async def serve(args: argparse.Namespace, route: Router) -> None:
    """Connect, say ready, wait for the go line, route, print the summary."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        redis = aioredis.Redis.from_url(args.redis)
        try:
            await redis.ping()  # type: ignore[misc]
            proto = Protocol(http, redis, args.queue.rstrip("/"))
            emit({"ready": True})
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            started, cpu0 = time.monotonic(), time.process_time()
            await route(proto, args, started + args.deadline_s)
            elapsed, cpu_s = time.monotonic() - started, time.process_time() - cpu0
        finally:
            await redis.aclose()
    tally = proto.tally
    emit(
        {
            "routed": tally.routed,
            "outcomes": dict(tally.outcomes),
            "health_checks": tally.health_checks,
            "stopped_by": tally.stopped_by,
            "elapsed_s": elapsed,
            "cpu_s": cpu_s,
            "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }
    )


def main(prog: str, doc: str | None, route: Router, argv: list[str] | None) -> int:
    """The ``main`` of a reference router: parse the options, then ``serve``."""
    asyncio.run(serve(parse_args(prog, doc, argv), route))
    return 0
