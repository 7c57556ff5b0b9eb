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
import time
import uuid

from bench.common import log_dir
from bench.processes import WORKER_ARGV, Child, Harness, worker_env
from bench.scenarios import SCENARIOS

SCENARIO = SCENARIOS["instant"]  # three instant executors with capacity 8 each
CAPACITY = SCENARIO.capacity


async def run_once(harness: Harness, replicas: int, tasks: int, budget_s: float) -> float:
    stack = await harness.start_stack(SCENARIO)
    prefix = f"scale-{uuid.uuid4().hex[:8]}"
    workers: list[Child] = []
    try:
        await stack.fill(tasks, "t", code="print(1)")
        started = time.perf_counter()
        for i in range(replicas):
            settings = {
                "EXECUTOR_CAPACITY": str(CAPACITY),
                "SHARED_CAPACITY": "true",
                "STREAM_PREFIX": prefix,
                "HOSTNAME": f"replica-{i + 1}",
                "PORT": "0",
                "HOST": "127.0.0.1",
                "POLL_INTERVAL_S": "0.05",
                "LOG_LEVEL": "ERROR",
            }
            env = worker_env(stack.queue, stack.executors, harness.redis_url, settings)
            workers.append(await harness.spawn(f"replica-{i + 1}", WORKER_ARGV, env=env))
        deadline = started + budget_s
        reported = 0
        while reported < tasks and time.perf_counter() < deadline:
            await asyncio.sleep(0.1)
            reported = (await stack.progress())["reported"]
        return reported / (time.perf_counter() - started)
    finally:
        await asyncio.gather(*(w.stop() for w in workers))
        await stack.stop()


async def main_async(args: argparse.Namespace) -> None:
    with log_dir("qw-scale-", keep=False) as workdir:
        async with Harness(workdir, listen=False) as harness:
            rows = [
                (n, await run_once(harness, n, args.tasks, args.budget_s)) for n in args.replicas
            ]
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
