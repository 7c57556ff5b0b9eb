"""Fault injection: the worker as a real process, SIGKILLed at random moments while tasks flow.

Without leases (the original queue contract) a kill can strand at most the one task whose
answer was in flight in the pull window, and every such kill is flagged by a
``pull.interrupted``; every recorded task ends exactly once. With the devstack queue's leases
nothing at all is lost.
"""

from __future__ import annotations

import asyncio
import random
import signal
from collections import Counter
from dataclasses import dataclass

from queue_worker.streams import events as ev
from tests.harness import Stack, eventually, spawn_worker

TASKS = 1000
KILLS = 10


@dataclass
class Outcome:
    kills: int
    terminal: set[str]
    lost: set[str]  # still "running" in the queue, never recorded
    messages: Counter[str]
    executions: Counter[str]
    pulled: set[str]
    interrupted: int
    redispatched: int


def worker_env(stack: Stack, lease_s: float) -> dict[str, str]:
    return stack.process_env(
        "crash-worker",
        EXECUTOR_CAPACITY="2",
        QUEUE_LEASE_S=str(lease_s),
        CLAIM_IDLE_MS="1000",
        RETRY_BASE_MS="10",
        HEALTH_INTERVAL_S="1",
        LOG_LEVEL="ERROR",
    )


async def run_with_kills(stack: Stack, lease_s: float, seed: int) -> Outcome:
    rng = random.Random(seed)
    env = worker_env(stack, lease_s)
    ids = await stack.enqueue_many(TASKS)
    kills = 0
    for _ in range(KILLS):
        proc = await spawn_worker(env)
        await asyncio.sleep(rng.uniform(1.0, 2.2))
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        kills += 1
    proc = await spawn_worker(env)
    try:
        await eventually(lambda: _settled(stack, ids), timeout_s=120, interval_s=0.2)
        await asyncio.sleep(1.0)  # let the last messages arrive
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    entries = await stack.entries()
    state = stack.queue_state
    terminal = {i for i in ids if state.tasks[i].status in ("completed", "failed")}
    executions: Counter[str] = Counter()
    for i in range(len(stack.executors)):
        executions.update(stack.executor_state(i).eval_ids)
    return Outcome(
        kills=kills,
        terminal=terminal,
        lost=set(ids) - terminal,
        messages=Counter(payload["eval_id"] for _, payload in stack.messages),
        executions=executions,
        pulled={e.event.eval_id for e in entries if isinstance(e.event, ev.TaskPulled)},
        interrupted=sum(isinstance(e.event, ev.PullInterrupted) for e in entries),
        redispatched=sum(
            isinstance(e.event, ev.TaskRecovered) and e.event.action == "redispatch"
            for e in entries
        ),
    )


def _settled(stack: Stack, ids: list[str]) -> bool:
    """Nothing queued, and every task that is not running (lost) has its one message."""
    stats = stack.queue_state.stats()
    done = stats["completed"] + stats["failed"]
    return stats["queued"] == 0 and len({p["eval_id"] for _, p in stack.messages}) >= done


def report(label: str, o: Outcome) -> None:
    duplicates = sum(n - 1 for n in o.executions.values() if n > 1)
    print(
        f"\n{label}: kills={o.kills} terminal={len(o.terminal)}/{TASKS} "
        f"lost_after_recorded={len(o.lost & o.pulled)} "
        f"lost_in_pull_window={len(o.lost - o.pulled)} "
        f"pull_interrupted={o.interrupted} duplicate_messages="
        f"{sum(n - 1 for n in o.messages.values())} duplicate_executions={duplicates} "
        f"redispatched={o.redispatched}"
    )


async def test_sigkill_without_leases_loses_nothing_recorded(stack_factory) -> None:
    stack: Stack = await stack_factory(start_worker=False, latency_s=0.1)
    o = await run_with_kills(stack, lease_s=0, seed=1)
    report("without leases", o)
    assert o.kills >= 10
    assert o.lost & o.pulled == set()  # every recorded task ended
    assert len(o.lost) <= o.kills and len(o.lost) <= o.interrupted  # each loss is flagged
    assert all(stack.queue_state.tasks[i].status == "running" for i in o.lost)
    assert set(o.messages) == o.terminal and set(o.messages.values()) == {1}
    # Re-runs happen only for tasks that were in flight when a worker died.
    duplicates = sum(n - 1 for n in o.executions.values() if n > 1)
    assert duplicates <= o.redispatched


async def test_sigkill_with_leases_loses_nothing(stack_factory) -> None:
    stack: Stack = await stack_factory(start_worker=False, latency_s=0.1)
    o = await run_with_kills(stack, lease_s=5, seed=2)
    report("with leases", o)
    assert o.kills >= 10
    assert o.lost == set() and len(o.terminal) == TASKS
    assert stack.queue_state.stats()["running"] == 0
    assert set(o.messages) == o.terminal and set(o.messages.values()) == {1}
