"""Nothing lost: retries, recovery, leases, Redis outages, dead letters, retention, bad input."""

from __future__ import annotations

import asyncio
import random

import msgspec
import pytest
import redis.asyncio as aioredis

from queue_worker.devstack.redis import RedisServer
from queue_worker.router.attempts import retry_delay_ms
from queue_worker.router.terminals import cap_text
from queue_worker.streams import events as ev
from queue_worker.streams import retention
from queue_worker.streams.keys import Keys
from queue_worker.streams.projector import Batch, GroupProjector
from queue_worker.streams.store import EventStore
from tests.harness import Stack, eventually


def test_retry_delay_is_full_jitter_under_an_exponential_cap() -> None:
    rng = random.Random(3)
    for attempt, cap in [(1, 100), (2, 200), (3, 400), (8, 1000)]:
        delays = [retry_delay_ms(attempt, 100, 1000, rng) for _ in range(500)]
        assert min(delays) >= 0 and max(delays) <= cap
        assert max(delays) > cap * 0.9  # it spreads over the whole range


def test_cap_text_cuts_on_a_character_boundary() -> None:
    assert cap_text("short", 100) == ("short", False)
    cut, was_cut = cap_text("é" * 100, 51)  # 2 bytes each
    assert was_cut and cut == "é" * 25


async def test_unreachable_executor_is_retried_on_another(stack_factory) -> None:
    stack: Stack = await stack_factory(executors=2, health_interval_s=60, retry_base_ms=1)
    await stack.wait_event("executor.health_changed", healthy=True)
    dead = stack.executors[0].url
    await stack.executors[0].stop()
    ids = await stack.enqueue_many(6)
    await stack.wait_terminal(6)
    assert all(stack.queue_state.tasks[i].status == "completed" for i in ids)
    entries = await stack.entries()
    retries = [e.event for e in entries if isinstance(e.event, ev.TaskRetryScheduled)]
    assert retries and {r.executor for r in retries} == {dead}
    assert {r.reason for r in retries} == {"executor_unreachable"}
    for r in retries:
        assert r.attempt == 2
        completed = next(
            e.event for e in entries
            if isinstance(e.event, ev.TaskCompleted) and e.event.eval_id == r.eval_id
        )  # fmt: skip
        assert completed.attempt == 2 and completed.executor == stack.executors[1].url


async def test_retries_stop_after_max_attempts(stack_factory) -> None:
    stack: Stack = await stack_factory(
        executor_options=[{"execute": "error500"}] * 3, max_attempts=3, retry_base_ms=1
    )
    await stack.enqueue("doomed")
    await stack.wait_terminal(1)
    failed = await stack.wait_event("task.failed", eval_id="doomed")
    assert isinstance(failed.event, ev.TaskFailed)
    assert [a.attempt for a in failed.event.attempts] == [1, 2, 3]
    assert len({a.executor for a in failed.event.attempts}) == 3  # a different one each time
    assert stack.queue_state.tasks["doomed"].error == failed.event.error
    assert failed.event.error.count("attempt ") == 2


async def test_code_failures_are_not_retried(stack_factory) -> None:
    stack: Stack = await stack_factory()
    await stack.enqueue("bad", code="SIMULATE_FAIL")
    await stack.wait_terminal(1)
    assert "task.retry_scheduled" not in await stack.types_for("bad")


async def _seed_previous_run(stack: Stack, eval_id: str, stage: str) -> None:
    """What a worker killed mid-task leaves in the stream."""
    previous = EventStore(stack.redis, Keys(stack.prefix), "test-worker")
    task = ev.Task(eval_id=eval_id, code="print(1)", timeout=5)
    events: list[ev.Event] = [
        ev.PullStarted(pull_id="p1"),
        ev.TaskPulled(eval_id=eval_id, pull_id="p1", task=task, code_bytes=8),
    ]
    if stage == "dispatched":
        events += [
            ev.ExecutorSelected(eval_id=eval_id, executor=stack.executors[0].url,
                                strategy="round_robin", attempt=1, candidates=[]),
            ev.TaskDispatched(eval_id=eval_id, executor=stack.executors[0].url, attempt=1,
                              timeout_s=5),
        ]  # fmt: skip
    events.append(ev.PullStarted(pull_id="p2"))  # a pull that never got an answer
    await previous.append(*events)


@pytest.mark.parametrize("stage", ["pulled", "dispatched"])
async def test_recovery_redispatches_unfinished_tasks(stack_factory, stage: str) -> None:
    stack: Stack = await stack_factory(start_worker=False, queue_lease_s=0)
    await stack.enqueue("left")
    assert stack.queue_state.pull() is not None  # the dead worker had pulled it
    await _seed_previous_run(stack, "left", stage)
    await stack.start_worker()
    await stack.wait_terminal(1)
    assert stack.queue_state.tasks["left"].status == "completed"
    recovered = await stack.wait_event("task.recovered", eval_id="left")
    assert isinstance(recovered.event, ev.TaskRecovered)
    assert (recovered.event.action, recovered.event.stage) == ("redispatch", stage)
    completed = await stack.wait_event("task.completed", eval_id="left")
    assert completed.event.attempt == (2 if stage == "dispatched" else 1)  # type: ignore[union-attr]
    interrupted = await stack.wait_event("pull.interrupted")
    assert interrupted.event.pull_id == "p2"  # type: ignore[union-attr]
    assert interrupted.event.queue_running == 1  # type: ignore[union-attr]
    await stack.wait_messages(1)
    assert [c for c, _ in stack.messages] == ["evaluation:completed"]
    _, status = await stack.get_json("/status")
    assert status["counters"]["recovered"] == 1 and status["counters"]["pulls_interrupted"] == 1


async def test_recovery_policy_fail(stack_factory) -> None:
    stack: Stack = await stack_factory(start_worker=False, recovery_policy="fail")
    await stack.enqueue("left")
    stack.queue_state.pull()
    await _seed_previous_run(stack, "left", "dispatched")
    await stack.start_worker()
    await stack.wait_terminal(1)
    task = stack.queue_state.tasks["left"]
    assert task.status == "failed" and "RECOVERY_POLICY=fail" in (task.error or "")
    assert sum(stack.executor_state(i).executed for i in range(3)) == 0


async def test_leased_task_taken_back_by_the_queue_is_not_redispatched(stack_factory) -> None:
    stack: Stack = await stack_factory(start_worker=False, queue_lease_s=0.2)
    await stack.enqueue("leased")
    pulled = stack.queue_state.pull(lease_s=0.2)
    assert pulled is not None
    previous = EventStore(stack.redis, Keys(stack.prefix), "test-worker")
    task = ev.Task(eval_id="leased", code="x", lease_s=0.2)
    await previous.append(
        ev.TaskPulled(eval_id="leased", pull_id="p", task=task, code_bytes=1, lease_s=0.2)
    )
    await asyncio.sleep(0.3)  # the lease runs out while the worker is down
    await stack.start_worker()
    await stack.wait_terminal(1)
    lost = await stack.wait_event("task.recovered", eval_id="leased")
    assert lost.event.action == "lease_lost"  # type: ignore[union-attr]
    # The queue handed it out again, and it ran exactly once more, under the new pull.
    assert stack.queue_state.tasks["leased"].pulls == 2
    assert stack.executor_state(0).executed + stack.executor_state(1).executed + \
        stack.executor_state(2).executed == 1  # fmt: skip
    await stack.wait_messages(1)
    assert len(stack.messages) == 1


async def test_leases_are_renewed_while_a_task_runs(stack_factory) -> None:
    stack: Stack = await stack_factory(latency_s=1.0, queue_lease_s=0.3, executors=1)
    await stack.enqueue("slow")
    await stack.wait_terminal(1)
    task = stack.queue_state.tasks["slow"]
    assert task.status == "completed" and task.pulls == 1
    assert stack.queue_state.lease_expiries == 0


async def test_graceful_stop_lets_in_flight_tasks_finish(stack_factory) -> None:
    stack: Stack = await stack_factory(latency_s=0.5, shutdown_grace_s=5)
    await stack.enqueue_many(3)
    await eventually(lambda: sum(stack.executor_state(i).in_flight for i in range(3)) == 3)
    await stack.stop_worker()
    stopped = await stack.wait_event("worker.stopped")
    assert stopped.event.in_flight == 0  # type: ignore[union-attr]
    assert [e.event.type for e in await stack.entries()].count("task.completed") == 3


async def test_stop_after_grace_leaves_tasks_for_recovery(stack_factory) -> None:
    stack: Stack = await stack_factory(latency_s=1.0, shutdown_grace_s=0.05, queue_lease_s=0)
    ids = await stack.enqueue_many(2)
    await eventually(lambda: sum(stack.executor_state(i).in_flight for i in range(3)) == 2)
    await stack.stop_worker()
    stopped = await stack.wait_event("worker.stopped")
    assert stopped.event.in_flight == 2  # type: ignore[union-attr]
    await stack.start_worker()
    await stack.wait_terminal(2)
    assert all(stack.queue_state.tasks[i].status == "completed" for i in ids)
    actions = [
        e.event.action for e in await stack.entries() if isinstance(e.event, ev.TaskRecovered)
    ]
    assert actions == ["redispatch", "redispatch"]


async def test_big_output_is_cut_in_the_stream_but_reported_in_full(stack_factory) -> None:
    stack: Stack = await stack_factory(max_output_bytes=1024)
    await stack.enqueue("big", code="SIMULATE_OUTPUT_BYTES=200000")
    await stack.wait_terminal(1)
    completed = await stack.wait_event("task.completed", eval_id="big")
    assert isinstance(completed.event, ev.TaskCompleted)
    assert completed.event.truncated and len(completed.event.result["output"]) == 1024
    assert len(stack.queue_state.tasks["big"].output["output"]) == 200_000
    await stack.wait_messages(1)
    assert len(stack.messages[0][1]["result"]["output"]) == 200_000


async def test_code_above_the_limit_is_rejected(stack_factory) -> None:
    stack: Stack = await stack_factory(max_code_bytes=100)
    await stack.enqueue("huge", code="x" * 101)
    await eventually(lambda: stack.queue_state.tasks["huge"].status == "failed")
    rejected = await stack.wait_event("task.rejected", eval_id="huge")
    assert "MAX_CODE_BYTES" in rejected.event.reason  # type: ignore[union-attr]


async def test_redis_outage_holds_events_and_resumes(stack_factory, tmp_path) -> None:
    server = RedisServer(directory=str(tmp_path), appendonly=True, appendfsync="always").start()
    try:
        # No long poll: the point is that no poll starts while Redis is down (a long poll
        # under way at the outage is the next test's).
        stack: Stack = await stack_factory(redis=server.url, latency_s=0.3, queue_wait_s=0)
        await stack.enqueue_many(3)
        await eventually(lambda: sum(stack.executor_state(i).in_flight for i in range(3)) == 3)
        server.kill()  # results come back while Redis is down
        await eventually(lambda: sum(stack.executor_state(i).executed for i in range(3)) == 3)
        await asyncio.sleep(0.4)
        status, health = await stack.get_json("/health")
        assert status == 503 and health["redis"] is False
        await stack.enqueue("during-outage")
        await asyncio.sleep(0.5)
        assert stack.queue_state.stats()["queued"] == 1  # nothing is pulled meanwhile
        server.start()
        await stack.wait_terminal(4, timeout_s=30)
        await stack.wait_event("task.reported", eval_id="during-outage", timeout_s=30)
        types = [e.event.type for e in await stack.entries()]
        assert types.count("task.completed") == 4
        assert types.count("task.pulled") == 4 and types.count("task.dispatched") == 4
        status, health = await stack.get_json("/health")
        assert status == 200 and health["redis"] is True
    finally:
        server.close()


async def test_a_task_a_long_poll_brings_during_an_outage_waits_for_its_record(
    stack_factory, tmp_path
) -> None:
    """A poll the queue holds open when Redis fails may still bring a task: nothing is done
    with it (no dispatch) until its task.pulled is recorded, once Redis is back."""
    server = RedisServer(directory=str(tmp_path), appendonly=True, appendfsync="always").start()
    try:
        stack: Stack = await stack_factory(
            redis=server.url, queue_wait_s=8.0, poll_interval_s=30.0, wake_channel=None
        )
        await asyncio.sleep(1.0)  # idle: the queue holds the worker's poll open
        server.kill()
        await stack.enqueue("held")
        await eventually(lambda: stack.queue_state.tasks["held"].status == "running", 10)
        await asyncio.sleep(0.5)
        assert sum(stack.executor_state(i).executed for i in range(3)) == 0  # not dispatched
        server.start()
        await stack.wait_terminal(1, timeout_s=30)
        await stack.wait_event("task.reported", eval_id="held", timeout_s=30)
        types = [e.event.type for e in await stack.entries() if e.event.eval_id_or_empty == "held"]
        assert types[:3] == ["task.pulled", "executor.selected", "task.dispatched"]
        assert sum(stack.executor_state(i).executed for i in range(3)) == 1
    finally:
        server.close()


class Flaky(GroupProjector):
    """Fails on the task.failed entry whose eval_id is "poison", every time."""

    name = "flaky"
    seen: list[str]

    async def handle(self, batch: Batch) -> None:
        for _, entry in batch:
            if entry and isinstance(entry.event, ev.TaskFailed) and entry.event.eval_id == "poison":
                raise ValueError("cannot handle this one")
        self.seen += [entry_id for entry_id, _ in batch]
        await self.ack([entry_id for entry_id, _ in batch])


async def test_poison_entry_is_dead_lettered_and_the_rest_flows(
    redis_url: str, prefix: str
) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    store = EventStore(redis, Keys(prefix), "w")
    fail = ev.TaskFailed(eval_id="poison", attempt=1, reason="r", error="e")
    ok = ev.TaskFailed(eval_id="fine", attempt=1, reason="r", error="e")
    await store.append(ok, fail, ok)
    flaky = Flaky(store, "flaky", "c1", block_ms=50, claim_idle_ms=10, max_deliveries=3)
    flaky.seen = []
    runner = asyncio.create_task(flaky.run())
    try:
        dead = await eventually(
            lambda: redis.xrange(Keys(prefix).dead_letters), timeout_s=20, interval_s=0.05
        )
        assert len(dead) == 1 and dead[0][1][b"deliveries"] == b"4"
        assert dead[0][1][b"stream"] == Keys(prefix).events.encode()  # where it came from
        assert msgspec.json.decode(dead[0][1][b"data"])["eval_id"] == "poison"
        [last] = await store.append(ok)
        await eventually(lambda: last in flaky.seen)
        pending = await redis.xpending(Keys(prefix).events, "flaky")
        assert pending["pending"] == 0
        # Both good entries of the failed batch were handled when redelivered one by one.
        entries = await store.read_all()
        assert set(flaky.seen) == {e.id for e in entries} - {dead[0][1][b"entry_id"].decode()}
        events = [e.event for e in await store.read_all()]
        lettered = [e for e in events if isinstance(e, ev.EntryDeadLettered)]
        assert len(lettered) == 1 and lettered[0].eval_id == "poison"
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await redis.aclose()


async def test_retention_never_trims_what_a_group_still_needs(redis_url: str, prefix: str) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    store = EventStore(redis, Keys(prefix), "w")
    try:
        ids = await store.append(*[ev.PullStarted(pull_id=str(i)) for i in range(100)])
        await redis.xgroup_create(store.keys.events, "slow", id="0")
        await redis.xreadgroup("slow", "c", {store.keys.events: ">"}, count=40)
        await redis.xack(store.keys.events, "slow", *ids[:30])  # 30..39 still pending
        assert await retention.trim_point(store, 10) == ids[30]
        assert await retention.trim_point(store, 10, protect=[ids[5]]) == ids[5]
        assert await retention.trim_point(store, 200) is None
        removed = await retention.trim(store, 10, approximate=False)
        assert removed == 30 and await store.length() == 70
        await redis.xack(store.keys.events, "slow", *ids[30:40])
        await redis.xreadgroup("slow", "c", {store.keys.events: ">"})
        await redis.xack(store.keys.events, "slow", *ids[40:])
        assert await retention.trim(store, 10, approximate=False) == 60
        assert await store.length() == 10
    finally:
        await redis.aclose()
