"""Task views from the task index: ``GET /tasks/{eval_id}``, ``GET /tasks`` and ``audit``.

A real worker, queue and executors; the index is kept by the append script in the same
Redis, and trimmed with the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, cast

from queue_worker.streams import events as ev
from queue_worker.streams.audit import history
from queue_worker.streams.connection import open_redis
from queue_worker.streams.index import TaskIndex, TaskState
from queue_worker.streams.keys import Keys
from queue_worker.streams.store import EventStore
from tests.harness import Stack, eventually


async def test_a_task_with_a_retry_has_its_whole_history(stack_factory) -> None:
    stack: Stack = await stack_factory(
        executors=2,
        executor_capacity=1,
        routing_strategy="round_robin",
        executor_options=[{"execute": "error500"}, {}],
        retry_base_ms=1,
    )
    ids = await stack.enqueue_many(4)
    await stack.wait_terminal(4)
    entries = await stack.entries()
    retried = next(e.event.eval_id for e in entries if isinstance(e.event, ev.TaskRetryScheduled))

    async def indexed() -> dict[str, Any] | None:
        status, body = await stack.get_json(f"/tasks/{retried}")
        if status == 200 and body["entries"][-1]["event"]["type"] == "task.reported":
            return cast(dict[str, Any], body)
        return None

    body = await eventually(indexed)
    assert body["eval_id"] == retried and body["state"] == "completed"
    assert body["executor"] == stack.executors[1].url
    types = [x["event"]["type"] for x in body["entries"]]
    expected = [e.event.type for e in entries if e.event.eval_id_or_empty == retried]
    assert types == expected  # exactly the stream's entries about it, in order
    assert "task.retry_scheduled" in types and types.count("task.dispatched") == 2
    ids_in_order = [x["id"] for x in body["entries"]]
    assert ids_in_order == [e.id for e in entries if e.event.eval_id_or_empty == retried]
    # The CLI's audit reads the same index.
    assert [e.id for e in await history(stack.store, retried)] == ids_in_order
    status, missing = await stack.get_json("/tasks/never-seen")
    assert status == 404 and "never-seen" in missing["detail"]

    async def completed() -> list[str] | None:
        _, page = await stack.get_json("/tasks?state=completed&limit=50")
        got = [t["eval_id"] for t in page["tasks"]]
        return got if len(got) == len(ids) else None

    assert sorted(await eventually(completed)) == ids


async def test_lists_page_filter_and_refuse_bad_parameters(stack_factory) -> None:
    stack: Stack = await stack_factory(
        executors=2,
        executor_capacity=2,
        executor_options=[{"failure_rate": 1.0}, {}],
        routing_strategy="round_robin",
    )
    ids = await stack.enqueue_many(10)
    await stack.wait_terminal(10)
    failed_on = stack.executors[0].url

    async def listed(state: str) -> list[dict[str, Any]]:
        out, cursor = [], None
        while True:
            query = f"/tasks?state={state}&limit=3" + (f"&cursor={cursor}" if cursor else "")
            status, page = await stack.get_json(query)
            assert status == 200 and len(page["tasks"]) <= 3
            out += page["tasks"]
            cursor = page["next_cursor"]
            if cursor is None:
                return out

    async def all_indexed() -> bool:
        return len(await listed("failed")) + len(await listed("completed")) == 10

    await eventually(all_indexed)
    failed, completed = await listed("failed"), await listed("completed")
    assert sorted(t["eval_id"] for t in failed + completed) == ids
    assert len({t["eval_id"] for t in failed + completed}) == 10  # pages never repeat
    assert all(t["executor"] == failed_on for t in failed)
    since = [t["since_ms"] for t in completed]
    assert since == sorted(since, reverse=True)  # latest first
    _, only = await stack.get_json(f"/tasks?state=failed&executor={failed_on}")
    assert len(only["tasks"]) == len(failed)
    _, none = await stack.get_json(f"/tasks?state=completed&executor={failed_on}")
    assert none["tasks"] == []
    for bad in (
        "/tasks",
        "/tasks?state=lost",
        "/tasks?state=failed&limit=0",
        "/tasks?state=failed&limit=x",
        "/tasks?state=failed&since=-1",
        "/tasks?state=failed&cursor=nonsense",
    ):
        status, body = await stack.get_json(bad)
        assert status == 400 and body["error"] == "Bad Request", bad


async def test_the_index_is_trimmed_with_the_stream(stack_factory) -> None:
    stack: Stack = await stack_factory(
        executors=1,
        executor_capacity=4,
        stream_maxlen=40,
        retention_interval_s=0.1,
    )
    first = await stack.enqueue_many(5, prefix="early")
    await stack.wait_terminal(5)
    index = TaskIndex(stack.redis, stack.store.keys)
    await eventually(lambda: _known(index, first[0]))
    later = [f"late-{i:03d}" for i in range(40)]
    feeding = asyncio.create_task(_feed(stack, later))
    try:
        # Each task writes about six entries: the early ones are trimmed, then forgotten.
        await eventually(lambda: _forgotten(index, first), 30)
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await feeding
    await stack.wait_terminal(45)
    status, _ = await stack.get_json(f"/tasks/{first[0]}")
    assert status == 404
    status, body = await stack.get_json(f"/tasks/{later[-1]}")
    assert status == 200 and body["entries"]
    assert await stack.redis.exists(stack.store.keys.task(first[0])) == 0


async def _feed(stack: Stack, ids: list[str]) -> None:
    for eval_id in ids:
        await stack.enqueue(eval_id)
        await asyncio.sleep(0.01)


async def _known(index: TaskIndex, eval_id: str) -> bool:
    return (await index.state(eval_id)) is not None


async def _forgotten(index: TaskIndex, ids: list[str]) -> bool:
    return all([(await index.state(i)) is None for i in ids])


async def test_a_read_token_sees_payloads_as_sizes_and_hashes(stack_factory) -> None:
    read, admin = "task-view-read-token-0123", "task-view-admin-token-0123"
    stack: Stack = await stack_factory(
        api_token=(("viewer", read),), admin_token=(("operator", admin),)
    )
    secret = "print('TOP-SECRET-CODE')"
    await stack.enqueue("private", code=secret)
    await stack.wait_terminal(1)
    assert stack.worker is not None

    async def get(path: str, token: str | None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with stack.http.get(f"{stack.worker.url}{path}", headers=headers) as resp:  # type: ignore[union-attr]
            return resp.status, await resp.json()

    async def reported(token: str) -> dict[str, Any] | None:
        status, body = await get("/tasks/private", token)
        types = [x["event"]["type"] for x in body.get("entries", [])] if status == 200 else []
        return cast(dict[str, Any], body) if "task.reported" in types else None

    body = await eventually(lambda: reported(read))
    pulled = next(x["event"] for x in body["entries"] if x["event"]["type"] == "task.pulled")
    assert pulled["task"]["code"]["redacted"] is True
    assert pulled["task"]["code"]["bytes"] == len(secret)
    assert "TOP-SECRET" not in str(body)
    status, _ = await get("/tasks/private?payloads=1", read)
    assert status == 403
    status, full = await get("/tasks/private?payloads=1", admin)
    assert status == 200 and "TOP-SECRET-CODE" in str(full)
    status, _ = await get("/tasks/private", None)
    assert status == 401  # a token is configured: it is required, even from loopback

    async def listed() -> bool:  # the index may be a moment behind the history
        status, page = await get("/tasks?state=completed", read)
        assert status == 200
        return [t["eval_id"] for t in page["tasks"]] == ["private"]

    await eventually(listed)


async def test_a_page_filtered_past_its_scan_still_says_where_to_go_on(redis_url, prefix) -> None:
    redis = await open_redis(redis_url)
    keys = Keys(prefix)
    index = TaskIndex(redis, keys)
    try:
        # 120 failed tasks on executor a, then (older) one on executor b.
        for i in range(121):
            eval_id, executor = (f"a-{i:03d}", "http://a") if i < 120 else ("b-00", "http://b")
            await redis.hset(keys.tasks, eval_id, f"{1000 - i}-0 failed {executor}")  # type: ignore[misc]
            await redis.zadd(keys.tasks_in("failed"), {eval_id: 1000 - i})
        rows, cursor = await index.page("failed", limit=1, executor="http://b")
        assert rows == [] and cursor is not None  # a scan's worth, none of b: go on from there
        found: list[TaskState] = []
        while cursor is not None and not found:
            found, cursor = await index.page("failed", limit=1, executor="http://b", cursor=cursor)
        assert [r.eval_id for r in found] == ["b-00"]
    finally:
        await redis.aclose()


async def test_the_index_moves_in_the_append_that_records_the_entry(redis_url, prefix) -> None:
    """No reader in between: the state and history are there when the append returns."""
    redis = await open_redis(redis_url)
    store = EventStore(redis, Keys(prefix), "w1")
    index = TaskIndex(redis, store.keys)
    task = ev.Task(eval_id="t1", code="print(1)")
    try:
        pulled = await store.append(
            ev.TaskPulled(eval_id="t1", pull_id="p1", task=task, code_bytes=8)
        )
        assert (await index.state("t1")) == TaskState(
            eval_id="t1", state="waiting", executor=None, entry_id=pulled[0]
        )
        done = await store.append(
            ev.TaskDispatched(eval_id="t1", executor="http://x", attempt=1, timeout_s=1.0),
            ev.TaskCompleted(
                eval_id="t1", executor="http://x", attempt=1, result={}, duration_ms=1.0
            ),
            ev.ExecutorHealthChanged(executor="http://x", healthy=True, reason="ok"),
        )
        state = await index.state("t1")
        assert state is not None and (state.state, state.executor) == ("completed", "http://x")
        assert await index.entry_ids("t1") == pulled + done[:2]  # no eval_id: not indexed
        assert await redis.zscore(store.keys.tasks_in("completed"), "t1") is not None
        assert await redis.zscore(store.keys.tasks_in("waiting"), "t1") is None
    finally:
        await redis.aclose()


async def test_an_earlier_versions_index_group_is_caught_up_and_removed(redis_url, prefix) -> None:
    """A stream whose entries an ``index`` group was to index (written by an earlier
    version, so not indexed at append): what the group had not read is indexed, and
    the group goes, so it holds nothing back."""
    redis = await open_redis(redis_url)
    keys = Keys(prefix)
    store = EventStore(redis, keys, "w1")
    index = TaskIndex(redis, keys)
    task = ev.Task(eval_id="old", code="print(1)")
    try:
        await store.append(ev.TaskPulled(eval_id="old", pull_id="p", task=task, code_bytes=8))
        await redis.xgroup_create(keys.events, keys.index_group, id="$")
        # Entries as an earlier version wrote them: in the stream, not in the index.
        unindexed = [
            await redis.xadd(
                keys.events,
                {
                    "type": e.type,
                    "eval_id": "old",
                    "worker_id": "w0",
                    "gen": "1",
                    "ts": "1700000000000",
                    "data": ev.encode_event(e),
                },
            )
            for e in (
                ev.TaskDispatched(eval_id="old", executor="http://x", attempt=1, timeout_s=1.0),
                ev.TaskFailed(eval_id="old", executor="http://x", attempt=1, reason="r", error="e"),
            )
        ]
        state = await index.state("old")
        assert state is not None and state.state == "waiting"
        assert await index.retire_legacy_group(store) == 2
        state = await index.state("old")
        assert state is not None and (state.state, state.entry_id) == (
            "failed",
            unindexed[-1].decode(),
        )
        assert len(await index.entry_ids("old")) == 3
        assert keys.index_group not in [g["name"] for g in await store.info_groups()]
        assert await index.retire_legacy_group(store) == 0  # nothing left to do
    finally:
        await redis.aclose()


async def test_a_task_index_key_of_another_type_never_fails_or_repeats_an_append(
    redis_url, prefix
) -> None:
    """The index is derived: a key of it written by hand as another type costs the index
    those entries (counted, logged), never the append, and no entry is written twice."""
    redis = await open_redis(redis_url)
    keys = Keys(prefix)
    store = EventStore(redis, keys, "w1")
    await store.start()
    index = TaskIndex(redis, keys)
    task = ev.Task(eval_id="t1", code="print(1)")
    try:
        await redis.set(keys.tasks, "not a hash")
        ids = await store.append(
            ev.TaskPulled(eval_id="t1", pull_id="p1", task=task, code_bytes=8),
            ev.TaskDispatched(eval_id="t1", executor="http://x", attempt=1, timeout_s=1.0),
        )
        assert len(ids) == 2 and await redis.xlen(keys.events) == 2
        assert store.index_writes_refused == 2 and store.writable
        assert await index.entry_ids("t1") == ids  # the history key was writable
        await redis.delete(keys.tasks)
        await store.append(
            ev.TaskCompleted(
                eval_id="t1", executor="http://x", attempt=1, result={}, duration_ms=1.0
            )
        )
        state = await index.state("t1")
        assert state is not None and state.state == "completed"
        assert await redis.xlen(keys.events) == 3
    finally:
        await store.stop()
        await redis.aclose()
