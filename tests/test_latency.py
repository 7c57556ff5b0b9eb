"""Finding a task soon after it is submitted, without polling an idle queue hard: polls that
back off after empty answers, long polling, and the wake-up channel.

No assertion here is a speed target (those are measured in bench/): each checks a behaviour
with a margin of many seconds, e.g. that a task is found while the poll interval would still
have had the worker wait a minute.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import msgspec
import redis.asyncio as aioredis

from queue_worker.devstack.queue import NewTask, QueueState
from queue_worker.router.pulling import idle_s
from tests.harness import Stack

PATIENT_S = 60.0  # a poll interval the tests must never wait out


def test_empty_polls_back_off_from_5_ms_to_the_poll_interval() -> None:
    waits = [idle_s(n, 1.0) for n in range(1, 12)]
    assert waits[:4] == [0.005, 0.01, 0.02, 0.04]
    assert waits[-1] == 1.0 and all(a <= b for a, b in itertools.pairwise(waits))
    assert idle_s(1000, 1.0) == 1.0


async def test_an_idle_worker_polls_at_most_once_per_poll_interval(stack_factory) -> None:
    stack: Stack = await stack_factory(poll_interval_s=0.5, queue_wait_s=0, wake_channel=None)
    await asyncio.sleep(1.0)  # the backoff reaches the poll interval within ~0.6 s
    assert stack.worker is not None
    _, before = await stack.get_json("/status")
    await asyncio.sleep(3.0)
    _, after = await stack.get_json("/status")
    polls = after["live"]["polls"] - before["live"]["polls"]
    assert 1 <= polls <= 3 / 0.5 + 1, polls


async def test_a_long_poll_is_answered_when_a_task_arrives() -> None:
    state = QueueState()
    waiting = asyncio.create_task(state.pull_waiting(None, wait_s=5.0))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    state.enqueue(NewTask(eval_id="late", code="x"))
    task = await asyncio.wait_for(waiting, 2.0)
    assert task is not None and task.eval_id == "late" and state.long_polls == 1
    started = time.monotonic()
    assert await state.pull_waiting(None, wait_s=0.3) is None  # empty: null after wait_s
    assert time.monotonic() - started >= 0.3


async def test_an_idle_worker_finds_a_task_through_its_long_poll(stack_factory) -> None:
    stack: Stack = await stack_factory(
        poll_interval_s=PATIENT_S, queue_wait_s=8.0, wake_channel=None
    )
    assert stack.worker is not None
    await asyncio.sleep(1.0)  # idle: one empty answer, then a poll the queue holds open
    await stack.enqueue("found")
    await stack.wait_terminal(1, timeout_s=15)  # not after the 60 s poll interval
    _, status = await stack.get_json("/status")
    assert status["live"]["long_polls"] >= 1 and stack.queue_state.long_polls >= 1
    assert stack.queue_state.tasks["found"].status == "completed"


async def test_an_announced_submission_wakes_an_idle_worker(stack_factory) -> None:
    """Idle for 12 s with a 60 s poll interval, the worker's next poll is ~8.5 s away (the
    waits after empty polls double from 5 ms: the 12th, 10.24 s, began at ~10.2 s). An
    announced task is found well before that."""
    stack: Stack = await stack_factory(
        poll_interval_s=PATIENT_S, queue_wait_s=0, wake_channel="evaluation:queued"
    )
    assert stack.worker is not None
    await asyncio.sleep(12.0)
    announcer = aioredis.Redis.from_url(stack.redis_url)
    try:
        body = {"eval_id": "announced", "code": "print(1)", "language": "python",
                "engine": "docker", "metadata": {"submitted_at": time.time()}}  # fmt: skip
        await announcer.publish("evaluation:queued", msgspec.json.encode(body))
        await stack.enqueue("announced")  # the gateway enqueues just after it announces
        await stack.wait_terminal(1, timeout_s=5)  # the next poll was 8.5 s away
    finally:
        await announcer.aclose()
    _, status = await stack.get_json("/status")
    assert status["live"]["wakeups"] == 1
    async with stack.http.get(f"{stack.worker.url}/metrics") as resp:
        assert "queue_worker_wakeups_total 1.0" in await resp.text()


async def test_without_the_wake_up_channel_the_worker_ignores_announcements(
    stack_factory,
) -> None:
    stack: Stack = await stack_factory(poll_interval_s=2.0, queue_wait_s=0, wake_channel=None)
    announcer = aioredis.Redis.from_url(stack.redis_url)
    try:
        await announcer.publish("evaluation:queued", b"{}")
    finally:
        await announcer.aclose()
    await asyncio.sleep(0.3)
    _, status = await stack.get_json("/status")
    assert status["live"]["wakeups"] == 0
