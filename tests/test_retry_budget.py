"""The retry budget: retries are at most RETRY_BUDGET_PERCENT of the fleet's dispatches over
10 s (at least RETRY_BUDGET_MIN); a retry over budget fails the task as
``retry_budget_exhausted``. On a real Redis, and with a real worker and executors."""

from __future__ import annotations

import time

from queue_worker.streams import events as ev
from queue_worker.streams.budget import BUDGET_WINDOW_S, RetryBudget
from queue_worker.streams.connection import open_redis
from queue_worker.streams.keys import Keys
from queue_worker.streams.store import EventStore
from tests.harness import Stack


def dispatched(eval_id: str) -> ev.TaskDispatched:
    return ev.TaskDispatched(eval_id=eval_id, executor="http://x:1", attempt=1, timeout_s=1.0)


async def test_appended_dispatches_fund_retries_fleet_wide(redis_url: str, prefix: str) -> None:
    redis = await open_redis(redis_url)
    store = EventStore(redis, Keys(prefix), "w1")
    await store.start()
    try:
        # Two replicas share one budget: 20 % of 10 dispatches is 2, but at least 3.
        one = RetryBudget(redis, Keys(prefix), percent=20, least=3)
        two = RetryBudget(redis, Keys(prefix), percent=20, least=3)
        await store.append(*(dispatched(f"t{i}") for i in range(10)))
        now = int(time.time())
        verdicts = [await b.admit(now) for b in (one, two, one, two)]
        assert [v.admitted for v in verdicts] == [True, True, True, False]
        assert verdicts[-1].retries == 3 and verdicts[-1].dispatches == 10
        assert verdicts[-1].allowed == 3
        # 40 more dispatches: 20 % of 50 is 10 retries in the window.
        await store.append(*(dispatched(f"u{i}") for i in range(40)))
        now = int(time.time())
        more = [await one.admit(now) for _ in range(10)]
        assert sum(v.admitted for v in more) == 7 and more[-1].allowed == 10
        # The window slides: ten seconds on, neither those dispatches nor retries count.
        later = await one.admit(now + BUDGET_WINDOW_S)
        assert later.admitted and (later.retries, later.dispatches) == (1, 0)
        assert "RETRY_BUDGET_PERCENT=20" in later.explain(20, 3)
    finally:
        await store.stop()
        await redis.aclose()


async def test_a_fleet_wide_outage_spends_the_budget_then_fails_fast(stack_factory) -> None:
    stack: Stack = await stack_factory(
        executors=2,
        executor_options=[{"execute": "error500"}, {"execute": "error500"}],
        executor_capacity=1,
        retry_base_ms=1,
        retry_max_ms=1,
        max_attempts=3,
        eject_after_failures=0,
        retry_budget_percent=0,  # only the minimum
        retry_budget_min=2,
    )
    ids = await stack.enqueue_many(4)
    await stack.wait_terminal(4)
    entries = await stack.entries()
    retries = [e for e in entries if isinstance(e.event, ev.TaskRetryScheduled)]
    failed = {e.event.eval_id: e.event for e in entries if isinstance(e.event, ev.TaskFailed)}
    assert sorted(failed) == ids
    window_s = (entries[-1].ts - entries[0].ts) / 1000
    if window_s < BUDGET_WINDOW_S:  # a run slower than the window would refill it
        assert len(retries) == 2
    over = [f for f in failed.values() if f.reason == "retry_budget_exhausted"]
    assert len(over) >= 4 - len(retries)
    for f in over:
        assert f.executor is not None and [a.reason for a in f.attempts][-1] == (
            "executor_http_error"
        )
        assert "the retry budget is spent" in f.error and "RETRY_BUDGET_MIN=2" in f.error
    assert all(stack.queue_state.tasks[i].status == "failed" for i in ids)


async def test_no_budget_at_100_percent(stack_factory) -> None:
    stack: Stack = await stack_factory(
        executors=2,
        executor_options=[{"execute": "error500"}, {"execute": "error500"}],
        retry_base_ms=1,
        retry_max_ms=1,
        max_attempts=3,
        eject_after_failures=0,
        retry_budget_percent=100,
        retry_budget_min=0,
    )
    await stack.enqueue_many(3)
    await stack.wait_terminal(3)
    entries = await stack.entries()
    reasons = {e.event.reason for e in entries if isinstance(e.event, ev.TaskFailed)}
    assert reasons == {"executor_http_error"}
    assert len([e for e in entries if isinstance(e.event, ev.TaskRetryScheduled)]) == 6
