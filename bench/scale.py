"""Scale-out: tasks/s with 1, 2 and 3 worker replicas on one log.

``python -m bench.scale [--tasks N] [--replicas 1,2,3]`` starts a private Redis and,
per run, a fresh ``bench.stack`` process (reference queue and three instant
executors with capacity 8, so the executors are not the bottleneck), fills the
queue, starts the replicas (``SHARED_CAPACITY=true``, one ``HOSTNAME`` each) and
times from their start to the last report. It prints one row per replica count
with the speed-up over one replica. Loopback only; every run is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid

import aiohttp

from queue_worker.devstack.redis import RedisServer

CAPACITY = 8


async def run_once(redis_url: str, replicas: int, tasks: int, budget_s: float) -> float:
    stack = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.stack", "--executors", "3", "--latency-ms", "0",
        "--capacity", str(CAPACITY), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert stack.stdout is not None
    urls = json.loads(await stack.stdout.readline())
    prefix = f"scale-{uuid.uuid4().hex[:8]}"
    workers = []
    try:
        async with aiohttp.ClientSession() as http:
            fill = {"count": tasks, "prefix": "t", "code": "print(1)", "timeout": 30}
            async with http.post(f"{urls['queue']}/_bench/fill", json=fill) as resp:
                resp.raise_for_status()
            started = time.perf_counter()
            for i in range(replicas):
                env = {
                    **os.environ,
                    "QUEUE_SERVICE_URL": urls["queue"],
                    "REDIS_URL": redis_url,
                    "EXECUTOR_URLS": ",".join(urls["executors"]),
                    "EXECUTOR_CAPACITY": str(CAPACITY),
                    "SHARED_CAPACITY": "true",
                    "STREAM_PREFIX": prefix,
                    "HOSTNAME": f"replica-{i + 1}",
                    "PORT": "0",
                    "HOST": "127.0.0.1",
                    "POLL_INTERVAL_S": "0.05",
                    "LOG_LEVEL": "ERROR",
                }
                workers.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "queue_worker",
                        "run",
                        env=env,
                        stdout=asyncio.subprocess.DEVNULL,
                        stderr=asyncio.subprocess.DEVNULL,
                    )
                )
            deadline = started + budget_s
            reported = 0
            while reported < tasks and time.perf_counter() < deadline:
                await asyncio.sleep(0.1)
                async with http.get(f"{urls['queue']}/_bench/progress") as resp:
                    reported = (await resp.json())["reported"]
            return reported / (time.perf_counter() - started)
    finally:
        for proc in workers:
            proc.terminate()
        await asyncio.gather(*(p.wait() for p in workers))
        stack.terminate()
        await stack.wait()


async def main_async(args: argparse.Namespace) -> None:
    with RedisServer() as redis:
        rows = []
        for n in args.replicas:
            rate = await run_once(redis.url, n, args.tasks, args.budget_s)
            rows.append((n, rate))
        base = rows[0][1]
        print(f"scale-out, {args.tasks} tasks, 3 instant executors x capacity {CAPACITY}")
        print("| replicas | tasks/s | vs 1 replica |")
        print("|---|---|---|")
        for n, rate in rows:
            print(f"| {n} | {rate:.0f} | {rate / base:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument(
        "--replicas", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3]
    )
    parser.add_argument("--budget-s", type=float, default=120.0)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
