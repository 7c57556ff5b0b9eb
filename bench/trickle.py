"""The trickle scenario: how soon a task submitted one at a time is done.

Tasks arrive open loop (each on its own schedule, whether or not the previous ones are
done) at 20/s and at 5/s: Poisson arrivals from a fixed seed by default (``--arrivals
even``: evenly spaced). Each arrival is what the platform's gateway does: ``PUBLISH
evaluation:queued {"eval_id", "code", "language", "engine", "metadata": {}}``, then
``POST /tasks`` to the devstack queue. The executors are 3 x 50 ms and 1 x 250 ms,
capacity 1 each; our worker runs with its default settings except the strategy
(``least_loaded``, ``round_robin``) and, in half the cells, ``WAKE_CHANNEL`` empty (no
wake-up). Every cell has a fresh Redis database, stack and worker, which is left idle
for ``SETTLE_S`` before the first arrival.

Per task: ``e2e`` from the ``PUBLISH`` to the bench receiving ``evaluation:completed``;
the executor's own time (its handler, timed in the executor's process by
``bench.stack``: the simulated executor's result carries no duration); ``added`` =
e2e - executor time, what the worker (and the queue, Redis and the pub/sub hop) add.
``task.completed``'s ``duration_ms`` (the worker's ``POST /execute`` round trip) gives
a second view of the same, in ``-v``. All timestamps are ``time.time()`` on this host.

An idle worker (defaults, no task) is measured too: ``GET /tasks/next`` requests the
queue received, and the worker's ``live.polls``, per ``POLL_INTERVAL_S``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec
import redis.asyncio as aioredis

from bench.common import BENCH_CODE, percentile, stream_pages
from bench.processes import CpuMeter, Harness, Stack
from bench.results import TrickleCell, TrickleIdle, TrickleResult
from bench.scenarios import Scenario
from queue_worker.config import Settings
from queue_worker.config_fields import DEFAULT_WAKE_CHANNEL
from queue_worker.streams.keys import Keys

RATES = (20.0, 5.0)  # arrivals per second
STRATEGIES = ("least_loaded", "round_robin")
CELL_S = {True: 12.0, False: 45.0}  # seconds of arrivals per cell: quick, full
IDLE_S = {True: 10.0, False: 30.0}  # the idle measurement: quick, full
SETTLE_S = 3.0  # the worker idles this long before the first arrival (and before idle)
DRAIN_S = 10.0  # after the last arrival, how long the outcomes may take
SEED = 20261201
WAKE_CHANNEL = DEFAULT_WAKE_CHANNEL or "evaluation:queued"
QUANTILES = (("p50", 50.0), ("p95", 95.0), ("p99", 99.0), ("max", 100.0))


class _Duration(msgspec.Struct):
    duration_ms: float = 0.0


_duration = msgspec.json.Decoder(_Duration)


def arrival_offsets(rate: float, seconds: float, arrivals: str, seed: int) -> list[float]:
    """Seconds from the start of a cell at which tasks arrive: ``rate`` per second over
    ``seconds``, evenly spaced or Poisson (exponential gaps from ``seed``)."""
    if arrivals == "even":
        return [i / rate for i in range(int(rate * seconds))]
    rng = random.Random(seed)
    out: list[float] = []
    t = rng.expovariate(rate)
    while t < seconds:
        out.append(t)
        t += rng.expovariate(rate)
    return out


def quantiles_ms(seconds: list[float]) -> dict[str, float | None]:
    """p50, p95, p99 and max of durations in seconds, in milliseconds."""
    out: dict[str, float | None] = {}
    for name, q in QUANTILES:
        value = percentile(seconds, q)
        out[name] = None if value is None else round(value * 1000, 2)
    return out


def default_poll_interval_s() -> float:
    return Settings.from_env({}).poll_interval_s


async def run_trickle(
    harness: Harness,
    scn: Scenario,
    *,
    quick: bool,
    arrivals: str = "poisson",
    progress: Callable[[str], None] = lambda _: None,
) -> TrickleResult:
    """The idle measurement, then every cell: rate x wake-up x strategy (strategies side
    by side, so a noisy spell of the machine hits both)."""
    result = TrickleResult(
        arrivals=arrivals,
        poll_interval_s=default_poll_interval_s(),
        slow_executor=f"executor-{scn.slow_index + 1}",
    )
    result.idle = await measure_idle(harness, scn, IDLE_S[quick], result.poll_interval_s)
    idle = result.idle
    progress(
        f"trickle idle: {idle.queue_polls} polls in {idle.seconds:g} s "
        f"(worker live.polls {idle.worker_polls})"
    )
    for rate in RATES:
        for wake in (True, False):
            for strategy in STRATEGIES:
                cell = await run_cell(
                    harness, scn, strategy, wake, rate, CELL_S[quick], arrivals, result
                )
                result.cells.append(cell)
                e2e = cell.e2e_ms
                progress(
                    f"trickle {rate:g}/s {strategy} wake={'on' if wake else 'off'}: "
                    f"{cell.completed}/{cell.sent}, e2e p50/p95 {e2e.get('p50')} / "
                    f"{e2e.get('p95')} ms, added p95 {cell.added_ms.get('p95')} ms"
                )
    return result


async def measure_idle(
    h: Harness, scn: Scenario, seconds: float, poll_interval_s: float
) -> TrickleIdle:
    """A worker with default settings and an empty queue: its polls over ``seconds``."""
    idle = TrickleIdle(seconds=seconds, settle_s=SETTLE_S, poll_interval_s=poll_interval_s)
    await h.redis.flushall()
    stack = await h.start_stack(scn)
    try:
        child, url = await h.start_worker(scn, stack)
        try:
            await asyncio.sleep(SETTLE_S)
            live0, polls0 = await h.worker_live(url), (await stack.progress())["polls"]
            await asyncio.sleep(seconds)
            live1, polls1 = await h.worker_live(url), (await stack.progress())["polls"]
        finally:
            await child.stop(40)
    finally:
        await stack.stop()
    idle.queue_polls = polls1 - polls0
    idle.worker_polls = live1["polls"] - live0["polls"]
    idle.long_polls = live1["long_polls"] - live0["long_polls"]
    return idle


async def run_cell(
    h: Harness,
    scn: Scenario,
    strategy: str,
    wake: bool,
    rate: float,
    seconds: float,
    arrivals: str,
    result: TrickleResult,
    *,
    settle_s: float = SETTLE_S,
) -> TrickleCell:
    cell = TrickleCell(strategy=strategy, wake=wake, rate=rate, seconds=seconds)
    offsets = arrival_offsets(rate, seconds, arrivals, SEED + int(rate))
    prefix = f"t{rate:g}-{strategy}-{'wake' if wake else 'nowake'}"
    env = {"ROUTING_STRATEGY": strategy} | ({} if wake else {"WAKE_CHANNEL": ""})
    await h.redis.flushall()
    h.listener.reset()
    stack = await h.start_stack(scn)
    try:
        child, url = await h.start_worker(scn, stack, env=env)
        try:
            await asyncio.sleep(settle_s)
            live0, polls0 = await h.worker_live(url), (await stack.progress())["polls"]
            meter = CpuMeter(child.pid, {})
            sent, cell.send_errors = await send_open_loop(h, stack, prefix, offsets)
            await _until_received(h, list(sent), DRAIN_S)
            cpu = meter.stop()
            live1, polls1 = await h.worker_live(url), (await stack.progress())["polls"]
            durations = await execute_durations(h)
        finally:
            await child.stop(40)
        times = await stack_tasks(stack)
    finally:
        await stack.stop()
    cell.polls = polls1 - polls0
    cell.machine_busy_pct = cpu.machine_busy_pct
    if cpu.router_s is not None and sent:
        cell.worker_cpu_ms_per_task = 1000 * cpu.router_s / len(sent)
    cell.wakeups = live1["wakeups"] - live0["wakeups"]
    cell.long_polls = live1["long_polls"] - live0["long_polls"]
    summarise_cell(
        cell, sent, h.listener.received, times, durations, result.slow_executor, scn.slots()
    )
    return cell


async def send_open_loop(
    h: Harness, stack: Stack, prefix: str, offsets: list[float]
) -> tuple[dict[str, tuple[float, float]], int]:
    """Announce and enqueue one task at each offset (seconds from now), each on its own
    so a slow answer does not hold back the next. Returns eval_id → (publish time, POST
    answered) of the tasks enqueued, and how many could not be."""
    sent: dict[str, tuple[float, float]] = {}
    errors = 0

    async def one(eval_id: str) -> None:
        nonlocal errors
        body = msgspec.json.encode(
            {"eval_id": eval_id, "code": BENCH_CODE, "language": "python", "engine": "docker",
             "priority": 1}
        )  # fmt: skip
        t_pub = time.time()
        try:
            await h.redis.publish(WAKE_CHANNEL, _announcement(eval_id))
            async with h.http.post(
                f"{stack.queue}/tasks", data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                resp.raise_for_status()
        except (aiohttp.ClientError, aioredis.RedisError, OSError):
            errors += 1
            return
        sent[eval_id] = (t_pub, time.time())

    start = time.monotonic() + 0.05
    pending: list[asyncio.Task[None]] = []
    for i, offset in enumerate(offsets):
        delay = start + offset - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        pending.append(asyncio.create_task(one(f"{prefix}-{i:06d}")))
    await asyncio.gather(*pending)
    return sent, errors


def _announcement(eval_id: str) -> bytes:
    """What the gateway publishes on ``evaluation:queued`` before it enqueues a task."""
    return msgspec.json.encode(
        {"eval_id": eval_id, "code": BENCH_CODE, "language": "python", "engine": "docker",
         "metadata": {}}
    )  # fmt: skip


async def _until_received(h: Harness, eval_ids: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    received = h.listener.received
    waiting = list(eval_ids)
    while waiting and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        waiting = [e for e in waiting if e not in received]


async def execute_durations(h: Harness) -> dict[str, float]:
    """eval_id → ``duration_ms`` of its ``task.completed`` (the worker's ``POST /execute``)."""
    out: dict[str, float] = {}
    async for raws in stream_pages(h.redis, Keys().events, 5000):
        for _, fields in raws:
            if fields.get(b"type") == b"task.completed":
                eval_id = fields[b"eval_id"].decode()
                out[eval_id] = _duration.decode(fields[b"data"]).duration_ms
    return out


async def stack_tasks(stack: Stack) -> dict[str, dict[str, Any]]:
    async with stack.http.get(f"{stack.queue}/_bench/tasks") as resp:
        resp.raise_for_status()
        tasks: dict[str, dict[str, Any]] = msgspec.json.decode(await resp.read())
    return tasks


def summarise_cell(
    cell: TrickleCell,
    sent: dict[str, tuple[float, float]],
    received: dict[str, float],
    times: dict[str, dict[str, Any]],
    durations: dict[str, float],
    slow_executor: str,
    slots: int,
) -> None:
    """The cell's percentiles over its completed tasks; ``added`` also over those
    announced while fewer than ``slots`` tasks were in an executor (none had to wait for
    a slot to free)."""
    spans = sorted(
        (t["exec_in"], t["exec_out"]) for t in times.values() if t["exec_in"] and t["exec_out"]
    )
    added_free: list[float] = []
    e2e: list[float] = []
    added: list[float] = []
    executor: list[float] = []
    added_rt: list[float] = []
    post: list[float] = []
    split: dict[str, list[float]] = {"to_pull": [], "pull_to_exec": [], "answer_to_msg": []}
    per_executor: Counter[str] = Counter()
    for eval_id, (t_pub, t_posted) in sent.items():
        post.append(t_posted - t_pub)
        t = times.get(eval_id)
        if t is None or eval_id not in received:
            continue
        if t["outcome"] != "completed" or t["exec_in"] is None or t["exec_out"] is None:
            cell.failed += 1
            continue
        cell.completed += 1
        total = received[eval_id] - t_pub
        own = t["exec_out"] - t["exec_in"]
        e2e.append(total)
        executor.append(own)
        added.append(total - own)
        if sum(1 for a, b in spans if a <= t_pub < b) < slots:
            added_free.append(total - own)
        else:
            cell.announced_all_busy += 1
        if t["pulled"] is not None:
            split["to_pull"].append(t["pulled"] - t_pub)
            split["pull_to_exec"].append(t["exec_in"] - t["pulled"])
        split["answer_to_msg"].append(received[eval_id] - t["exec_out"])
        if eval_id in durations:
            added_rt.append(total - durations[eval_id] / 1000)
        per_executor[t["executor"] or "?"] += 1
    cell.sent = len(sent)
    cell.e2e_ms = quantiles_ms(e2e)
    cell.added_ms = quantiles_ms(added)
    cell.executor_ms = quantiles_ms(executor)
    cell.added_vs_execute_rt_ms = quantiles_ms(added_rt)
    cell.post_ms = quantiles_ms(post)
    cell.added_free_ms = quantiles_ms(added_free)
    cell.split_ms = {k: quantiles_ms(v) for k, v in split.items()}
    cell.per_executor = dict(sorted(per_executor.items()))
    if cell.completed:
        cell.slow_share = per_executor[slow_executor] / cell.completed
    problems = []
    if cell.completed < cell.sent:
        problems.append(f"{cell.sent - cell.completed} of {cell.sent} not completed")
    if cell.send_errors:
        problems.append(f"{cell.send_errors} could not be announced or enqueued")
    cell.error = "; ".join(problems) or None
