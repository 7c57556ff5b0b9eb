"""Things go wrong: each yields the right event, and the loop goes on."""

from __future__ import annotations

from collections import Counter

from queue_worker.streams import events as ev
from tests.harness import Stack, eventually


def failed_reasons(entries: list[ev.Entry]) -> dict[str, str]:
    return {e.event.eval_id: e.event.reason for e in entries if isinstance(e.event, ev.TaskFailed)}


async def test_failing_code_is_failed_reported_and_published(stack_factory) -> None:
    stack: Stack = await stack_factory()
    await stack.enqueue("bad", code="SIMULATE_FAIL")
    await stack.enqueue("late", code="SIMULATE_TIMEOUT")
    await stack.enqueue("good")
    await stack.wait_terminal(3)
    await stack.wait_messages(3)
    q = stack.queue_state.tasks
    assert (q["bad"].status, q["bad"].error) == ("failed", "simulated failure")
    assert (q["late"].status, q["late"].error) == ("failed", "execution timed out")
    assert q["good"].status == "completed"
    messages = {p["eval_id"]: (c, p) for c, p in stack.messages}
    channel, payload = messages["bad"]
    assert channel == "evaluation:failed"
    assert payload["error"] == "simulated failure"
    assert payload["result"]["status"] == "failed" and payload["result"]["exit_code"] == 1
    assert failed_reasons(await stack.entries()) == {
        "bad": "execution_failed",
        "late": "execution_timeout",
    }
    assert await stack.types_for("bad") == [
        "task.pulled", "executor.selected", "task.dispatched", "task.failed", "task.reported",
    ]  # fmt: skip


async def test_executor_answering_garbage_500_or_bad_status(stack_factory) -> None:
    stack: Stack = await stack_factory(
        executor_options=[
            {"execute": "garbage"},
            {"execute": "error500"},
            {"execute": "bad_status"},
        ],
        executor_capacity=1,
        retry_base_ms=10,
        retry_budget_percent=100,  # every 500 retried: this fleet fails all it runs
    )
    ids = await stack.enqueue_many(9)
    await stack.wait_terminal(9)
    await stack.wait_messages(9)
    entries = await stack.entries()
    # Garbage and unknown statuses fail at once; a 500 is retried on another executor,
    # which here answers garbage or an unknown status in turn.
    assert Counter(failed_reasons(entries).values()) == {"executor_invalid_response": 9}
    retries = [e.event for e in entries if isinstance(e.event, ev.TaskRetryScheduled)]
    assert retries and all(r.reason == "executor_http_error" for r in retries)
    assert {r.executor for r in retries} == {stack.executors[1].url}
    finals = {e.event.eval_id: e.event for e in entries if isinstance(e.event, ev.TaskFailed)}
    for retry in retries:
        final = finals[retry.eval_id]
        assert [a.reason for a in final.attempts] == ["executor_http_error", final.reason]
        assert final.executor != stack.executors[1].url  # the retry went elsewhere
        assert "earlier: attempt 1" in final.error and "HTTP 500" in final.error
    assert all(stack.queue_state.tasks[i].status == "failed" for i in ids)
    errors = {stack.queue_state.tasks[i].error for i in ids}
    assert any("unknown status 'exploded'" in e for e in errors if e)
    assert {c for c, _ in stack.messages} == {"evaluation:failed"}
    # Answers that are wrong do not make an executor unhealthy: it still answers.
    _, health = await stack.get_json("/health")
    assert health["executors_healthy"] == 3


async def test_unreachable_executor_is_marked_unhealthy_at_once(stack_factory) -> None:
    stack: Stack = await stack_factory(executors=2, health_interval_s=60, executor_capacity=1)
    await stack.executors[0].stop()  # dead, but the monitor will not notice for a minute
    ids = await stack.enqueue_many(6)
    await stack.wait_terminal(6)
    entries = await stack.entries()
    flips = [e.event for e in entries if isinstance(e.event, ev.ExecutorHealthChanged)]
    dead = stack.executors[0].url
    assert any(f.executor == dead and not f.healthy for f in flips)
    reasons = failed_reasons(entries)
    assert list(reasons.values()) in ([], ["executor_unreachable"])  # at most the first task
    assert sum(stack.queue_state.tasks[i].status == "completed" for i in ids) >= 5


async def test_all_executors_unhealthy_nothing_is_pulled_until_one_recovers(stack_factory) -> None:
    stack: Stack = await stack_factory(
        executor_options=[{"health": "unhealthy"}, {"health": "hang"}], health_interval_s=0.2
    )
    await stack.enqueue("waiting")
    status, health = await stack.get_json("/health")
    assert status == 503 and health["status"] == "degraded" and health["executors_healthy"] == 0
    await stack.wait_event("executor.health_changed", healthy=False)
    assert stack.queue_state.stats()["queued"] == 1  # nothing pulled, nothing lost
    await stack.control(0, health="healthy")
    await stack.wait_terminal(1)
    assert stack.queue_state.tasks["waiting"].status == "completed"
    flip = await stack.wait_event("executor.health_changed", healthy=True)
    assert flip.event.executor == stack.executors[0].url  # type: ignore[union-attr]


async def test_no_healthy_executor_when_chosen_fails_the_task(stack_factory) -> None:
    # The monitor thinks the executor is fine (it checks rarely), but a check before
    # routing (every check is stale with HEALTH_STALE_S=0) finds it down.
    stack: Stack = await stack_factory(executors=1, health_interval_s=60, health_stale_s=0)
    await stack.wait_event("executor.health_changed", healthy=True)
    await stack.control(0, health="unhealthy")
    await stack.enqueue("orphan")
    await stack.wait_terminal(1)
    task = stack.queue_state.tasks["orphan"]
    assert (task.status, task.error) == ("failed", "no healthy executor available")
    assert failed_reasons(await stack.entries()) == {"orphan": "no_healthy_executor"}
    await stack.wait_messages(1)
    assert stack.messages[0] == (
        "evaluation:failed",
        {"eval_id": "orphan", "error": "no healthy executor available", "result": None},
    )


async def test_queue_down_then_up(stack_factory) -> None:
    stack: Stack = await stack_factory()
    await stack.queue.stop()
    unreachable = await stack.wait_event("queue.unreachable")
    assert unreachable.event.consecutive_errors == 1  # type: ignore[union-attr]
    await stack.wait_event("queue.unreachable", consecutive_errors=3)
    _, status = await stack.get_json("/status")
    assert status["queue"]["reachable"] is False and status["counters"]["queue_errors"] >= 3
    await stack.queue.start()
    await stack.enqueue("after-outage")
    await stack.wait_terminal(1)
    recovered = await stack.wait_event("queue.recovered")
    assert recovered.event.after_errors >= 3  # type: ignore[union-attr]
    backoffs = [
        e.event.backoff_s for e in await stack.entries() if isinstance(e.event, ev.QueueUnreachable)
    ]
    assert backoffs[:4] == [0.05, 0.1, 0.15, 0.2][: len(backoffs[:4])]
    assert max(backoffs) <= 0.2


async def test_malformed_payloads_are_rejected_and_the_loop_goes_on(stack_factory) -> None:
    stack: Stack = await stack_factory(start_worker=False)
    await stack.enqueue("named")  # a real task that a broken payload will name
    await stack.inject(b"<html>oops</html>")
    await stack.inject(b'{"code": "no id"}')
    await stack.inject(b'{"eval_id": "named", "code": 42}')
    await stack.start_worker()
    rejected = await eventually(lambda: _rejected(stack), timeout_s=20)
    assert [(r.reason == "not JSON", r.eval_id) for r in rejected] == [
        (True, None), (False, None), (False, "named"),
    ]  # fmt: skip
    assert "eval_id" in rejected[1].reason and "code" in rejected[2].reason
    assert rejected[0].excerpt == "<html>oops</html>"
    # The task the broken payload named is failed in the queue, and announced.
    await eventually(lambda: stack.queue_state.tasks["named"].status == "failed")
    assert "invalid task payload" in (stack.queue_state.tasks["named"].error or "")
    await stack.wait_messages(1)
    assert (
        stack.messages[0][0] == "evaluation:failed" and stack.messages[0][1]["eval_id"] == "named"
    )
    # The loop lives: a new task flows.
    await stack.enqueue("next")
    await eventually(lambda: stack.queue_state.tasks["next"].status == "completed")
    _, status = await stack.get_json("/status")
    assert status["counters"]["rejected"] == 3


async def _rejected(stack: Stack) -> list[ev.TaskRejected] | None:
    found = [e.event for e in await stack.entries() if isinstance(e.event, ev.TaskRejected)]
    return found if len(found) == 3 else None
