"""End to end: devstack queue, three simulated executors, the worker, a real Redis."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from tests.harness import Stack, eventually

HAPPY_PATH = [
    "task.pulled",
    "executor.selected",
    "task.dispatched",
    "task.completed",
    "task.reported",
]


async def test_200_tasks_each_routed_reported_and_published_once(stack_factory) -> None:
    stack: Stack = await stack_factory(executor_capacity=4)
    n = 240
    started = time.perf_counter()
    ids = await stack.enqueue_many(n)
    await stack.wait_terminal(n)
    await stack.wait_messages(n)
    elapsed = time.perf_counter() - started
    print(f"\n{n} tasks end to end in {elapsed:.2f}s: {n / elapsed:.0f} tasks/s")

    # The queue saw exactly one /complete per task, and nothing else.
    for eval_id in ids:
        record = stack.queue_state.tasks[eval_id]
        assert record.status == "completed"
        assert (record.complete_calls, record.fail_calls) == (1, 0), eval_id
        assert record.output["eval_id"] == eval_id
        assert record.output["status"] == "completed"

    # Exactly one evaluation:completed per task, in the seed's format.
    channels = Counter(channel for channel, _ in stack.messages)
    assert channels == {"evaluation:completed": n}
    per_task = Counter(payload["eval_id"] for _, payload in stack.messages)
    assert set(per_task) == set(ids) and set(per_task.values()) == {1}
    _, sample = stack.messages[0]
    assert set(sample) == {"eval_id", "result"}
    assert set(sample["result"]) >= {"status", "output", "exit_code"}
    assert sample["result"]["status"] == "completed" and sample["result"]["exit_code"] == 0

    # Every task's history is the full happy path, in order.
    entries = await stack.entries()
    history: dict[str, list[str]] = {}
    for entry in entries:
        if entry.event.eval_id_or_empty:
            history.setdefault(entry.event.eval_id_or_empty, []).append(entry.event.type)
    assert {eval_id: history[eval_id] for eval_id in ids} == {
        eval_id: HAPPY_PATH for eval_id in ids
    }

    # Work was spread over the three executors, each executing each task at most once.
    executed = [stack.executor_state(i).executed for i in range(3)]
    assert sum(executed) == n and min(executed) > 0
    for i in range(3):
        assert stack.executor_state(i).max_in_flight <= 4
        assert set(stack.executor_state(i).eval_ids.values()) == {1}


async def test_in_flight_never_exceeds_capacity_and_uses_it(stack_factory) -> None:
    stack: Stack = await stack_factory(latency_s=0.05, executor_capacity=3)
    await stack.enqueue_many(60)
    await stack.wait_terminal(60)
    peaks = [stack.executor_state(i).max_in_flight for i in range(3)]
    assert max(peaks) <= 3
    assert min(peaks) >= 2  # several tasks in flight at once on every executor
    assert all(stack.executor_state(i).rejected_busy == 0 for i in range(3))


@pytest.mark.parametrize("ahead", [0, 1, 2])
async def test_pull_ahead_holds_that_many_tasks_beyond_capacity(stack_factory, ahead) -> None:
    """With every slot busy, PULL_AHEAD tasks wait, pulled, and /status counts them as
    waiting; never more, no executor beyond its capacity, and every task completes."""
    stack: Stack = await stack_factory(
        executors=1, latency_s=0.15, executor_capacity=1, pull_ahead=ahead
    )
    await stack.enqueue_many(6)
    seen: list[tuple[int, int]] = []  # (in flight: on the executor or waiting, waiting)

    async def sample() -> bool:
        status, body = await stack.get_json("/status")
        assert status == 200
        seen.append((body["in_flight"], body["waiting"]))
        return stack.executor_state(0).executed >= 4

    await eventually(sample, interval_s=0.01)
    await stack.wait_terminal(6)
    assert max(in_flight for in_flight, _ in seen) == 1 + ahead
    assert max(waiting for _, waiting in seen) == ahead
    assert all(waiting < in_flight or in_flight == 0 for in_flight, waiting in seen)
    assert stack.executor_state(0).max_in_flight == 1
    assert stack.executor_state(0).rejected_busy == 0
    assert all(t.status == "completed" for t in stack.queue_state.tasks.values())
    assert len(stack.queue_state.tasks) == 6


async def test_task_timeout_is_passed_to_the_executor(stack_factory) -> None:
    stack: Stack = await stack_factory()
    await stack.enqueue("slow", timeout=7)
    dispatched = await stack.wait_event("task.dispatched", eval_id="slow")
    assert dispatched.event.timeout_s == 7  # type: ignore[union-attr]
    await stack.enqueue("default")
    dispatched = await stack.wait_event("task.dispatched", eval_id="default")
    assert dispatched.event.timeout_s == 30  # type: ignore[union-attr]


async def test_api_key_is_sent_to_the_queue(stack_factory) -> None:
    stack: Stack = await stack_factory(api_key="s3cret-key")
    await stack.enqueue("with-key")
    await stack.wait_terminal(1)
    assert stack.queue_state.tasks["with-key"].status == "completed"
