"""Several worker replicas on one log: real processes, shared executor slots, takeover.

Three replicas (``HOSTNAME`` differs) share the queue, the executors and Redis; every
task runs once, is published once, and no executor ever sees more than its capacity.
A replica SIGKILLed mid-run is taken over by exactly one other.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter, defaultdict

from queue_worker.streams import events as ev
from tests.harness import Stack, eventually, spawn_worker

CAPACITY = 2


def replica_env(stack: Stack, name: str) -> dict[str, str]:
    return stack.process_env(
        name,
        EXECUTOR_CAPACITY=str(CAPACITY),
        SHARED_CAPACITY="true",
        QUEUE_LEASE_S="0",
        CLAIM_IDLE_MS="1000",
        HEARTBEAT_INTERVAL_S="0.2",
        DEAD_AFTER_S="1",
        TAKEOVER_INTERVAL_S="0.3",
        LOG_LEVEL="ERROR",
    )


async def start_replicas(stack: Stack, n: int) -> dict[str, asyncio.subprocess.Process]:
    names = [f"replica-{i}" for i in range(1, n + 1)]
    return {name: await spawn_worker(replica_env(stack, name)) for name in names}


async def stop_all(procs: dict[str, asyncio.subprocess.Process]) -> None:
    for proc in procs.values():
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    await asyncio.gather(*(asyncio.wait_for(p.wait(), 30) for p in procs.values()))


def executions(stack: Stack) -> Counter[str]:
    total: Counter[str] = Counter()
    for i in range(len(stack.executors)):
        total.update(stack.executor_state(i).eval_ids)
    return total


def assert_capacity_held(stack: Stack) -> None:
    for i in range(len(stack.executors)):
        state = stack.executor_state(i)
        assert state.max_in_flight <= CAPACITY, (state.executor_id, state.max_in_flight)
        assert state.rejected_busy == 0, (state.executor_id, state.rejected_busy)


async def run_three_replicas(stack: Stack, n_tasks: int) -> None:
    ids = await stack.enqueue_many(n_tasks)
    procs = await start_replicas(stack, 3)
    try:
        await stack.wait_terminal(n_tasks, timeout_s=240)
        await stack.wait_messages(n_tasks, timeout_s=60)
        await asyncio.sleep(0.5)
    finally:
        await stop_all(procs)
    assert set(executions(stack)) == set(ids) and set(executions(stack).values()) == {1}
    per_task = Counter(p["eval_id"] for _, p in stack.messages)
    assert set(per_task) == set(ids) and set(per_task.values()) == {1}
    assert all(stack.queue_state.tasks[i].complete_calls == 1 for i in ids)
    assert_capacity_held(stack)
    pulled_by = Counter(
        e.worker_id for e in await stack.entries() if isinstance(e.event, ev.TaskPulled)
    )
    assert set(pulled_by) == {"replica-1", "replica-2", "replica-3"}, pulled_by


async def test_three_replicas_share_the_work_and_the_executors(stack_factory) -> None:
    stack: Stack = await stack_factory(
        start_worker=False, latency_s=0.01, executor_options=[{"capacity": CAPACITY}] * 3
    )
    await run_three_replicas(stack, 2000)


async def test_three_replicas_on_a_redis_cluster(stack_factory, cluster_url: str) -> None:
    stack: Stack = await stack_factory(
        redis=cluster_url,
        start_worker=False,
        latency_s=0.01,
        executor_options=[{"capacity": CAPACITY}] * 3,
    )
    await run_three_replicas(stack, 600)


async def test_a_killed_replica_is_taken_over_by_exactly_one_other(stack_factory) -> None:
    stack: Stack = await stack_factory(
        start_worker=False, latency_s=0.3, executor_options=[{"capacity": CAPACITY}] * 3
    )
    ids = await stack.enqueue_many(150)
    procs = await start_replicas(stack, 3)
    try:

        async def victim_has_tasks_in_flight() -> bool:
            entries = await stack.entries()
            dispatched = {
                e.event.eval_id for e in entries
                if isinstance(e.event, ev.TaskDispatched) and e.worker_id == "replica-1"
            }  # fmt: skip
            done = {e.event.eval_id for e in entries if isinstance(e.event, ev.TaskCompleted)}
            return len(dispatched - done) >= 1

        await eventually(victim_has_tasks_in_flight, timeout_s=60, interval_s=0.05)
        procs["replica-1"].send_signal(signal.SIGKILL)
        await procs["replica-1"].wait()
        await eventually(lambda: _all_recorded_done(stack), timeout_s=120, interval_s=0.2)
        await asyncio.sleep(1.0)
    finally:
        await stop_all(procs)
    entries = await stack.entries()
    recovered = [e for e in entries if isinstance(e.event, ev.TaskRecovered)]
    assert recovered, "replica-1's unfinished tasks were not taken over"
    takers: dict[str, set[str]] = defaultdict(set)
    for e in recovered:
        assert isinstance(e.event, ev.TaskRecovered)
        assert e.event.owner == "replica-1" and e.worker_id != "replica-1"
        takers[e.event.eval_id].add(e.worker_id)
    assert all(len(t) == 1 for t in takers.values())  # each task taken over once
    assert len({w for t in takers.values() for w in t}) == 1  # by exactly one replica
    assert max(Counter(e.event.eval_id_or_empty for e in recovered).values()) == 1
    pulled = {e.event.eval_id for e in entries if isinstance(e.event, ev.TaskPulled)}
    terminal = {i for i in ids if stack.queue_state.tasks[i].status in ("completed", "failed")}
    assert pulled <= terminal  # nothing recorded is lost
    per_task = Counter(p["eval_id"] for _, p in stack.messages)
    assert set(per_task) == terminal and set(per_task.values()) == {1}
    assert_capacity_held(stack)


def _all_recorded_done(stack: Stack) -> bool:
    stats = stack.queue_state.stats()
    return stats["queued"] == 0 and stats["running"] <= 1  # at most one lost in a pull window
