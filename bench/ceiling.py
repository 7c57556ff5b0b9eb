"""Ceiling: the least a router can do, as concurrently as the worker.

``--concurrency`` independent loops (the bench passes the worker's maximum
tasks in flight: capacity x healthy executors), each ``GET /tasks/next`` →
take a free executor slot → ``POST /execute`` → ``POST
/tasks/{id}/complete|fail`` → ``PUBLISH``. No health checks, no event log,
no logging. Executor slots come from one FIFO of ``--capacity`` slots per
executor, so the ceiling never over-fills an executor and is work-conserving
(a loop holding a task always finds a free slot). The bench hands it only
the executors that are healthy (an oracle: it never checks).

``python -m bench.ceiling --queue URL --executors URL,URL --redis URL --tasks N --deadline-s S
--concurrency C --capacity K``
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from bench import reference
from bench.reference import Protocol


async def route_concurrently(proto: Protocol, args: argparse.Namespace, deadline: float) -> None:
    executors = [u.rstrip("/") for u in args.executors.split(",") if u]
    slots: asyncio.Queue[str] = asyncio.Queue()
    for _ in range(args.capacity):
        for url in executors:
            slots.put_nowait(url)
    budget = [args.tasks]  # tasks left to take, shared by the loops
    tally = proto.tally

    async def loop() -> None:
        while budget[0] > 0:
            if time.monotonic() >= deadline:
                tally.stopped_by = "deadline"
                return
            budget[0] -= 1
            task = await proto.pull()
            if task is None:
                return
            url = await slots.get()
            try:
                tally.routed += 1
                completed, result, error = await proto.execute(url, task)
            finally:
                slots.put_nowait(url)
            await proto.finish(task, completed, result, error)

    await asyncio.gather(*(loop() for _ in range(args.concurrency)))
    if budget[0] <= 0 and tally.stopped_by != "deadline":
        tally.stopped_by = "task_limit"


def main(argv: list[str] | None = None) -> int:
    return reference.main("python -m bench.ceiling", __doc__, route_concurrently, argv)


if __name__ == "__main__":
    sys.exit(main())
