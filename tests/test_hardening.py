"""Faults outside the happy path, against a real Redis, real HTTP servers and real
processes: a loop that keeps failing, a lease lost mid-task, a task handed out twice,
bad queue answers, a worker stalled and taken over, a clean stop.

Redis faults (killed, restarted empty or with AOF, paused, out of memory, read-only)
are in test_faults.py, with Redis in a container.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import signal
import sys
from collections import Counter
from typing import Any

import msgspec

from queue_worker.devstack.redis import RedisServer
from queue_worker.devstack.serve import Server, free_port
from queue_worker.http.app import create_app
from queue_worker.streams import events as ev
from queue_worker.streams.connection import open_redis
from queue_worker.streams.entries import id_key
from queue_worker.streams.keys import Keys
from tests.harness import Stack, eventually, spawn_worker

CLI = [sys.executable, "-m", "queue_worker", "run"]


async def get_json(stack: Stack, url: str) -> tuple[int, Any]:
    async with stack.http.get(url) as resp:
        return resp.status, msgspec.json.decode(await resp.read())


async def break_stream(stack: Stack) -> None:
    """Make the stream's key a string: every read and append of it fails (WRONGTYPE)."""
    key = Keys(stack.prefix).events
    await stack.redis.delete(key)
    await stack.redis.set(key, "not a stream")


# --- a loop that keeps failing --------------------------------------------------------------


async def test_a_loop_that_keeps_failing_turns_liveness_red_and_halts_pulling(
    stack_factory,
) -> None:
    stack: Stack = await stack_factory()
    await stack.enqueue("before")
    await stack.wait_terminal(1)
    assert stack.worker is not None
    base = stack.worker.url
    assert (await get_json(stack, f"{base}/health/live"))[0] == 200
    await break_stream(stack)

    async def failing() -> Any:
        status, body = await get_json(stack, f"{base}/health/live")
        return body if status == 503 else None

    body = await eventually(failing, timeout_s=30)
    assert body["status"] == "failing"
    assert "keeps failing" in body["reason"] and "WRONGTYPE" in body["reason"]
    status, health = await get_json(stack, f"{base}/health")
    assert status == 503 and health["loops_dead"]
    assert any("gave up" in r for r in health["reasons"])
    assert any("refuses writes" in r or "WRONGTYPE" in r for r in health["reasons"])
    assert max(health["loop_restarts"].values()) >= 5
    async with stack.http.get(f"{base}/metrics") as resp:
        metrics = await resp.text()
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("queue_worker_") and " " in line
    }
    assert values["queue_worker_loops_given_up"] >= 1  # the status, publisher or reporter loop
    assert values["queue_worker_redis_writable"] == 0
    crashes = [n for name, n in values.items() if name.startswith("queue_worker_loop_crashes")]
    assert max(crashes) >= 5, crashes
    # Pulling stopped for good: a task enqueued now is not pulled.
    await stack.redis.delete(Keys(stack.prefix).events)
    await stack.enqueue("after")
    await asyncio.sleep(0.5)
    assert stack.queue_state.tasks["after"].status == "queued"
    # The crashes held while the stream was broken land once it is a stream again.
    crashed = await stack.wait_event("loop.crashed", gave_up=True)
    assert isinstance(crashed.event, ev.LoopCrashed) and "WRONGTYPE" in crashed.event.error


async def test_the_process_exits_non_zero_when_a_loop_keeps_failing(stack_factory) -> None:
    stack: Stack = await stack_factory(start_worker=False)
    port = free_port()
    env = stack.process_env("failing-worker", PORT=str(port), SHUTDOWN_GRACE_S="1",
                            LOG_LEVEL="ERROR")  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *CLI, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        await stack.enqueue("first")
        await stack.wait_terminal(1)
        await break_stream(stack)
        _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1
    last = stderr.decode().strip().splitlines()[-1]
    assert last.startswith("queue-worker: stopped: loop ") and "keeps failing" in last


# --- leases and tasks handed out twice -----------------------------------------------------


async def test_a_lease_lost_mid_task_is_recorded_and_the_task_runs_once(stack_factory) -> None:
    stack: Stack = await stack_factory(
        executors=1, latency_s=1.5, executor_capacity=1, pull_ahead=0, queue_lease_s=0.6
    )
    await stack.enqueue("long")
    await stack.wait_event("task.dispatched", eval_id="long")
    await stack.expire("long")  # the queue takes the task back while it runs here
    lost = await stack.wait_event("task.lease_lost", eval_id="long")
    assert lost.worker_id == "test-worker"
    await stack.wait_terminal(1)
    await stack.wait_messages(1)
    await asyncio.sleep(0.3)
    task = stack.queue_state.tasks["long"]
    assert task.status == "completed" and task.complete_calls == 1
    assert stack.executor_state(0).eval_ids == {"long": 1}
    assert [c for c, _ in stack.messages] == ["evaluation:completed"]


async def test_a_task_handed_out_again_while_it_runs_is_not_run_twice(stack_factory) -> None:
    """Replica A runs the task; its lease runs out; replica B is handed the task: B records
    a duplicate handout (holder A) and does not execute it; A's outcome is reported."""
    stack: Stack = await stack_factory(
        executors=1, latency_s=1.5, executor_capacity=1, pull_ahead=0, queue_lease_s=30
    )
    await stack.enqueue("twice")
    await stack.wait_event("task.dispatched", eval_id="twice")
    other = Server(create_app(stack.settings.with_(hostname="replica-b", executor_capacity=2)))
    await other.start()
    try:
        await stack.wait_event("worker.started", timeout_s=10)
        await stack.expire("twice")
        duplicate = await stack.wait_event("task.duplicate_handout", eval_id="twice")
        assert duplicate.worker_id == "replica-b"
        assert isinstance(duplicate.event, ev.TaskDuplicateHandout)
        assert duplicate.event.holder.startswith("test-worker ")
        await stack.wait_terminal(1)
        await stack.wait_messages(1)
        await asyncio.sleep(0.3)
    finally:
        await other.stop()
    assert stack.executor_state(0).eval_ids == {"twice": 1}
    task = stack.queue_state.tasks["twice"]
    assert task.status == "completed" and task.complete_calls == 1 and task.pulls == 2
    completed = [e for e in await stack.entries() if isinstance(e.event, ev.TaskCompleted)]
    assert [e.worker_id for e in completed] == ["test-worker"]
    assert len(stack.messages) == 1


async def test_execute_carries_an_idempotency_key_per_attempt(stack_factory) -> None:
    stack: Stack = await stack_factory(executors=1)
    await stack.enqueue("keyed")
    await stack.wait_terminal(1)
    assert stack.executor_state(0).idempotency_keys == {"keyed:1": 1}


# --- bad queue answers ---------------------------------------------------------------------


async def test_bad_answers_back_off_and_one_handed_out_again_is_recorded_once(
    stack_factory,
) -> None:
    stack: Stack = await stack_factory(queue_backoff_step_s=0.1, queue_backoff_max_s=0.3)
    bodies = [b'{"no": "task"}', b"[1, 2]", b'"text"', b'{"eval_id": 5}', b'{"no": "task"}']
    for body in bodies:
        await stack.inject(body)
    await stack.enqueue("valid")
    await stack.wait_terminal(1)
    entries = await stack.entries()
    rejected = [e for e in entries if isinstance(e.event, ev.TaskRejected)]
    assert len(rejected) == 4  # the repeated answer is not recorded again
    # Each bad answer backs the queue off: 0.1 s, 0.2 s, 0.3 s, 0.3 s (capped).
    gaps_ms = [b.ts - a.ts for a, b in itertools.pairwise(rejected)]
    assert all(gap >= floor for gap, floor in zip(gaps_ms, (95, 195, 295), strict=True)), gaps_ms
    _, status = await stack.get_json("/status")
    assert status["live"]["quarantined"] == 1
    assert status["counters"]["rejected"] == 4


# --- stopping, restarting --------------------------------------------------------------------


async def test_a_clean_stop_closes_its_open_pull(stack_factory) -> None:
    stack: Stack = await stack_factory()
    await stack.enqueue("one")
    await stack.wait_terminal(1)
    await stack.stop_worker()
    closed = await stack.wait_event("pull.closed")
    assert closed.event.reason == "shutdown"  # type: ignore[union-attr]
    await stack.start_worker()
    await stack.enqueue("two")
    await stack.wait_terminal(2)
    types = Counter(e.event.type for e in await stack.entries())
    assert types["pull.interrupted"] == 0
    _, status = await stack.get_json("/status")
    assert status["counters"]["pulls_interrupted"] == 0


# --- a stalled worker, taken over ----------------------------------------------------------


async def test_a_stalled_worker_is_fenced_and_exits_when_it_wakes(stack_factory) -> None:
    """Replica A is stopped (SIGSTOP) long enough for its liveness key to expire; B takes it
    over, fencing A's generation. A, woken, can record nothing more and exits 1. Every task
    ends once at the queue and is published once; only tasks A had sent to an executor
    before it stalled may run twice."""
    stack: Stack = await stack_factory(
        start_worker=False, latency_s=0.3, executor_options=[{"capacity": 2}] * 3
    )
    timing = {
        "HEARTBEAT_INTERVAL_S": "0.2",
        "DEAD_AFTER_S": "1.5",
        "TAKEOVER_INTERVAL_S": "0.3",
        "QUEUE_LEASE_S": "5",  # a task A was handed in the instant it stalled comes back
        "EXECUTOR_CAPACITY": "1",
        "CLAIM_IDLE_MS": "1000",  # B takes over what A's projectors had read, soon
        "LOG_LEVEL": "ERROR",
    }
    ids = await stack.enqueue_many(40)
    a = await spawn_worker(stack.process_env("replica-a", **timing))
    b = await spawn_worker(stack.process_env("replica-b", **timing))
    try:
        await eventually(lambda: stack.terminal_in_queue() >= 8, 30)
        a.send_signal(signal.SIGSTOP)
        fenced = await stack.wait_event("worker.fenced", timeout_s=30, owner="replica-a")
        a.send_signal(signal.SIGCONT)
        assert await asyncio.wait_for(a.wait(), 30) == 1
        await stack.wait_terminal(len(ids), timeout_s=60)
        await stack.wait_messages(len(ids))
        await asyncio.sleep(0.5)
    finally:
        for proc in (a, b):
            if proc.returncode is None:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 30)
    assert fenced.worker_id == "replica-b"
    entries = await stack.entries()
    assert isinstance(fenced.event, ev.WorkerFenced)
    generation = fenced.event.generation
    late = [
        e
        for e in entries
        if id_key(e.id) > id_key(fenced.id) and e.worker_id == "replica-a" and e.gen <= generation
    ]
    assert late == []  # the stream took nothing more from A's generation
    taken = {
        e.event.eval_id
        for e in entries
        if isinstance(e.event, ev.TaskRecovered) and e.event.owner == "replica-a"
    }
    executions: Counter[str] = Counter()
    for i in range(3):
        executions.update(stack.executor_state(i).eval_ids)
    assert set(executions) == set(ids)
    twice = {eval_id for eval_id, n in executions.items() if n > 1}
    assert twice <= taken, (twice, taken)
    assert all(stack.queue_state.tasks[i].status == "completed" for i in ids)
    per_task = Counter(p["eval_id"] for _, p in stack.messages)
    assert set(per_task) == set(ids) and set(per_task.values()) == {1}


# --- Redis losing the stream's tail ----------------------------------------------------------


async def test_a_stream_that_went_back_is_a_reset_and_tasks_in_flight_are_restored(
    stack_factory,
) -> None:
    """Redis answering with a stream whose tail is gone (a failover to a replica that missed
    the last writes) is seen at the next heartbeat: stream.reset, the task in flight is
    re-recorded, and it still ends once."""
    stack: Stack = await stack_factory(
        executors=1, latency_s=1.5, heartbeat_interval_s=0.2, dead_after_s=2.0
    )
    await stack.enqueue("inflight")
    await stack.wait_event("task.dispatched", eval_id="inflight")
    key = Keys(stack.prefix).events
    tail = await stack.redis.xrevrange(key, count=3)  # the pull, the choice, the dispatch
    await stack.redis.xdel(key, *[entry_id for entry_id, _ in tail])
    reset = await stack.wait_event("stream.reset", timeout_s=10)
    assert isinstance(reset.event, ev.StreamReset)
    assert "went back" in reset.event.reason and reset.event.restored_tasks == 1
    restored = await stack.wait_event("task.restored", eval_id="inflight")
    assert isinstance(restored.event, ev.TaskRestored) and restored.event.stage == "dispatched"
    await stack.wait_terminal(1)
    await stack.wait_messages(1)
    await asyncio.sleep(0.3)
    assert stack.executor_state(0).eval_ids == {"inflight": 1}
    assert [c for c, _ in stack.messages] == ["evaluation:completed"]
    _, status = await stack.get_json("/status")
    assert status["in_flight"] == 0 and status["counters"]["stream_resets"] == 1


# --- credentials in URLs ----------------------------------------------------------------------


async def test_credentials_in_urls_are_sent_and_never_shown(stack_factory) -> None:
    """User and password given in QUEUE_SERVICE_URL and EXECUTOR_URLS go to those services as
    HTTP Basic auth, and appear nowhere else: not in /status, /health, /metrics, the stream,
    nor the log (at DEBUG)."""
    stack: Stack = await stack_factory(start_worker=False, executors=1)
    secret = "pa55-W0RD-leak"
    executor = stack.executors[0].url.replace("http://", f"http://ops:{secret}@")
    queue = stack.queue.url.replace("http://", f"http://ops:{secret}@")
    port = free_port()
    env = stack.process_env(
        "secret-worker", PORT=str(port), LOG_LEVEL="DEBUG", LOG_FORMAT="json",
        EXECUTOR_URLS=executor, QUEUE_SERVICE_URL=queue,
    )  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *CLI, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    shown: list[str] = []
    try:
        await stack.enqueue("guarded")
        await stack.wait_terminal(1)
        for path in ("/status", "/health", "/metrics"):
            async with stack.http.get(f"http://127.0.0.1:{port}{path}") as resp:
                shown.append(await resp.text())
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    expected = "Basic " + base64.b64encode(f"ops:{secret}".encode()).decode()
    assert stack.executor_state(0).authorizations == {expected: 1}
    assert stack.queue_state.tasks["guarded"].status == "completed"
    raw = await stack.redis.xrange(Keys(stack.prefix).events)
    shown += [repr(fields) for _, fields in raw]
    shown.append(stderr.decode())
    assert all(secret not in text for text in shown)
    assert any(stack.executors[0].url in text for text in shown)  # the bare URL is the name


async def test_a_redis_that_refuses_writes_at_start_stops_start_up_in_one_line(
    stack_factory, tmp_path
) -> None:
    stack: Stack = await stack_factory(start_worker=False)
    with RedisServer(directory=str(tmp_path)) as server:
        client = await open_redis(server.url)
        await client.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # read-only
        await client.aclose()
        env = stack.process_env("read-only", REDIS_URL=server.url, LOG_LEVEL="CRITICAL")
        result = await asyncio.create_subprocess_exec(
            *CLI, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        _, stderr = await asyncio.wait_for(result.communicate(), 60)
    assert result.returncode == 1
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "refused to start" in lines[0] and "ReadOnlyError" in lines[0], lines
