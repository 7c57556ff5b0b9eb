"""Executor back-pressure: a 429 or 503 from ``/execute`` cools that executor down for its
``Retry-After`` and routes the task again without spending an attempt.

Real executors (the devstack's, in ``throttle`` mode or switched at runtime) and a real
worker; each check leaves seconds of margin (no speed target here).
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import TypeVar

from queue_worker.devstack.serve import Server
from queue_worker.http.app import create_app
from queue_worker.router.attempts import MAX_THROTTLES
from queue_worker.streams import events as ev
from queue_worker.streams.views import fold
from tests.harness import Stack, eventually

E = TypeVar("E", bound=ev.Event)


def of(entries: list[ev.Entry], kind: type[E]) -> list[E]:
    return [e.event for e in entries if isinstance(e.event, kind)]


async def test_a_throttling_executor_cools_down_and_the_task_goes_elsewhere(
    stack_factory,
) -> None:
    stack: Stack = await stack_factory(
        executors=2, executor_capacity=1, executor_options=[{"execute": "throttle"}, {}]
    )
    await stack.control(0, retry_after="30")
    throttler, worker = stack.executors[0].url, stack.executors[1].url
    ids = await stack.enqueue_many(6)
    await stack.wait_terminal(6)
    await stack.wait_messages(6)
    entries = await stack.entries()
    # With executor-2 busy, executor-1 was the only one with a free slot: it was tried
    # once, answered 429, and was left alone for the 30 s it asked for.
    [throttled] = of(entries, ev.ExecutorThrottled)
    assert (throttled.executor, throttled.http_status) == (throttler, 429)
    assert throttled.retry_after_s == 30.0 and throttled.cooldown_s == 30.0
    assert stack.executor_state(0).throttled == 1
    completed = of(entries, ev.TaskCompleted)
    assert sorted(c.eval_id for c in completed) == ids
    assert all(c.executor == worker and c.attempt == 1 for c in completed)  # no attempt spent
    assert not of(entries, ev.TaskRetryScheduled) and not of(entries, ev.ExecutorEjected)
    # The stream says why the same attempt was dispatched twice.
    assert await stack.types_for(throttled.eval_id) == [
        "task.pulled", "executor.selected", "task.dispatched", "executor.throttled",
        "executor.selected", "task.dispatched", "task.completed", "task.reported",
    ]  # fmt: skip
    throttled_at = next(e.id for e in entries if isinstance(e.event, ev.ExecutorThrottled))
    later = [
        e.event for e in entries if isinstance(e.event, ev.ExecutorSelected) and e.id > throttled_at
    ]
    assert later
    cooling = {c.executor: c.cooling_s for s in later for c in s.candidates}
    assert (cooling[throttler] or 0) > 20
    assert cooling[worker] is None
    # Folded, every attempt ended: no executor is left with a task in flight.
    view = fold(entries)
    assert view.executors[throttler].throttles == 1
    assert all(x.in_flight == 0 for x in view.executors.values())
    _, status = await stack.get_json("/status")
    board = {x["url"]: x for x in status["executors"]}
    assert board[throttler]["throttles"] == 1 and board[throttler]["cooling_s"] > 20
    assert board[throttler]["healthy"] and not board[throttler]["ejected"]
    assert board[worker]["throttles"] == 0 and board[worker]["cooling_s"] is None


async def test_a_task_waits_for_the_only_executor_to_cool_down(stack_factory) -> None:
    stack: Stack = await stack_factory(
        executors=1, executor_capacity=1, executor_options=[{"execute": "throttle"}]
    )
    await stack.control(0, retry_after="2")
    await stack.enqueue("patient")
    throttled = await stack.wait_event("executor.throttled", eval_id="patient")
    await stack.control(0, execute="normal")  # within its 2 s cool-down
    done = await stack.wait_event("task.completed", eval_id="patient")
    assert isinstance(done.event, ev.TaskCompleted) and done.event.attempt == 1
    # Not sent again before the cool-down was over; not failed as no_healthy_executor.
    assert done.ts - throttled.ts >= 1900
    assert stack.executor_state(0).throttled == 1
    # Reported after the completion was recorded (by the reporter, a moment later).
    await eventually(lambda: stack.queue_state.tasks["patient"].status == "completed")


async def test_a_task_throttled_without_end_fails_as_executor_throttled(stack_factory) -> None:
    stack: Stack = await stack_factory(
        executors=1,
        executor_capacity=1,
        executor_options=[{"execute": "throttle"}],
        eject_after_failures=1,  # a throttle is not a failure: it never ejects
    )
    await stack.control(0, retry_after="0")  # each cool-down is then the 0.05 s floor
    await stack.enqueue("refused")
    await stack.wait_terminal(1)
    await stack.wait_messages(1)
    entries = await stack.entries()
    [failed] = of(entries, ev.TaskFailed)
    assert (failed.reason, failed.attempt) == ("executor_throttled", 1)
    assert [a.reason for a in failed.attempts] == ["executor_throttled"]
    assert len(of(entries, ev.ExecutorThrottled)) == MAX_THROTTLES + 1
    assert stack.executor_state(0).throttled == MAX_THROTTLES + 1
    assert not of(entries, ev.ExecutorEjected) and not of(entries, ev.TaskRetryScheduled)
    assert Counter(c for c, _ in stack.messages) == {"evaluation:failed": 1}
    assert stack.queue_state.tasks["refused"].status == "failed"
    _, health = await stack.get_json("/health")
    assert health["executors_healthy"] == 1


async def test_a_busy_executor_503_is_back_pressure(stack_factory) -> None:
    # The executor takes one task at a time, the worker believes it takes four: the
    # executor's own 503 "busy" keeps the extra tasks waiting instead of failing them.
    stack: Stack = await stack_factory(
        executors=1,
        executor_capacity=4,
        latency_s=0.3,
        executor_options=[{"capacity": 1}],
    )
    await stack.control(0, retry_after="0")
    ids = await stack.enqueue_many(4)
    await stack.wait_terminal(4)
    entries = await stack.entries()
    completed = of(entries, ev.TaskCompleted)
    assert sorted(c.eval_id for c in completed) == ids
    assert all(c.attempt == 1 for c in completed)
    throttles = of(entries, ev.ExecutorThrottled)
    assert throttles and all(t.http_status == 503 for t in throttles)
    assert stack.executor_state(0).rejected_busy == len(throttles)
    assert stack.executor_state(0).max_in_flight == 1


async def test_the_rate_limit_is_shared_by_the_replicas(stack_factory) -> None:
    stack: Stack = await stack_factory(
        executors=2,
        executor_capacity=8,
        executor_rate_limit=5,  # per executor, for the whole fleet
        pull_ahead=8,
    )
    second = Server(create_app(stack.settings.with_(hostname="second-worker")))
    await second.start()
    try:
        ids = await stack.enqueue_many(20)
        await stack.wait_terminal(20)
    finally:
        await second.stop()
    entries = await stack.entries()
    dispatched = [(e, e.event) for e in entries if isinstance(e.event, ev.TaskDispatched)]
    assert {e.worker_id for e, _ in dispatched} == {"test-worker", "second-worker"}
    assert sorted(d.eval_id for _, d in dispatched) == ids
    for url in (x.url for x in stack.executors):
        # At 5/s, one every 200 ms to each executor, whichever replica sends it.
        times = sorted(e.ts for e, d in dispatched if d.executor == url)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert len(times) >= 2 and min(gaps) >= 190, gaps
    paced = [
        e.event
        for e in entries
        if isinstance(e.event, ev.ExecutorSelected)
        and "paced by EXECUTOR_RATE_LIMIT 5/s" in e.event.why
    ]
    assert paced  # choices that went elsewhere because an executor was at its rate


async def test_a_cool_down_binds_every_replica(stack_factory) -> None:
    # Executor-1 answers every /execute with 429 and Retry-After: 30. The first replica
    # learns it by trying; the second, started after, never sends it a task: it obeys
    # the executor.throttled its peer recorded.
    stack: Stack = await stack_factory(
        executors=2, executor_capacity=4, executor_options=[{"execute": "throttle"}, {}]
    )
    await stack.control(0, retry_after="30")
    throttler, worker = stack.executors[0].url, stack.executors[1].url
    for i in range(10):  # one at a time until the first replica has tried executor-1
        await stack.enqueue(f"first-{i}")
        await stack.wait_terminal(i + 1)
        if of(await stack.entries(), ev.ExecutorThrottled):
            break
    [throttled] = of(await stack.entries(), ev.ExecutorThrottled)
    assert throttled.executor == throttler and throttled.cooldown_s == 30.0
    done = stack.terminal_in_queue()

    second = Server(create_app(stack.settings.with_(hostname="second-worker")))
    await second.start()
    try:
        await stack.stop_worker()  # only the second replica pulls from here on
        ids = await stack.enqueue_many(8, prefix="second")
        await stack.wait_terminal(done + 8)
    finally:
        await second.stop()
    entries = await stack.entries()
    assert len(of(entries, ev.ExecutorThrottled)) == 1  # nobody tried executor-1 again
    by_second = [
        e.event
        for e in entries
        if e.worker_id == "second-worker" and isinstance(e.event, ev.TaskDispatched)
    ]
    assert sorted(d.eval_id for d in by_second) == ids
    assert {d.executor for d in by_second} == {worker}
    choices = [
        e.event
        for e in entries
        if e.worker_id == "second-worker" and isinstance(e.event, ev.ExecutorSelected)
    ]
    cooling = [c.cooling_s for s in choices for c in s.candidates if c.executor == throttler]
    assert cooling and all(s is not None and s > 20 for s in cooling), cooling
