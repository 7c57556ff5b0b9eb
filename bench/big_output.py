"""Large outputs: the worker's peak memory when executors answer with huge results.

``python -m bench.big_output [--tasks N] [--sizes 15000000,50000000,500000000]``

For each run it starts a private Redis, the devstack queue and one simulated
executor (in this process), enqueues ``--tasks`` tasks whose code asks for an
output of the run's size (``SIMULATE_OUTPUT_BYTES``: above 1 MiB the executor
streams it in chunks, without a Content-Length and without holding it), and
runs the worker as its own process (``python -m queue_worker run``, default
settings: ``MAX_RESPONSE_BYTES`` 16 MiB, ``PUBLISH_MAX_BYTES`` 1 MiB) until every
task is reported to the queue and published. It then reads the worker's peak
RSS (``VmHWM`` in ``/proc/<pid>/status``) and Redis's peak memory. The first run
is the baseline, with the executor's normal small outputs; every run gets a
fresh worker, Redis, queue and executor, so the peaks are each run's own.

It prints one table: per run the outcome, the worker's peak RSS beside the
baseline's, Redis's peak memory, the pub/sub messages a subscriber received (Redis
drops a subscriber whose buffer passes 32 MB, and the message with it) and the
largest of them, and the run's time from the worker's start.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis

from bench.common import log_dir, proc_memory_kb
from bench.processes import WORKER_ARGV, Child, Listener, spawn, worker_env
from queue_worker.devstack.executor import create_executor_app
from queue_worker.devstack.queue import QUEUE_STATE, NewTask, QueueState, create_queue_app
from queue_worker.devstack.redis import RedisServer
from queue_worker.devstack.serve import Server

TARGET_RSS_MB = 300
MESSAGE_GRACE_S = 10.0  # after the last report, how long the messages may take
DEFAULT_SIZES = (15_000_000, 50_000_000, 500_000_000)


@dataclass
class Run:
    label: str
    output_bytes: int | None  # None: the executor's normal small output
    outcomes: Counter[str] = field(default_factory=Counter)
    error: str | None = None
    peak_rss_kb: int | None = None
    redis_peak_bytes: int | None = None
    largest_message: int = 0
    messages: int = 0
    seconds: float = 0.0
    note: str | None = None


def _mb(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.0f} MB"


async def one_run(run: Run, tasks: int, budget_s: float, workdir: Path) -> Run:
    code = "print(1)" if run.output_bytes is None else f"SIMULATE_OUTPUT_BYTES={run.output_bytes}"
    with RedisServer(directory=str(workdir)) as redis_server:
        queue = Server(create_queue_app())
        executor = Server(create_executor_app("executor-1", latency_s=0.0))
        redis = aioredis.Redis.from_url(redis_server.url)
        listener = Listener(redis)
        worker: Child | None = None
        try:
            await queue.start()
            await executor.start()
            await listener.start()
            state = queue.app[QUEUE_STATE]
            for i in range(tasks):
                state.enqueue(NewTask(eval_id=f"{run.label}-{i}", code=code, timeout=60))
            settings = {
                "HOSTNAME": f"big-{run.label}",
                "HOST": "127.0.0.1",
                "PORT": "0",
                "POLL_INTERVAL_S": "0.05",
                "LOG_LEVEL": "ERROR",
            }
            env = worker_env(queue.url, [executor.url], redis_server.url, settings)
            log = workdir / f"worker-{run.label}.log"
            worker = await spawn("worker", WORKER_ARGV, log, env=env)
            started = time.perf_counter()
            await _until_reported(run, state, tasks, budget_s, worker)
            await _until_published(listener, tasks)
            run.seconds = time.perf_counter() - started
            run.messages, run.largest_message = listener.messages, listener.largest_bytes
            run.peak_rss_kb = proc_memory_kb(worker.pid).get("VmHWM")
            info = await redis.info("memory")
            run.redis_peak_bytes = int(info["used_memory_peak"])
            for task in state.tasks.values():
                run.outcomes[task.status] += 1
                if task.error and run.error is None:
                    run.error = task.error
        finally:
            if worker is not None:
                await worker.stop()
            await listener.stop()
            await redis.aclose()
            await executor.stop()
            await queue.stop()
    return run


async def _until_reported(
    run: Run, state: QueueState, tasks: int, budget_s: float, worker: Child
) -> None:
    started = time.perf_counter()
    while True:
        stats = state.stats()
        if stats["completed"] + stats["failed"] >= tasks:
            return
        if time.perf_counter() - started > budget_s or not worker.alive:
            run.note = f"not all reported within {budget_s:g}s"
            return
        await asyncio.sleep(0.05)


async def _until_published(listener: Listener, tasks: int) -> None:
    """Messages follow the reports closely; one Redis dropped (the subscriber's buffer
    passed its limit) never comes."""
    grace_until = time.perf_counter() + MESSAGE_GRACE_S
    while listener.messages < tasks and not listener.done:
        if time.perf_counter() > grace_until:
            return
        await asyncio.sleep(0.05)


def _label(size: int | None) -> str:
    if size is None:
        return "baseline"
    return f"{size / 1e6:g}MB"


def report(runs: list[Run], tasks: int) -> str:
    base = runs[0].peak_rss_kb
    lines = [
        f"Large outputs: {tasks} tasks per run, one executor streaming the output, "
        "default settings (MAX_RESPONSE_BYTES 16 MiB, PUBLISH_MAX_BYTES 1 MiB)",
        "",
        "| output per task | outcome | worker peak RSS | vs baseline | Redis peak "
        "| messages received | largest message | run s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        size = "normal (~35 B)" if run.output_bytes is None else f"{run.output_bytes:,} B"
        outcome = ", ".join(f"{n} {status}" for status, n in sorted(run.outcomes.items()))
        if run.note:
            outcome += f" ({run.note})"
        ratio = "-" if base is None or run.peak_rss_kb is None else f"{run.peak_rss_kb / base:.2f}x"
        redis_mb = "-" if run.redis_peak_bytes is None else f"{run.redis_peak_bytes / 2**20:.0f} MB"
        lines.append(
            f"| {size} | {outcome} | {_mb(run.peak_rss_kb)} | {ratio} | {redis_mb} "
            f"| {run.messages}/{tasks} | {run.largest_message:,} B | {run.seconds:.1f} |"
        )
    errors = [(r.label, r.error) for r in runs if r.error]
    if errors:
        lines += ["", "Errors the queue got (first of each run, cut):"]
        lines += [f"- {label}: {error[:160]}" for label, error in errors]
    peak = max((r.peak_rss_kb or 0) for r in runs) / 1024
    verdict = "met" if peak <= TARGET_RSS_MB else "MISSED"
    lines += ["", f"target: worker peak RSS <= {TARGET_RSS_MB} MB in every run: {verdict}"]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    sizes: list[int | None] = [None, *args.sizes]
    runs: list[Run] = []
    with log_dir("qw-big-output-", keep=args.keep_logs) as workdir:
        for size in sizes:
            run = Run(_label(size), size)
            print(f"run {run.label} ...", file=sys.stderr, flush=True)
            runs.append(await one_run(run, args.tasks, args.budget_s, workdir))
    print(report(runs, args.tasks))
    return 0 if max((r.peak_rss_kb or 0) for r in runs) / 1024 <= TARGET_RSS_MB else 1


def _sizes(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.big_output", description=__doc__)
    parser.add_argument("--tasks", type=int, default=3, help="tasks per run (default: 3)")
    parser.add_argument(
        "--sizes",
        type=_sizes,
        default=list(DEFAULT_SIZES),
        help="output bytes per run after the baseline, comma-separated (default: %(default)s)",
    )
    parser.add_argument("--budget-s", type=float, default=180.0, help="per run")
    parser.add_argument("--keep-logs", action="store_true", help="keep the worker logs")
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
