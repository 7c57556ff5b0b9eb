"""The devstack queue and N simulated executors in their own process, instrumented.

``python -m bench.stack --executors 3 --latency-ms 0 --capacity 8`` serves the
reference Queue Service and the executors on loopback in one event loop,
prints one JSON line ``{"queue": url, "executors": [urls], "pid": pid}`` and
serves until SIGTERM/SIGINT, stdin closing, or ``--max-seconds``.

Running them apart from the router under test keeps the router's CPU figures
its own. Every timestamp below is taken in this one process, so differences
between them need no clock agreement:

* the queue records when it hands out a task (``pull``) and when it accepts
  the task's first report (``complete``/``fail``);
* each executor records when ``POST /execute`` reached its handler and when
  the handler answered;
* with ``--count-polls``, the queue counts its ``GET /tasks/next`` requests.

Extra routes on the queue (benchmark only): ``POST /_bench/fill`` enqueues
many tasks in-process, ``GET /_bench/progress`` is a cheap counter (and the
poll count), ``GET /_bench/stats`` summarises the run and ``GET /_bench/tasks``
lists each task's timestamps and executor.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import signal
import sys
import time
from collections import Counter
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

from bench.common import emit, p50_p99_ms
from queue_worker.devstack.executor import EXECUTOR_STATE, create_executor_app
from queue_worker.devstack.queue import QUEUE_STATE, NewTask, QueueState, Task
from queue_worker.devstack.queue import create_queue_app as create_devstack_queue_app
from queue_worker.devstack.serve import Server


class Recorder:
    """Per-task timestamps (``time.time()`` of this process) and per-executor busy time."""

    def __init__(self) -> None:
        self.pulled_at: dict[str, float] = {}
        self.reported_at: dict[str, float] = {}
        self.exec_in: dict[str, float] = {}
        self.exec_out: dict[str, float] = {}
        self.executor_of: dict[str, str] = {}
        self.outcome_of: dict[str, str] = {}
        self.polls = 0  # GET /tasks/next requests, with --count-polls
        self.busy_s: dict[str, float] = {}
        self.spans: dict[str, list[tuple[float, float]]] = {}
        self.executed: Counter[str] = Counter()
        self.non_200: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()


class BenchQueueState(QueueState):
    """The reference queue, recording when tasks leave and when their reports arrive."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def pull(self, *args: Any, **kwargs: Any) -> Task | None:
        task = super().pull(*args, **kwargs)
        if task is not None:
            self.recorder.pulled_at.setdefault(task.eval_id, time.time())
        return task

    def complete(self, eval_id: str, output: Any) -> bool:
        return self._reported(super().complete(eval_id, output), eval_id, "completed")

    def fail(self, eval_id: str, error: str) -> bool:
        return self._reported(super().fail(eval_id, error), eval_id, "failed")

    def _reported(self, accepted: bool, eval_id: str, outcome: str) -> bool:
        if accepted:
            self.recorder.reported_at.setdefault(eval_id, time.time())
            self.recorder.outcome_of.setdefault(eval_id, outcome)
            self.recorder.outcomes[outcome] += 1
        return accepted


class _EvalId(msgspec.Struct):
    eval_id: str


_eval_id = msgspec.json.Decoder(_EvalId)


def _timing_middleware(recorder: Recorder, executor_id: str) -> Any:
    @web.middleware
    async def timing(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/execute":
            return await handler(request)
        try:
            eval_id = _eval_id.decode(await request.read()).eval_id
        except msgspec.DecodeError:
            return await handler(request)
        started = time.time()
        response = await handler(request)
        if response.status == 200:
            finished = time.time()
            recorder.exec_in.setdefault(eval_id, started)
            recorder.exec_out.setdefault(eval_id, finished)
            recorder.executor_of.setdefault(eval_id, executor_id)
            recorder.busy_s[executor_id] = recorder.busy_s.get(executor_id, 0.0) + (
                finished - started
            )
            recorder.executed[executor_id] += 1
            recorder.spans.setdefault(executor_id, []).append((started, finished))
        else:
            recorder.non_200[executor_id] += 1
        return response

    return timing


class Fill(msgspec.Struct):
    count: int
    prefix: str = "bench"
    code: str = "print(1)\n"
    timeout: float = 30.0


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(obj), status=status, content_type="application/json"
    )


def summarise(recorder: Recorder, queue: QueueState, executors: list[web.Application]) -> Any:
    """The run as the services saw it: window, counts, overhead percentiles, busy time."""
    rec = recorder
    pulled, reported = rec.pulled_at, rec.reported_at
    pre: list[float] = []
    post: list[float] = []
    total: list[float] = []
    for eval_id, t_report in reported.items():
        t_pull, t_in, t_out = (
            pulled.get(eval_id),
            rec.exec_in.get(eval_id),
            rec.exec_out.get(eval_id),
        )
        if t_pull is None or t_in is None or t_out is None:
            continue
        pre.append(t_in - t_pull)
        post.append(t_report - t_out)
        total.append((t_in - t_pull) + (t_report - t_out))
    # Idle time of an executor between two tasks: only gaps between spans that do not
    # overlap, which (at capacity 1) is the time a freed slot waited for its next task.
    gaps: list[float] = []
    for spans in rec.spans.values():
        spans.sort()
        gaps += [b[0] - a[1] for a, b in itertools.pairwise(spans) if b[0] >= a[1]]
    gap_p50, gap_p99 = p50_p99_ms(gaps)
    pre_p50, pre_p99 = p50_p99_ms(pre)
    post_p50, post_p99 = p50_p99_ms(post)
    total_p50, total_p99 = p50_p99_ms(total)
    return {
        "pulled": len(pulled),
        "reported": len(reported),
        "outcomes": dict(rec.outcomes),
        "first_pull": min(pulled.values()) if pulled else None,
        "last_pull": max(pulled.values()) if pulled else None,
        "last_report": max(reported.values()) if reported else None,
        "reported_times": sorted(reported.values()),
        "overhead_ms": {
            "pre_p50": pre_p50,
            "pre_p99": pre_p99,
            "post_p50": post_p50,
            "post_p99": post_p99,
            "p50": total_p50,
            "p99": total_p99,
            "samples": len(total),
        },
        "busy_s": rec.busy_s,
        "idle_gap_ms": {"p50": gap_p50, "p99": gap_p99, "samples": len(gaps)},
        "executed": dict(rec.executed),
        "non_200": dict(rec.non_200),
        "duplicate_reports": queue.duplicate_reports,
        "executor_stats": [
            {
                k: v
                for k, v in app[EXECUTOR_STATE].stats().items()
                if k in ("executor_id", "executed", "max_in_flight", "rejected_busy")
            }
            | {"health_checks": app[EXECUTOR_STATE].health_checks}
            for app in executors
        ],
    }


def _poll_counter(recorder: Recorder) -> Any:
    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/tasks/next":
            recorder.polls += 1
        return await handler(request)

    return count


def task_times(recorder: Recorder) -> dict[str, dict[str, Any]]:
    """Each reported task: pulled, executor in/out, reported (``time.time()`` of this
    process), its executor and its outcome."""
    rec = recorder
    return {
        eval_id: {
            "pulled": rec.pulled_at.get(eval_id),
            "exec_in": rec.exec_in.get(eval_id),
            "exec_out": rec.exec_out.get(eval_id),
            "reported": t_report,
            "executor": rec.executor_of.get(eval_id),
            "outcome": rec.outcome_of.get(eval_id),
        }
        for eval_id, t_report in rec.reported_at.items()
    }


def create_queue_app(
    recorder: Recorder, executors: list[web.Application], *, count_polls: bool = False
) -> web.Application:
    app = create_devstack_queue_app()
    if count_polls:  # only when asked: it costs every request a middleware call
        app.middlewares.append(_poll_counter(recorder))
    state = BenchQueueState(recorder)
    app[QUEUE_STATE] = state

    async def fill(request: web.Request) -> web.Response:
        body = msgspec.json.decode(await request.read(), type=Fill)
        for i in range(body.count):
            state.enqueue(
                NewTask(eval_id=f"{body.prefix}-{i:07d}", code=body.code, timeout=body.timeout)
            )
        return _json({"queued": body.count})

    async def progress(request: web.Request) -> web.Response:
        return _json(
            {
                "pulled": len(recorder.pulled_at),
                "reported": len(recorder.reported_at),
                "polls": recorder.polls,
            }
        )

    async def stats(request: web.Request) -> web.Response:
        return _json(summarise(recorder, state, executors))

    app.router.add_post("/_bench/fill", fill)
    app.router.add_get("/_bench/progress", progress)

    async def tasks(request: web.Request) -> web.Response:
        return _json(task_times(recorder))

    app.router.add_get("/_bench/stats", stats)
    app.router.add_get("/_bench/tasks", tasks)
    return app


def build(args: argparse.Namespace, recorder: Recorder) -> tuple[Server, list[Server]]:
    executor_apps: list[web.Application] = []
    for i in range(args.executors):
        latency_ms = args.latency_ms * (args.slow_factor if i == args.slow_index else 1.0)
        executor_id = f"executor-{i + 1}"
        app = create_executor_app(
            executor_id,
            latency_s=latency_ms / 1000,
            capacity=args.capacity,
            health="hang" if i == args.hang_health_index else "healthy",
            seed=i,
        )
        app.middlewares.append(_timing_middleware(recorder, executor_id))
        executor_apps.append(app)
    queue = Server(create_queue_app(recorder, executor_apps, count_polls=args.count_polls))
    return queue, [Server(app) for app in executor_apps]


async def serve(args: argparse.Namespace) -> None:
    recorder = Recorder()
    queue, executors = build(args, recorder)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: _stdin_readable(stop))
    for server in (queue, *executors):
        await server.start()
    emit({"queue": queue.url, "executors": [x.url for x in executors], "pid": os.getpid()})
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), args.max_seconds)
    loop.remove_reader(sys.stdin.fileno())
    for server in (*executors, queue):
        await server.stop()


def _stdin_readable(stop: asyncio.Event) -> None:
    if not os.read(sys.stdin.fileno(), 4096):  # EOF: the parent went away
        stop.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stack", description=__doc__)
    parser.add_argument("--executors", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--capacity", type=int, default=8, help="per executor (503 beyond)")
    parser.add_argument("--slow-index", type=int, default=-1, help="executor (0-based) slowed")
    parser.add_argument("--slow-factor", type=float, default=5.0)
    parser.add_argument("--hang-health-index", type=int, default=-1, help="GET /health hangs")
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    parser.add_argument(
        "--count-polls", action="store_true", help="count GET /tasks/next (in /_bench/progress)"
    )
    args = parser.parse_args(argv)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
