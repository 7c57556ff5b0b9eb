"""Routing through fleet-wide trouble: maximum ejection, the panic threshold, slow start.

Real devstack executors switched at runtime and a real worker; the checks count
events and read ``why``, with no speed target.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TypeVar

from queue_worker.router.executor_state import ExecutorState
from queue_worker.streams import events as ev
from tests.harness import Stack

E = TypeVar("E", bound=ev.Event)


def of(entries: list[ev.Entry], kind: type[E]) -> list[E]:
    return [e.event for e in entries if isinstance(e.event, kind)]


async def test_a_fleet_wide_fault_ejects_no_more_than_max_ejection_percent(
    stack_factory,
) -> None:
    stack: Stack = await stack_factory(
        executors=4,
        executor_options=[{"execute": "error500"}] * 4,
        executor_capacity=1,
        eject_after_failures=1,
        eject_base_s=60,
        max_ejection_percent=50,  # 2 of 4
        retry_budget_percent=100,
        retry_base_ms=1,
        retry_max_ms=1,
    )
    ids = await stack.enqueue_many(12)
    await stack.wait_terminal(12)
    entries = await stack.entries()
    ejected = of(entries, ev.ExecutorEjected)
    assert len(ejected) == 2  # every executor failed, and only half of them went out
    assert len({x.executor for x in ejected}) == 2
    assert {f.eval_id for f in of(entries, ev.TaskFailed)} == set(ids)
    # The two left in kept taking the tasks (and failing them): work was never stopped.
    kept = {s.executor for s in of(entries, ev.ExecutorSelected)} - {x.executor for x in ejected}
    assert len(kept) == 2


async def test_below_the_panic_threshold_every_executor_is_routed_to(stack_factory) -> None:
    stack: Stack = await stack_factory(
        executors=4,
        executor_capacity=1,
        panic_threshold=50,
        health_interval_s=0.1,
        executor_options=[{"latency_s": 0.05}] * 4,
    )
    for x in stack.executors:  # every executor checked once: 4 of 4 healthy
        await stack.wait_event("executor.health_changed", executor=x.url, healthy=True)
    # Three health endpoints fail while their /execute still works (a health check that
    # lies): without panic one executor would take every task.
    for i in (1, 2, 3):
        await stack.control(i, health="unhealthy")
    entered = await stack.wait_event("routing.panic_entered")
    assert isinstance(entered.event, ev.RoutingPanicEntered)
    assert (entered.event.healthy, entered.event.executors) == (1, 4)
    assert entered.event.threshold_percent == 50
    _, status = await stack.get_json("/status")
    assert status["panic"] is True
    await stack.enqueue_many(16, prefix="p")
    await stack.wait_terminal(16)
    entries = await stack.entries()
    after = [e.event for e in entries if e.id > entered.id]
    chosen = [s for s in after if isinstance(s, ev.ExecutorSelected)]
    assert len({s.executor for s in chosen}) >= 3  # not all on the one that passes its checks
    assert all("panic: 1 of 4 executors healthy" in s.why for s in chosen)
    assert len([c for c in after if isinstance(c, ev.TaskCompleted)]) == 16  # all ran
    assert not [f for f in after if isinstance(f, ev.TaskFailed)]
    # Healthy again: panic ends, and routing follows the checks.
    for i in (1, 2, 3):
        await stack.control(i, health="healthy")
    left = await stack.wait_event("routing.panic_left")
    assert isinstance(left.event, ev.RoutingPanicLeft) and left.event.lasted_s > 0
    assert left.event.healthy >= 2
    _, status = await stack.get_json("/status")
    assert status["panic"] is False


async def test_no_panic_when_off_the_healthy_executor_takes_everything(stack_factory) -> None:
    stack: Stack = await stack_factory(
        executors=3, executor_capacity=1, health_interval_s=0.1
    )  # PANIC_THRESHOLD defaults to 0
    for i in (1, 2):
        await stack.control(i, health="unhealthy")
    for i in (1, 2):
        await stack.wait_event(
            "executor.health_changed", executor=stack.executors[i].url, healthy=False
        )
    await stack.enqueue_many(5)
    await stack.wait_terminal(5)
    entries = await stack.entries()
    assert not of(entries, ev.RoutingPanicEntered)
    assert {s.executor for s in of(entries, ev.ExecutorSelected)} == {stack.executors[0].url}


def test_warmth_ramps_linearly_and_ends() -> None:
    x = ExecutorState(url="http://x:1", capacity=1)
    assert x.warmth(5.0) == 1.0
    x.warm_up(10.0, now=100.0)
    assert x.warmth(100.0) == 0.0
    assert x.warmth(102.5) == 0.25
    assert x.warmth(109.0) == 0.9
    assert x.warmth(110.0) == 1.0 and x.warm_until == 0.0  # over: no longer warming
    x.warm_up(0.0, now=200.0)  # SLOW_START_S=0: no slow start
    assert x.warmth(200.0) == 1.0


async def test_an_executor_back_from_trouble_ramps_up_over_slow_start(stack_factory) -> None:
    stack: Stack = await stack_factory(
        executors=3,
        executor_capacity=2,
        slow_start_s=3.0,
        health_interval_s=0.1,
        executor_options=[{"latency_s": 0.02}] * 3,
    )
    back = stack.executors[2].url
    await stack.control(2, health="unhealthy")
    await stack.wait_event("executor.health_changed", executor=back, healthy=False)
    await stack.control(2, health="healthy")
    flipped = await stack.wait_event("executor.health_changed", executor=back, healthy=True)
    feeding = asyncio.create_task(_feed(stack, 0.01))
    try:
        await asyncio.sleep(4.0)
    finally:
        feeding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeding
    entries = await stack.entries()
    chosen = [e for e in entries if isinstance(e.event, ev.ExecutorSelected) and e.id > flipped.id]
    warm = [
        (e.ts, c.warmth)
        for e in chosen
        for c in e.event.candidates  # type: ignore[union-attr]
        if c.executor == back and c.warmth is not None
    ]
    assert warm, "the returning executor was never seen warming up"
    shares = [w for _, w in warm]
    assert shares == sorted(shares) and 0 <= shares[0] < 0.5 and shares[-1] < 1
    assert all(ts - flipped.ts <= 3_200 for ts, _ in warm)  # warmth ends after SLOW_START_S
    whys = [e.event.why for e in chosen]  # type: ignore[union-attr]
    assert any(f"{back} passed over: warming up" in w for w in whys)

    # Its share of the choices: small while cold, a full third once warm.
    def share(lo_ms: int, hi_ms: int) -> float:
        window = [e for e in chosen if lo_ms <= e.ts - flipped.ts < hi_ms]
        return sum(e.event.executor == back for e in window) / max(len(window), 1)  # type: ignore[union-attr]

    assert share(0, 1000) < share(3200, 4000)


async def _feed(stack: Stack, every_s: float) -> None:
    i = 0
    while True:
        await stack.enqueue(f"w-{i:05d}")
        i += 1
        await asyncio.sleep(every_s)
