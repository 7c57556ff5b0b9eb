"""Operator actions on one evaluation: cancel it (waiting, or running on an executor that
can abort it or not) and retry a finished one.

Real queue, executors, Redis and two replicas where it matters: the request goes to the
replica that does not hold the task, and the one holding it acts, as it folds the request
from the stream.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from typing import Any

from queue_worker.devstack.serve import Server
from queue_worker.http.app import create_app
from queue_worker.streams import events as ev
from tests.harness import Stack, eventually

ADMIN = "cancel-admin-token-0123456789"
READ = "cancel-read-token-0123456789"
QUEUE_KEY = "cancel-queue-key"


async def _cli(stack: Stack, *args: str) -> tuple[int, str, str]:
    env = {
        **os.environ,
        "REDIS_URL": stack.redis_url,
        "STREAM_PREFIX": stack.prefix,
        "QUEUE_SERVICE_URL": stack.queue.url,
        "QUEUE_API_KEY": stack.settings.queue_api_key or "",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "queue_worker", *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _of(entries: list[ev.Entry], kind: type[ev.Event], eval_id: str) -> list[Any]:
    return [e for e in entries if isinstance(e.event, kind) and e.event.eval_id_or_empty == eval_id]


async def test_a_cancel_sent_to_the_other_replica_stops_a_waiting_and_a_running_task(
    stack_factory,
) -> None:
    # One slot on a slow executor: the first task runs (30 s), the second waits for the slot.
    stack: Stack = await stack_factory(
        api_token=(("viewer", READ),),
        admin_token=(("ops", ADMIN),),
        executors=1,
        executor_capacity=1,
        executor_options=[{"latency_s": 30.0}],
    )
    assert stack.worker is not None
    holder = stack.worker.url
    # The second replica pulls nothing (paused before it starts): the first holds both tasks.
    status, _ = await stack.post_json(
        holder, "/admin/pause", {"reason": "test", "worker": "replica-2"}, ADMIN
    )
    assert status == 202
    second = Server(create_app(stack.settings.with_(hostname="replica-2")))
    await second.start()
    try:
        await stack.enqueue("run-1")
        await stack.wait_event("task.dispatched", eval_id="run-1")
        await stack.enqueue("wait-1")
        await stack.wait_event("task.pulled", eval_id="wait-1")

        status, body = await stack.post_json(
            second.url, "/tasks/wait-1/cancel", {"reason": "x"}, READ
        )
        assert status == 403  # a read token may not act
        status, body = await stack.post_json(
            second.url, "/tasks/wait-1/cancel", {"reason": "wrong code"}, ADMIN
        )
        assert status == 202 and body["by"] == "ops" and body["scope"] == "wait-1"
        failed = await stack.wait_event("task.failed", eval_id="wait-1")
        assert isinstance(failed.event, ev.TaskFailed)
        assert (failed.event.reason, failed.event.error) == ("cancelled", "cancelled")
        entries = await stack.entries()
        [cancelled] = _of(entries, ev.TaskCancelled, "wait-1")
        assert cancelled.worker_id == stack.settings.worker_id  # the holder acted
        assert (cancelled.event.by, cancelled.event.reason) == ("ops", "wrong code")
        assert cancelled.event.stage == "waiting" and cancelled.event.executor_cancel is None
        assert not _of(entries, ev.TaskDispatched, "wait-1")  # never dispatched
        assert stack.executor_state(0).eval_ids.get("wait-1") is None

        # Running: the devstack executor aborts it; nobody waits the 30 s of its run.
        status, _ = await stack.post_json(
            second.url, "/tasks/run-1/cancel", {"reason": "hung"}, ADMIN
        )
        assert status == 202
        failed = await stack.wait_event("task.failed", eval_id="run-1")
        assert isinstance(failed.event, ev.TaskFailed) and failed.event.error == "cancelled"
        discarded = await stack.wait_event("task.answer_discarded", eval_id="run-1")
        assert isinstance(discarded.event, ev.TaskAnswerDiscarded)
        assert discarded.event.outcome == "execution_failed"  # the aborted run's answer
        [cancelled] = _of(await stack.entries(), ev.TaskCancelled, "run-1")
        assert cancelled.event.stage == "dispatched"
        assert cancelled.event.executor_cancel == "accepted"
        assert stack.executor_state(0).cancelled == 1
        # Every event of each task names its trace, the cancel recorded by the other
        # replica and the late answer recorded after the task was let go included.
        for eval_id in ("wait-1", "run-1"):
            mine = [e.event for e in await stack.entries() if e.event.eval_id_or_empty == eval_id]
            traces = {getattr(e, "trace_id", None) for e in mine}
            assert len(traces) == 1 and None not in traces, (eval_id, traces)
            assert {"task.cancel_requested", "task.cancelled"} <= {e.type for e in mine}

        # The queue and the pub/sub consumers see two failures, error "cancelled".
        await stack.wait_terminal(2)
        for eval_id in ("wait-1", "run-1"):
            task = stack.queue_state.tasks[eval_id]
            assert (task.status, task.error, task.complete_calls) == ("failed", "cancelled", 0)
        await stack.wait_messages(2)
        assert sorted(m["eval_id"] for c, m in stack.messages if m.get("error") == "cancelled") == [
            "run-1",
            "wait-1",
        ]

        # A finished task: 409; one no worker pulled (still in the queue): 404.
        status, body = await stack.post_json(holder, "/tasks/run-1/cancel", {"reason": "x"}, ADMIN)
        assert status == 409 and re.search("already (failed|finished)", body["detail"])
        status, body = await stack.post_json(holder, "/tasks/nobody/cancel", {"reason": "x"}, ADMIN)
        assert status == 404 and "only tasks a worker has pulled" in body["detail"]
        status, body = await stack.post_json(holder, "/tasks/run-1/cancel", {"why": "x"}, ADMIN)
        assert status == 400
    finally:
        await second.stop()


async def test_an_executor_without_cancel_runs_on_and_its_late_answer_is_discarded(
    stack_factory,
) -> None:
    # The run must outlast the CLI's start-up (a new Python process; seconds on a busy machine).
    stack: Stack = await stack_factory(
        executors=1, executor_capacity=1, executor_options=[{"latency_s": 8.0}]
    )
    await stack.control(0, cancel=False)  # POST /execute/{eval_id}/cancel answers 404
    await stack.enqueue("run-2")
    await stack.wait_event("task.dispatched", eval_id="run-2")
    code, out, err = await _cli(stack, "cancel", "run-2", "--reason", "stuck", "--by", "alice")
    assert code == 0, err
    assert "task.cancel_requested" in out
    failed = await stack.wait_event("task.failed", eval_id="run-2")
    assert isinstance(failed.event, ev.TaskFailed) and failed.event.reason == "cancelled"
    [cancelled] = _of(await stack.entries(), ev.TaskCancelled, "run-2")
    assert cancelled.event.by == "alice" and cancelled.event.executor_cancel == "unsupported"
    # It ran to its end: that answer (completed) is recorded, not reported.
    discarded = await stack.wait_event("task.answer_discarded", eval_id="run-2")
    assert isinstance(discarded.event, ev.TaskAnswerDiscarded)
    assert discarded.event.outcome == "completed"
    await stack.wait_terminal(1)
    task = stack.queue_state.tasks["run-2"]
    assert (task.status, task.error, task.complete_calls) == ("failed", "cancelled", 0)
    assert not _of(await stack.entries(), ev.TaskCompleted, "run-2")
    # The CLI says why it cannot cancel a finished task.
    code, _, err = await _cli(stack, "cancel", "run-2", "--reason", "again")
    assert code == 1 and re.search("already (failed|finished)", err)


async def test_a_failed_task_retried_runs_again_and_completes(stack_factory) -> None:
    stack: Stack = await stack_factory(
        admin_token=(("ops", ADMIN),),
        api_key=QUEUE_KEY,  # the queue wants X-API-Key on POST /tasks too
        executors=1,
        executor_options=[{"failure_rate": 1.0}],
    )
    assert stack.worker is not None
    url = stack.worker.url
    await stack.enqueue("flaky", priority=3)
    await stack.wait_terminal(1)
    assert stack.queue_state.tasks["flaky"].status == "failed"
    await stack.control(0, failure_rate=0.0)

    status, body = await stack.post_json(url, "/tasks/flaky/retry", {"reason": "fixed"}, ADMIN)
    assert status == 202, body
    assert body["new_eval_id"] == "flaky-retry-1" and body["by"] == "ops"
    await stack.wait_terminal(2)
    again = stack.queue_state.tasks["flaky-retry-1"]
    assert again.status == "completed" and again.priority == 3
    # The earlier evaluation's history says who retried it, why, and as what.
    async with stack.http.get(
        f"{url}/tasks/flaky", headers={"Authorization": f"Bearer {ADMIN}"}
    ) as resp:
        history = await resp.json()
    [asked] = [
        e["event"] for e in history["entries"] if e["event"]["type"] == "task.retry_requested"
    ]
    assert (asked["by"], asked["reason"], asked["new_eval_id"]) == ("ops", "fixed", "flaky-retry-1")

    # From a shell: the next retry is a new evaluation again.
    code, out, err = await _cli(stack, "retry", "flaky", "--reason", "once more")
    assert code == 0, err
    assert "flaky-retry-2" in out
    await stack.wait_terminal(3)
    assert stack.queue_state.tasks["flaky-retry-2"].status == "completed"

    # Only finished tasks: unknown 404, running 409.
    status, body = await stack.post_json(url, "/tasks/nobody/retry", {"reason": "x"}, ADMIN)
    assert status == 404
    await stack.control(0, latency_s=30.0)
    await stack.enqueue("slow")
    await stack.wait_event("task.dispatched", eval_id="slow")

    async def indexed_in_flight() -> bool:
        async with stack.http.get(
            f"{url}/tasks/slow", headers={"Authorization": f"Bearer {ADMIN}"}
        ) as resp:
            return resp.status == 200 and (await resp.json())["state"] == "in_flight"

    await eventually(indexed_in_flight)
    status, body = await stack.post_json(url, "/tasks/slow/retry", {"reason": "x"}, ADMIN)
    assert status == 409 and "only a completed or failed task" in body["detail"]
    status, _ = await stack.post_json(url, "/tasks/slow/cancel", {"reason": "cleanup"}, ADMIN)
    assert status == 202
    await stack.wait_event("task.failed", eval_id="slow")
