"""Hostile answers from the queue, the executors and Redis: bounded, decoded safely, each
failing only its own item, and the loops going on. Real servers, real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from queue_worker.devstack.executor import EXECUTOR_STATE, create_executor_app
from queue_worker.devstack.serve import Server
from queue_worker.router.bodies import BodyTooLarge, CutBody, read_capped
from queue_worker.router.dispatch import Executed, ExecutionFailed, execute
from queue_worker.router.health import probe
from queue_worker.router.queue_client import InvalidTask, QueueClient, parse_task
from queue_worker.router.reporter import FULL_RESULT_REPORTS, Reporter
from queue_worker.streams import events as ev
from queue_worker.streams.entries import parse_entries
from queue_worker.streams.keys import Keys
from queue_worker.streams.publisher import Publisher
from queue_worker.streams.store import EventStore
from tests.harness import Stack, eventually

NESTED = b"[" * 50_000  # deeper than any recursion limit, under the 64 KiB health cap
MiB = 1 << 20


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


# --- a queue and an executor that answer anything ---------------------------------------------

HOSTILE_MODE = web.AppKey("hostile_mode", dict)


async def _hostile_answer(request: web.Request) -> web.StreamResponse:
    """Every route answers 200 with what ``mode`` says: ``nested`` JSON, a ``big`` body
    (200 KB with a Content-Length) or an ``endless`` chunked one, each starting like a task."""
    mode = request.app[HOSTILE_MODE]["mode"]
    head = b'{"eval_id": "hostile-1", "status": "healthy", "code": "'
    if mode == "nested":
        return web.Response(body=b'{"status": "healthy", "x": ' + NESTED)
    if mode == "big":
        return web.Response(body=head + b"x" * 200_000 + b'"}')
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    try:
        await response.write(head)
        while True:
            await response.write(b"x" * 65536)
    except ConnectionError:  # the reader hung up at its cap
        return response


@pytest.fixture
async def hostile() -> AsyncIterator[Server]:
    app = web.Application()
    app[HOSTILE_MODE] = {"mode": "nested"}
    app.router.add_route("*", "/{tail:.*}", _hostile_answer)
    async with Server(app) as server:
        yield server


def set_mode(server: Server, mode: str) -> None:
    server.app[HOSTILE_MODE]["mode"] = mode


async def test_read_capped_stops_an_endless_answer(http: aiohttp.ClientSession) -> None:
    app = create_executor_app("ex", latency_s=0, execute="endless")
    async with Server(app) as executor:
        async with http.post(f"{executor.url}/execute", json={"eval_id": "e", "code": ""}) as r:
            with pytest.raises(BodyTooLarge) as info:
                await read_capped(r, MiB)
        assert info.value.declared_bytes is None and len(info.value.prefix) == MiB
        assert info.value.prefix.startswith(b'{"eval_id":"e","status":"completed"')
        assert str(info.value) == "too_large: more than 1048576 bytes"
        # The connection was dropped: the executor's write failed and it finished.
        await eventually(lambda: executor.app[EXECUTOR_STATE].in_flight == 0, 10)


@pytest.mark.parametrize(
    ("mode", "code", "cap", "says"),
    [
        ("normal", "SIMULATE_OUTPUT_BYTES=3000000", MiB, "more than 1048576 bytes"),  # chunked
        ("normal", "SIMULATE_OUTPUT_BYTES=500000", 64 << 10, "Content-Length"),
        ("endless", "", MiB, "more than 1048576 bytes"),
    ],
)
async def test_an_executor_answer_over_the_cap_fails_the_task(
    http: aiohttp.ClientSession, mode: str, code: str, cap: int, says: str
) -> None:
    async with Server(create_executor_app("ex", latency_s=0, execute=mode)) as executor:
        task = ev.Task(eval_id="big", code=code)
        outcome = await execute(http, executor.url, task, 30, 5, max_response_bytes=cap)
    assert isinstance(outcome, ExecutionFailed)
    assert outcome.reason == "executor_invalid_response" and not outcome.retryable
    assert "too_large" in outcome.error and says in outcome.error
    assert f"MAX_RESPONSE_BYTES={cap}" in outcome.error
    assert len(outcome.error) < 1000  # an excerpt, not the answer


async def test_a_streamed_answer_under_the_cap_is_read_whole(http: aiohttp.ClientSession) -> None:
    async with Server(create_executor_app("ex", latency_s=0)) as executor:
        task = ev.Task(eval_id="big", code="SIMULATE_OUTPUT_BYTES=3000000")
        outcome = await execute(http, executor.url, task, 30, 5, max_response_bytes=4 * MiB)
    assert isinstance(outcome, Executed)
    assert outcome.result["output"] == "x" * 3_000_000
    assert outcome.result["executor_id"] == "ex"


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("nested", 'health answer is not {"status": ...} JSON (JSON nested too deeply)'),
        ("big", "health answer is too_large: Content-Length 200057 is over 65536 bytes"),
        ("endless", "health answer is too_large: more than 65536 bytes"),
    ],
)
async def test_a_hostile_health_answer_is_unhealthy_with_a_reason(
    http: aiohttp.ClientSession, hostile: Server, mode: str, reason: str
) -> None:
    set_mode(hostile, mode)
    result = await probe(http, hostile.url, 5.0)
    assert (result.healthy, result.reason) == (False, reason)


@pytest.mark.parametrize("mode", ["big", "endless"])
async def test_a_task_body_over_the_cap_is_cut_and_rejected_naming_its_eval_id(
    http: aiohttp.ClientSession, hostile: Server, mode: str
) -> None:
    set_mode(hostile, mode)
    client = QueueClient(http, hostile.url, max_task_bytes=100_000)
    body = await client.next_task()
    assert isinstance(body, CutBody) and len(body) <= 100_000
    with pytest.raises(InvalidTask) as info:
        parse_task(body)
    assert info.value.reason.startswith("task body is too_large: ")
    assert "100000 bytes" in info.value.reason and "MAX_CODE_BYTES" in info.value.reason
    assert info.value.eval_id == "hostile-1"


@pytest.mark.parametrize("mode", ["nested", "big", "endless"])
async def test_hostile_report_renew_and_stats_answers_are_verdicts(
    http: aiohttp.ClientSession, hostile: Server, mode: str
) -> None:
    set_mode(hostile, mode)
    client = QueueClient(http, hostile.url)
    assert await client.fail("e1", "boom") == (200, False)  # accepted: its status says so
    assert await client.complete("e1", {"output": "x"}) == (200, False)
    assert await client.renew("e1", 30) is True
    assert await client.running_count() is None


async def test_unreadable_stream_entries_and_full_results_are_skipped(
    redis_url: str, prefix: str
) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    store = EventStore(redis, Keys(prefix), "w")
    try:
        await redis.xadd(store.keys.events, {"type": "task.failed", "data": b'{"a":' + NESTED})
        await redis.xadd(store.keys.events, {"type": "task.failed", "data": b"\xff\xfe"})
        await store.append(ev.TaskFailed(eval_id="ok", attempt=1, reason="r", error="e"))
        raws = await redis.xrange(store.keys.events)
        assert len(raws) == 3
        assert [e.event.eval_id_or_empty for e in parse_entries(raws)] == ["ok"]
        assert [e.event.eval_id_or_empty for e in await store.read_all()] == ["ok"]
        cut = {"status": "completed", "output": "cut"}
        event = ev.TaskCompleted(
            eval_id="n", executor="x", attempt=1, result=cut, duration_ms=1, truncated=True
        )
        for stored in (b'{"a":' + NESTED, b"\xff", b"[1]", b"not json"):
            await redis.set(store.keys.result("n"), stored)
            assert await store.full_result(event) == cut
            assert await store.stored_result("n") is None
    finally:
        await redis.aclose()


# --- bounded pub/sub messages -----------------------------------------------------------------


async def test_publisher_cuts_messages_over_the_cap(redis_url: str, prefix: str) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    keys = Keys(prefix)
    store = EventStore(redis, keys, "w")
    pubsub = redis.pubsub()
    await pubsub.subscribe("evaluation:completed", "evaluation:failed")
    cap = 64 << 10
    publisher = Publisher(store, "publisher", "c1", block_ms=50, max_message_bytes=cap)
    received: dict[str, tuple[int, dict[str, Any]]] = {}

    async def listen() -> None:
        async for msg in pubsub.listen():
            if msg["type"] == "message":
                payload = msgspec.json.decode(msg["data"])
                received[payload["eval_id"]] = (len(msg["data"]), payload)

    listener = asyncio.create_task(listen())
    runner = asyncio.create_task(publisher.run())
    try:
        full = {"status": "completed", "output": "o" * 500_000, "error": "\n" * 50_000}
        await redis.set(keys.result("kept"), msgspec.json.encode(full))
        small = {"status": "completed", "output": "fine"}
        junk = {"status": "failed", "output": "", "junk": ["j"] * 100_000}
        cut = {"status": "completed", "output": "o" * 100}
        await store.append(
            ev.TaskCompleted(eval_id="kept", executor="x", attempt=1, result=cut,
                             duration_ms=1, truncated=True),
            ev.TaskCompleted(eval_id="small", executor="x", attempt=1, result=small,
                             duration_ms=1),
            ev.TaskFailed(eval_id="junk", attempt=1, reason="r", error="e" * 200_000,
                          result=junk),
            ev.TaskCompleted(eval_id="gone", executor="x", attempt=1, result=cut,
                             duration_ms=1, truncated=True),
        )  # fmt: skip
        await eventually(lambda: len(received) == 4)
        assert all(size <= cap for size, _ in received.values())
        # Under the cap: unchanged, no new fields.
        assert received["small"][1] == {"eval_id": "small", "result": small}
        # Over it: texts cut to fit, the full result named.
        _, kept = received["kept"]
        assert kept["truncated"] is True and kept["result_key"] == keys.result("kept")
        assert kept["result"]["status"] == "completed"
        assert 0 < len(kept["result"]["output"]) < 500_000
        assert kept["result"]["output"] == "o" * len(kept["result"]["output"])
        assert msgspec.json.decode(await redis.get(keys.result("kept"))) == full
        # Too large with the result whole in the stream: the publisher keeps it, 7 days.
        _, failed = received["junk"]
        assert failed["truncated"] is True and failed["result_key"] == keys.result("junk")
        assert failed["error"] and failed["error"] == "e" * len(failed["error"])
        assert "junk" not in failed["result"] and failed["result"]["status"] == "failed"
        assert msgspec.json.decode(await redis.get(keys.result("junk"))) == junk
        assert 6 * 86400 < await redis.ttl(keys.result("junk")) <= 7 * 86400
        # The full result expired: the cut one is published, marked, with no key.
        assert received["gone"][1] == {"eval_id": "gone", "result": cut, "truncated": True}
        assert publisher.published == 4 and publisher.truncated == 3
        assert (await redis.xpending(keys.outcomes, "publisher"))["pending"] == 0
    finally:
        for task in (runner, listener):
            task.cancel()
        await asyncio.gather(runner, listener, return_exceptions=True)
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await redis.aclose()


# --- the worker, end to end -------------------------------------------------------------------


def rejected(entries: list[ev.Entry]) -> list[ev.TaskRejected]:
    return [e.event for e in entries if isinstance(e.event, ev.TaskRejected)]


async def test_nested_and_oversized_tasks_are_rejected_and_pulling_goes_on(stack_factory) -> None:
    stack: Stack = await stack_factory(executors=1)
    await stack.inject(NESTED)
    await stack.inject(b'{"eval_id": "deep-1", "code": "x", "meta": ' + NESTED)
    # Over the default cap (6 x MAX_CODE_BYTES + 64 KiB), with a Content-Length.
    await stack.inject(b'{"eval_id": "huge-1", "code": "' + b"x" * (7 * MiB) + b'"}')
    await stack.enqueue("after")
    await stack.wait_terminal(1)
    assert stack.queue_state.tasks["after"].status == "completed"
    found = rejected(await stack.entries())
    assert [(r.eval_id, r.reason[:24]) for r in found] == [
        (None, "Expected `object | null`"),
        ("deep-1", "JSON nested too deeply"),
        ("huge-1", "task body is too_large: "),
    ]
    assert "Content-Length" in found[2].reason and len(found[2].excerpt) == 200
    await stack.wait_messages(3)  # deep-1, huge-1 and the completed one
    errors: dict[str, str] = {
        p["eval_id"]: p["error"] for c, p in stack.messages if c == "evaluation:failed"
    }
    assert errors["huge-1"].startswith("invalid task payload: task body is too_large")
    assert errors["deep-1"] == "invalid task payload: JSON nested too deeply"


async def test_hostile_executor_answers_fail_one_task_each(stack_factory) -> None:
    stack: Stack = await stack_factory(executors=1, executor_capacity=1)
    await stack.control(0, execute="nested")
    await stack.enqueue("nested-1")
    await stack.wait_terminal(1)
    await stack.control(0, execute="endless")
    await stack.enqueue("endless-1", timeout=60)
    await stack.wait_terminal(2)
    await stack.control(0, execute="normal")
    # Over the default MAX_RESPONSE_BYTES (16 MiB), streamed without a Content-Length.
    await stack.enqueue("huge-1", code="SIMULATE_OUTPUT_BYTES=20000000", timeout=60)
    await stack.enqueue("after")
    await stack.wait_terminal(4)
    tasks = stack.queue_state.tasks
    assert tasks["after"].status == "completed"
    entries = await stack.entries()
    failed = {e.event.eval_id: e.event for e in entries if isinstance(e.event, ev.TaskFailed)}
    assert set(failed) == {"nested-1", "endless-1", "huge-1"}
    assert all(f.reason == "executor_invalid_response" for f in failed.values())
    assert all(len(f.attempts) == 1 for f in failed.values())  # not retried
    assert failed["nested-1"].error.startswith(
        "executor answer is not a result (JSON nested too deeply)"
    )
    for eval_id in ("endless-1", "huge-1"):  # stopped at the cap, not at the timeout
        error = failed[eval_id].error
        assert error.startswith("executor answer is too_large: more than 16777216 bytes")
        assert "MAX_RESPONSE_BYTES=16777216" in error
        assert tasks[eval_id].status == "failed" and tasks[eval_id].error == error
    _, status = await stack.get_json("/status")
    assert status["in_flight"] == 0
    _, health = await stack.get_json("/health")
    assert health["executors_healthy"] == 1  # it answered: wrong answers are not ill health


async def test_a_nested_health_answer_turns_unhealthy_and_the_checker_survives(
    stack_factory,
) -> None:
    stack: Stack = await stack_factory(executors=2, health_interval_s=0.1)
    url = stack.executors[0].url
    await stack.control(0, health="nested")
    down = await stack.wait_event("executor.health_changed", executor=url, healthy=False)
    assert isinstance(down.event, ev.ExecutorHealthChanged)
    assert down.event.reason == (
        'health answer is not {"status": ...} JSON (JSON nested too deeply)'
    )
    await stack.control(0, health="healthy")

    async def back_up() -> bool:
        return any(
            isinstance(e.event, ev.ExecutorHealthChanged)
            and e.event.executor == url
            and e.event.healthy
            and e.id > down.id
            for e in await stack.entries()
        )

    await eventually(back_up)
    await stack.enqueue_many(4)
    await stack.wait_terminal(4)


async def test_a_result_too_large_for_a_message_is_cut_with_its_key(stack_factory) -> None:
    stack: Stack = await stack_factory(executors=1)
    await stack.enqueue("big", code="SIMULATE_OUTPUT_BYTES=3000000")
    await stack.wait_terminal(1)
    await stack.wait_messages(1)
    channel, payload = stack.messages[0]
    assert channel == "evaluation:completed"
    assert len(msgspec.json.encode(payload)) <= MiB  # PUBLISH_MAX_BYTES
    key = Keys(stack.prefix).result("big")
    assert payload["truncated"] is True and payload["result_key"] == key
    output = payload["result"]["output"]
    assert 900_000 < len(output) < MiB and output == "x" * len(output)
    full = msgspec.json.decode(await stack.redis.get(key))
    assert full["output"] == "x" * 3_000_000 and full["executor_id"] == "executor-1"
    assert stack.queue_state.tasks["big"].output == full  # the queue gets it whole


async def test_reports_of_kept_results_hold_only_a_few_in_memory(
    redis_url: str, prefix: str, http: aiohttp.ClientSession
) -> None:
    seen = {"now": 0, "most": 0, "outputs": 0}

    async def complete(request: web.Request) -> web.Response:
        seen["now"] += 1
        seen["most"] = max(seen["most"], seen["now"])
        body = msgspec.json.decode(await request.read())
        await asyncio.sleep(0.05)  # overlap: every report of the batch is under way at once
        seen["now"] -= 1
        seen["outputs"] += body["output"]["output"] == "o" * 200_000
        return web.json_response({"status": "completed"})

    app = web.Application(client_max_size=4 * MiB)
    app.router.add_post("/tasks/{eval_id}/complete", complete)
    redis = aioredis.Redis.from_url(redis_url)
    store = EventStore(redis, Keys(prefix), "w")
    events = []
    for i in range(10):
        full = {"status": "completed", "output": "o" * 200_000}
        await redis.set(store.keys.result(f"t{i}"), msgspec.json.encode(full))
        cut = {"status": "completed", "output": "o" * 10}
        events.append(
            ev.TaskCompleted(
                eval_id=f"t{i}", executor="x", attempt=1, result=cut, duration_ms=1, truncated=True
            )
        )
    await store.append(*events)  # one batch: reported concurrently
    async with Server(app) as queue:
        reporter = Reporter(store, "reporter", "c1", QueueClient(http, queue.url), block_ms=50)
        runner = asyncio.create_task(reporter.run())
        try:
            await eventually(lambda: reporter.reported == 10)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            await redis.aclose()
    assert seen["outputs"] == 10  # the queue got every result whole
    assert seen["most"] <= FULL_RESULT_REPORTS
