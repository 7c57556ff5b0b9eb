"""Baseline: the seed's task flow taken literally, one task at a time.

For each task: ``GET /tasks/next``; pick executors round-robin and check
each with ``GET /health`` (2 s timeout) before routing, moving on to the
next when one is unhealthy; ``POST /execute``; ``POST
/tasks/{id}/complete|fail``; ``PUBLISH``. No health cache, no concurrency,
no event log. With no healthy executor the task is failed.

``python -m bench.baseline --queue URL --executors URL,URL --redis URL --tasks N --deadline-s S``
"""

from __future__ import annotations

import argparse
import sys
import time

from bench import reference
from bench.reference import Protocol


async def route_serially(proto: Protocol, args: argparse.Namespace, deadline: float) -> None:
    executors = [u.rstrip("/") for u in args.executors.split(",") if u]
    tally = proto.tally
    turn = 0
    for _ in range(args.tasks):
        if time.monotonic() >= deadline:
            tally.stopped_by = "deadline"
            return
        task = await proto.pull()
        if task is None:
            tally.stopped_by = "empty_queue"
            return
        chosen = None
        for step in range(len(executors)):
            index = (turn + step) % len(executors)
            if await proto.healthy(executors[index]):
                chosen, turn = executors[index], index + 1
                break
        if chosen is None:
            await proto.finish(task, False, None, "no healthy executor available")
            continue
        tally.routed += 1
        completed, result, error = await proto.execute(chosen, task)
        await proto.finish(task, completed, result, error)
    tally.stopped_by = "task_limit"


def main(argv: list[str] | None = None) -> int:
    return reference.main("python -m bench.baseline", __doc__, route_serially, argv)


if __name__ == "__main__":
    sys.exit(main())
