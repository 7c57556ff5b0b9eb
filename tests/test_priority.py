"""Priority among the tasks waiting in the worker for a slot, with aging.

A real queue, a real executor busy with one task, and tasks pulled ahead that wait
for its slot: the order of their dispatches is read from the stream.
"""

from __future__ import annotations

import asyncio

from queue_worker.streams import events as ev
from tests.harness import Stack, eventually


async def _dispatch_order(stack: Stack) -> list[str]:
    entries = await stack.entries()
    return [e.event.eval_id for e in entries if isinstance(e.event, ev.TaskDispatched)]


async def _pulled(stack: Stack, n: int) -> bool:
    return sum(isinstance(e.event, ev.TaskPulled) for e in await stack.entries()) >= n


async def _line_up(stack: Stack, gap_s: float) -> None:
    """One task on the only slot, then four of priority 0 waiting, then, ``gap_s``
    later, two of priority 1."""
    await stack.enqueue("blocker")
    await stack.wait_event("task.dispatched", eval_id="blocker")
    await stack.enqueue_many(4, prefix="low", priority=0)
    await eventually(lambda: _pulled(stack, 5))
    await stack.control(0, latency_s=0.3)  # the rest run faster
    await asyncio.sleep(gap_s)
    for i in range(2):
        await stack.enqueue(f"high-{i}", priority=1)
        await eventually(lambda: _pulled(stack, 6 + i))  # noqa: B023 (awaited here)


async def test_waiting_tasks_are_served_highest_priority_first(stack_factory) -> None:
    stack: Stack = await stack_factory(
        executors=1,
        executor_capacity=1,
        pull_ahead=10,
        priority_aging_s=0,  # no aging
        executor_options=[{"latency_s": 1.5}],
    )
    await _line_up(stack, gap_s=0.1)
    await stack.wait_terminal(7)
    order = await _dispatch_order(stack)
    assert order == ["blocker", "high-0", "high-1", *(f"low-{i:05d}" for i in range(4))]
    entries = await stack.entries()
    why = next(
        e.event.why
        for e in entries
        if isinstance(e.event, ev.ExecutorSelected) and e.event.eval_id == "high-0"
    )
    assert "served by priority 1" in why and "with 5 waiting" in why


async def test_aging_lets_long_waiting_tasks_go_before_later_higher_ones(
    stack_factory,
) -> None:
    stack: Stack = await stack_factory(
        executors=1,
        executor_capacity=1,
        pull_ahead=10,
        priority_aging_s=0.1,  # one level per 0.1 s waited
        executor_options=[{"latency_s": 1.5}],
    )
    # The low ones waited 0.5 s (five levels) more than the high ones: they stay ahead.
    await _line_up(stack, gap_s=0.5)
    await stack.wait_terminal(7)
    order = await _dispatch_order(stack)
    assert order == ["blocker", *(f"low-{i:05d}" for i in range(4)), "high-0", "high-1"]
