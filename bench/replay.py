"""The ``replay`` scenario: how fast the worker folds its event stream at start-up.

The stream is the soak's when the soak ran just before, else a synthetic one of the
scenario's size. It is measured three times: (a) a real worker process folds it before
it serves, with no checkpoint (its ``status_replayed`` log line; its peak RSS); (b) here,
in the bench process, what ``TailProjector.replay`` does (``XRANGE`` pages of 1000,
``parse_entries``, ``views.fold``), timed per step; (c) a real worker starts again from a
checkpoint of the whole stream (``CHECKPOINT_EVERY``): it folds only what follows it.
"""

from __future__ import annotations

import time

import msgspec
import redis.asyncio as aioredis

from bench.common import BENCH_CODE, proc_memory_kb, stream_pages
from bench.measure import STREAM_KEY
from bench.processes import Harness
from bench.results import ReplayResult
from bench.scenarios import SCENARIOS, Scenario
from queue_worker.streams import events as ev
from queue_worker.streams.checkpoint import Checkpoints
from queue_worker.streams.entries import parse_entries
from queue_worker.streams.keys import Keys
from queue_worker.streams.store import EventStore
from queue_worker.streams.views import StatusView, fold


async def replay(
    harness: Harness, scn: Scenario, *, quick: bool, soak_stream: bool
) -> ReplayResult:
    redis = harness.redis
    out = ReplayResult()
    if soak_stream and await redis.xlen(STREAM_KEY) > 0:
        out.source = "the soak's stream"
    else:
        await synthesise_stream(redis, scn.n(quick))
        out.source = f"synthetic stream of {scn.n(quick)} tasks"
    out.events = int(await redis.xlen(STREAM_KEY))
    out.stream_bytes = await redis.memory_usage(STREAM_KEY, samples=0)
    await redis.delete(Keys().checkpoint)  # (a) folds the whole stream
    out.startup_seconds, out.startup_rss_kb, events = await _startup(harness)
    if out.startup_seconds:
        out.startup_events_per_s = events / out.startup_seconds
    view = await _fold_here(redis, out)
    await Checkpoints(redis, Keys()).save(view)
    out.checkpoint_startup_seconds, _, out.checkpoint_folded = await _startup(harness)
    return out


async def _startup(harness: Harness) -> tuple[float | None, int | None, int]:
    """A real worker process folds the stream before it serves: its replay's seconds, its
    peak RSS and how many entries it folded."""
    instant = SCENARIOS["instant"]
    stack = await harness.start_stack(instant)
    try:
        child, _ = await harness.start_worker(instant, stack, timeout_s=300)
        rss = proc_memory_kb(child.pid).get("VmHWM")
        await child.stop(40)
        for line in child.log.read_bytes().splitlines():
            if b"status_replayed" in line:
                doc = msgspec.json.decode(line)
                return float(doc["seconds"]), rss, int(doc.get("folded", doc["events"]))
        return None, rss, 0
    finally:
        await stack.stop()


async def _fold_here(redis: aioredis.Redis, out: ReplayResult) -> StatusView:
    """(b) What ``TailProjector.replay`` does, here, timed per step."""
    view, t_read, t_decode, t_fold, count = StatusView(), 0.0, 0.0, 0.0, 0
    pages = stream_pages(redis, STREAM_KEY, 1000)
    while True:
        t = time.perf_counter()
        raws = await anext(pages, None)
        t_read += time.perf_counter() - t
        if raws is None:
            break
        t = time.perf_counter()
        entries = parse_entries(raws)
        t_decode += time.perf_counter() - t
        t = time.perf_counter()
        fold(entries, view)
        t_fold += time.perf_counter() - t
        count += len(entries)
    out.breakdown_s = {"xrange": t_read, "decode": t_decode, "fold": t_fold}
    total = t_read + t_decode + t_fold
    out.breakdown_events_per_s = count / total if total else None
    return view


async def synthesise_stream(redis: aioredis.Redis, tasks: int) -> None:
    """A fresh stream of ``tasks`` tasks, each pulled, routed, completed and reported."""
    await redis.flushall()
    store = EventStore(redis, Keys(), "bench-synthetic")
    urls = [f"http://127.0.0.1:{9000 + i}" for i in range(3)]
    batch: list[ev.Event] = [
        ev.WorkerStarted(version="bench", executors=urls, strategy="round_robin", capacity=8)
    ]
    for i in range(tasks):
        batch += _task_events(i, urls)
        if len(batch) >= 3000:
            await store.append(*batch)
            batch = []
    if batch:
        await store.append(*batch)


def _task_events(i: int, urls: list[str]) -> list[ev.Event]:
    eval_id, pull_id, url = f"replay-{i:07d}", f"{i:016x}", urls[i % 3]
    task = ev.Task(eval_id=eval_id, code=BENCH_CODE, timeout=30.0)
    candidates = [ev.Candidate(executor=u, healthy=True, in_flight=i % 8, capacity=8) for u in urls]
    result = {
        "eval_id": eval_id,
        "status": "completed",
        "output": f"simulated output for {eval_id}\n",
        "error": None,
        "exit_code": 0,
        "executor_id": f"executor-{i % 3 + 1}",
    }
    return [
        ev.PullStarted(pull_id=pull_id),
        ev.TaskPulled(eval_id=eval_id, pull_id=pull_id, task=task, code_bytes=len(BENCH_CODE)),
        ev.ExecutorSelected(
            eval_id=eval_id,
            executor=url,
            strategy="round_robin",
            attempt=1,
            candidates=candidates,
        ),
        ev.TaskDispatched(eval_id=eval_id, executor=url, attempt=1, timeout_s=30.0),
        ev.TaskCompleted(eval_id=eval_id, executor=url, attempt=1, result=result, duration_ms=1.5),
        ev.TaskReported(eval_id=eval_id, outcome="completed", http_status=200),
    ]
