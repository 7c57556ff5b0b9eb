"""Operator actions: pause and resume pulling, drain and undrain an executor.

Two replicas on one stream, real queue and executors: the action goes to one replica over
HTTP (an admin token), or to Redis from the CLI, and both obey it, as they fold it from the
stream; a restarted worker obeys it again.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from queue_worker.devstack.serve import Server
from queue_worker.http.app import create_app
from queue_worker.streams import events as ev
from tests.harness import Stack, eventually

ADMIN = "control-admin-token-0123456789"
READ = "control-read-token-0123456789"


async def _two_replicas(stack_factory: Any, **options: Any) -> tuple[Stack, Server]:
    stack: Stack = await stack_factory(
        api_token=(("viewer", READ),), admin_token=(("ops", ADMIN),), **options
    )
    second = Server(create_app(stack.settings.with_(hostname="replica-2")))
    await second.start()
    return stack, second


def _pulled(entries: list[ev.Entry], after: str) -> list[ev.Entry]:
    return [e for e in entries if e.id > after and isinstance(e.event, ev.TaskPulled)]


async def test_a_pause_sent_to_one_replica_stops_both_until_resumed(stack_factory) -> None:
    stack, second = await _two_replicas(stack_factory, executors=2, executor_capacity=2)
    try:
        assert stack.worker is not None
        status, body = await stack.post_json(
            second.url, "/admin/pause", {"reason": "queue migration"}, READ
        )
        assert status == 403  # a read token may not act
        status, body = await stack.post_json(
            second.url, "/admin/pause", {"reason": "queue migration"}, ADMIN
        )
        assert status == 202 and body["by"] == "ops" and body["scope"] == "fleet"
        paused_at = body["entry_id"]
        # Both replicas folded it within a second; a long poll already open at the queue
        # (QUEUE_WAIT_S, 1 s) when it came may still bring a task: wait for those to end.
        await asyncio.sleep(2.5)
        ids = await stack.enqueue_many(6)
        await asyncio.sleep(1.5)
        entries = await stack.entries()
        assert not _pulled(entries, paused_at)  # nothing pulled by either replica
        assert stack.queue_state.stats()["queued"] == 6
        async with stack.http.get(
            f"{stack.worker.url}/status", headers={"Authorization": f"Bearer {READ}"}
        ) as resp:
            status_body = await resp.json()
        assert status_body["paused"]["by"] == "ops"
        assert status_body["paused"]["reason"] == "queue migration"
        status, body = await stack.post_json(
            stack.worker.url, "/admin/resume", {"reason": "done"}, ADMIN
        )
        assert status == 202
        await stack.wait_terminal(6)
        pulled = _pulled(await stack.entries(), body["entry_id"])
        assert sorted(p.event.eval_id_or_empty for p in pulled) == ids
    finally:
        await second.stop()


async def test_a_pause_of_one_worker_survives_its_restart(stack_factory) -> None:
    stack: Stack = await stack_factory(admin_token=(("ops", ADMIN),))
    assert stack.worker is not None
    worker_id = stack.settings.worker_id
    status, body = await stack.post_json(
        stack.worker.url,
        "/admin/pause",
        {"reason": "maintenance", "worker": worker_id},
        ADMIN,
    )
    assert status == 202 and body["scope"] == worker_id
    paused_at = body["entry_id"]
    await stack.stop_worker()
    await stack.start_worker()  # folds the stream again: paused from its first pull on
    await stack.enqueue_many(3)
    await asyncio.sleep(1.5)
    assert not _pulled(await stack.entries(), paused_at)
    # The CLI lifts it (straight into the stream, as an operator with Redis access).
    env = {
        **os.environ,
        "REDIS_URL": stack.redis_url,
        "STREAM_PREFIX": stack.prefix,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "queue_worker", "resume", "--worker", worker_id,
        "--reason", "maintenance over", "--by", "alice",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert b"control.resumed" in out
    await stack.wait_terminal(3)
    resumed = await stack.wait_event("control.resumed", scope=worker_id)
    assert isinstance(resumed.event, ev.ControlResumed) and resumed.event.by == "alice"


async def test_a_drained_executor_finishes_its_tasks_and_gets_no_new_one(stack_factory) -> None:
    stack, second = await _two_replicas(
        stack_factory,
        executors=2,
        executor_capacity=2,
        routing_strategy="round_robin",
        executor_options=[{"latency_s": 1.0}, {"latency_s": 0.05}],
    )
    try:
        slow = stack.executors[0].url
        await stack.enqueue_many(4, prefix="before")
        await eventually(lambda: stack.executor_state(0).in_flight >= 1)
        status, body = await stack.post_json(
            second.url, "/admin/drain", {"executor": slow, "reason": "kernel upgrade"}, ADMIN
        )
        assert status == 202 and body["scope"] == slow
        drained_at = body["entry_id"]
        await asyncio.sleep(1.0)
        await stack.enqueue_many(10, prefix="after")
        await stack.wait_terminal(14)
        entries = await stack.entries()
        # Tasks enqueued once every replica had folded the drain (a task of before that
        # waited for a slot may have been chosen in the instant before it did).
        later = [
            e.event
            for e in entries
            if isinstance(e.event, ev.TaskDispatched) and e.event.eval_id.startswith("after")
        ]
        assert len(later) >= 10 and all(d.executor != slow for d in later)
        done_on_slow = [
            e.event
            for e in entries
            if isinstance(e.event, ev.TaskCompleted) and e.event.executor == slow
        ]
        assert done_on_slow  # what ran there when it was drained finished there
        chosen = [
            e.event
            for e in entries
            if isinstance(e.event, ev.ExecutorSelected) and e.event.eval_id.startswith("after")
        ]
        assert chosen and drained_at < min(e.id for e in entries if e.event in chosen)
        assert all(c.drained for s in chosen for c in s.candidates if c.executor == slow)
        assert stack.worker is not None
        status, _ = await stack.post_json(
            stack.worker.url, "/admin/undrain", {"executor": slow, "reason": "back"}, ADMIN
        )
        assert status == 202
    finally:
        await second.stop()


async def test_bad_action_requests_are_refused_clearly(stack_factory) -> None:
    stack: Stack = await stack_factory(admin_token=(("ops", ADMIN),))
    assert stack.worker is not None
    for body in ({}, {"reason": ""}, {"reason": 5}, {"reason": "x", "extra": 1}, [1]):
        status, answer = await stack.post_json(stack.worker.url, "/admin/pause", body, ADMIN)
        assert status == 400 and answer["error"] == "Bad Request", body
    async with stack.http.post(
        f"{stack.worker.url}/admin/pause",
        data=b"[" * 20_000,  # over the route's 16 KiB, under HTTP_MAX_BODY_BYTES (413 above)
        headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 400
    async with stack.http.post(f"{stack.worker.url}/admin/pause", json={"reason": "x"}) as resp:
        assert resp.status == 401
    assert not [e for e in await stack.entries() if isinstance(e.event, ev.ControlPaused)]
