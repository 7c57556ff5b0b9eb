"""Deadlines: a task's own ``deadline`` or ``TASK_DEADLINE_S`` from its pull; no dispatch
after it, waits and retry backoffs cut to it, ``task.failed`` with ``deadline_exceeded``.

Real queue, executors and worker; every timing check leaves seconds of margin.
"""

from __future__ import annotations

import time
from typing import TypeVar

from queue_worker.streams import events as ev
from tests.harness import Stack

E = TypeVar("E", bound=ev.Event)


def of(entries: list[ev.Entry], kind: type[E]) -> list[E]:
    return [e.event for e in entries if isinstance(e.event, kind)]


def entry_of(entries: list[ev.Entry], kind: type[ev.Event], eval_id: str) -> ev.Entry:
    return next(
        e for e in entries if isinstance(e.event, kind) and e.event.eval_id_or_empty == eval_id
    )


async def test_a_task_pulled_after_its_deadline_is_failed_not_run(stack_factory) -> None:
    stack: Stack = await stack_factory(executors=1)
    await stack.enqueue("stale", deadline=time.time() - 5)
    await stack.enqueue("fresh", deadline=time.time() + 600)
    await stack.wait_terminal(2)
    await stack.wait_messages(2)
    assert await stack.types_for("stale") == ["task.pulled", "task.failed", "task.reported"]
    entries = await stack.entries()
    [failed] = of(entries, ev.TaskFailed)
    assert (failed.eval_id, failed.reason, failed.executor) == ("stale", "deadline_exceeded", None)
    assert [(a.reason, a.executor) for a in failed.attempts] == [("deadline_exceeded", None)]
    assert "deadline passed" in failed.error
    assert stack.executor_state(0).eval_ids == {"fresh": 1}  # the stale one never went out
    assert stack.queue_state.tasks["stale"].status == "failed"
    assert stack.queue_state.tasks["fresh"].status == "completed"
    assert {p["eval_id"]: c for c, p in stack.messages} == {
        "stale": "evaluation:failed",
        "fresh": "evaluation:completed",
    }


async def test_waiting_for_a_slot_ends_at_the_deadline(stack_factory) -> None:
    stack: Stack = await stack_factory(
        executors=1, executor_capacity=1, latency_s=8.0, task_deadline_s=1.0
    )
    await stack.enqueue("slow")  # takes the only slot for 8 s
    await stack.wait_event("task.dispatched", eval_id="slow")
    await stack.enqueue("behind")
    failed = await stack.wait_event("task.failed", eval_id="behind", timeout_s=6.0)
    entries = await stack.entries()
    pulled = entry_of(entries, ev.TaskPulled, "behind")
    assert isinstance(pulled.event, ev.TaskPulled) and isinstance(failed.event, ev.TaskFailed)
    # The recorded task carries the deadline applied: its pull + TASK_DEADLINE_S.
    deadline = pulled.event.task.deadline
    assert deadline is not None and abs(deadline - (pulled.ts / 1000 + 1.0)) < 0.5
    assert failed.event.reason == "deadline_exceeded"
    assert 900 <= failed.ts - pulled.ts < 6000  # at the deadline, long before the slot frees
    assert "behind" not in stack.executor_state(0).eval_ids
    assert (await stack.types_for("behind"))[:2] == ["task.pulled", "task.failed"]


async def test_a_retry_backoff_is_cut_to_the_deadline(stack_factory) -> None:
    stack: Stack = await stack_factory(
        executors=2,
        executor_options=[{"execute": "error500"}, {"execute": "error500"}],
        retry_base_ms=60_000,  # a backoff far past the deadline
        retry_max_ms=60_000,
        max_attempts=3,
        task_deadline_s=1.5,
    )
    await stack.enqueue("doomed")
    failed = await stack.wait_event("task.failed", eval_id="doomed", timeout_s=10.0)
    assert isinstance(failed.event, ev.TaskFailed)
    assert failed.event.reason == "deadline_exceeded"
    reasons = [a.reason for a in failed.event.attempts]
    assert reasons[0] == "executor_http_error" and reasons[-1] == "deadline_exceeded"
    entries = await stack.entries()
    retries = [r for r in of(entries, ev.TaskRetryScheduled) if r.eval_id == "doomed"]
    assert retries and all(r.delay_ms <= 1500 for r in retries)
    pulled = entry_of(entries, ev.TaskPulled, "doomed")
    assert failed.ts - pulled.ts < 5000  # not the 60 s backoff


async def test_the_earlier_deadline_applies(stack_factory) -> None:
    stack: Stack = await stack_factory(executors=1, task_deadline_s=60.0)
    own = round(time.time() + 5, 3)
    await stack.enqueue("own-first", deadline=own)
    await stack.enqueue("ours-first", deadline=time.time() + 3600)
    await stack.wait_terminal(2)
    entries = await stack.entries()
    recorded = {
        p.eval_id: (p.task.deadline, e.ts)
        for e in entries
        if isinstance(p := e.event, ev.TaskPulled)
    }
    assert recorded["own-first"][0] == own
    deadline, pulled_ms = recorded["ours-first"]
    assert deadline is not None and abs(deadline - (pulled_ms / 1000 + 60)) < 1
    assert stack.queue_state.tasks["own-first"].status == "completed"
