"""The outcome stream: a copy of each outcome entry under its main stream id, which is
all the publisher and the reporter read; the hand-over from their groups on the main
stream (an earlier version's), and retention of both streams, on a real Redis."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from queue_worker.devstack.serve import Server
from queue_worker.router.queue_client import QueueClient
from queue_worker.router.reporter import Reporter
from queue_worker.streams import events as ev
from queue_worker.streams import retention
from queue_worker.streams.entries import id_key
from queue_worker.streams.keys import Keys
from queue_worker.streams.operate import format_info, stream_info
from queue_worker.streams.projector import Batch, GroupProjector
from queue_worker.streams.publisher import Publisher
from queue_worker.streams.store import EventStore
from tests.harness import Stack, eventually


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def completed(eval_id: str) -> ev.TaskCompleted:
    result = {"status": "completed", "output": eval_id}
    return ev.TaskCompleted(eval_id=eval_id, executor="x", attempt=1, result=result, duration_ms=1)


async def test_the_outcome_stream_holds_each_outcome_under_its_main_stream_id(
    redis: aioredis.Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    store = EventStore(redis, keys, "w")
    await store.start()
    try:
        # Concurrent appends: several groups in one script call.
        await asyncio.gather(
            *(
                store.append(
                    ev.PullStarted(pull_id=str(i)),
                    completed(f"c{i}"),
                    ev.TaskFailed(eval_id=f"f{i}", attempt=1, reason="r", error="e"),
                    ev.TaskRejected(pull_id=str(i), reason="bad", excerpt="{}"),
                    ev.TaskReported(eval_id=f"c{i}", outcome="completed", http_status=200),
                )
                for i in range(20)
            )
        )
    finally:
        await store.stop()
    main = await redis.xrange(keys.events)
    outcomes = await redis.xrange(keys.outcomes)
    assert len(main) == 100 and len(outcomes) == 60
    # The same ids, the same fields: nothing else.
    assert outcomes == [raw for raw in main if raw[1][b"type"] in ev.OUTCOME_TYPES]
    assert store.outcome_ids_diverged == 0


async def test_an_outcome_stream_ahead_of_the_main_one_does_not_fail_the_append(
    redis: aioredis.Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    store = EventStore(redis, keys, "w")
    await redis.xadd(keys.outcomes, {"type": "by-hand"}, id="99999999999999-0")
    ids = await store.append(ev.PullStarted(pull_id="p"), completed("a"))
    assert len(ids) == 2 and store.outcome_ids_diverged == 1
    [(copy_id, fields)] = await redis.xrange(keys.outcomes, "(99999999999999-0", "+")
    assert id_key(copy_id.decode()) > (99999999999999, 0)
    assert fields[b"entry_id"] == ids[1].encode()  # the main stream's id, named
    assert fields[b"type"] == b"task.completed" and fields[b"eval_id"] == b"a"
    [(_, main_fields)] = await redis.xrange(keys.events, ids[1], ids[1])
    assert b"entry_id" not in main_fields  # the main stream's entry is as ever
    # The copy is still published.
    pubsub = redis.pubsub()
    await pubsub.subscribe("evaluation:completed")
    publisher = Publisher(store, "publisher", "c1", block_ms=50)
    runner = asyncio.create_task(publisher.run())
    try:
        await eventually(lambda: publisher.published == 1)
        message = await eventually(lambda: pubsub.get_message(True, timeout=0.1), 10, 0)
        assert msgspec.json.decode(message["data"])["eval_id"] == "a"
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await pubsub.aclose()  # type: ignore[no-untyped-call]


async def test_an_outcome_stream_that_is_not_one_or_takes_no_id_leaves_no_half_batch(
    redis: aioredis.Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    store = EventStore(redis, keys, "w")
    await redis.set(keys.outcomes, "not a stream")
    with pytest.raises(aioredis.ResponseError, match="WRONGTYPE"):
        await store.append(ev.PullStarted(pull_id="p"), completed("a"))
    assert await redis.xlen(keys.events) == 0  # refused before anything was written
    # A stream that takes no id at all: the main entry lands, the missing copy is told.
    await redis.delete(keys.outcomes)
    top = "18446744073709551615-18446744073709551615"
    await redis.xadd(keys.outcomes, {"type": "by-hand"}, id=top)
    ids = await store.append(ev.PullStarted(pull_id="p"), completed("b"))
    assert await redis.xlen(keys.events) == 2 and await redis.xlen(keys.outcomes) == 1
    assert store.outcome_copies_missing == 1 and store.outcome_ids_diverged == 0
    assert len(ids) == 2


class FailingOutcomes(GroupProjector):
    """Reads the outcome stream and fails on every batch."""

    name = "failing"
    outcomes_only = True

    async def handle(self, batch: Batch) -> None:
        raise ValueError("cannot handle this one")


@pytest.mark.parametrize("diverged", [False, True])
async def test_a_dead_letter_from_the_outcome_stream_names_it_and_the_main_entry_id(
    redis: aioredis.Redis, prefix: str, diverged: bool
) -> None:
    keys = Keys(prefix)
    store = EventStore(redis, keys, "w")
    if diverged:  # the copy takes an id of its own, and names the main one
        await redis.xadd(keys.outcomes, {"type": "by-hand"}, id="99999999999999-0")
        await redis.xgroup_create(keys.outcomes, "failing", id="$")
    ids = await store.append(ev.PullStarted(pull_id="p"), completed("poison"))
    assert store.outcome_ids_diverged == int(diverged)
    failing = FailingOutcomes(
        store, "failing", "c1", block_ms=50, claim_idle_ms=10, max_deliveries=2
    )
    runner = asyncio.create_task(failing.run())

    async def settled() -> tuple[list[Any], list[ev.EntryDeadLettered]] | None:
        """The dead letter, its event and its acknowledgement: three writes, in turn."""
        dead = await redis.xrange(keys.dead_letters)
        lettered = [
            e.event for e in await store.read_all() if isinstance(e.event, ev.EntryDeadLettered)
        ]
        pending = (await redis.xpending(keys.outcomes, "failing"))["pending"]
        return (dead, lettered) if dead and lettered and not pending else None

    try:
        dead, lettered = await eventually(settled, 20, 0.05)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    [(_, fields)] = dead
    assert fields[b"stream"] == keys.outcomes.encode()
    assert fields[b"entry_id"] == ids[1].encode()  # the same id in the main stream
    assert [(e.entry_id, e.eval_id) for e in lettered] == [(ids[1], "poison")]


async def _old_version_outcomes(
    redis: aioredis.Redis, keys: Keys, group: str, eval_ids: list[str]
) -> list[str]:
    """Outcomes as an earlier version appended them: in the main stream only, read by
    ``group`` there."""
    await redis.xgroup_create(keys.events, group, id="0", mkstream=True)
    ids = []
    for eval_id in eval_ids:
        event = completed(eval_id)
        fields = {"type": event.type, "eval_id": eval_id, "worker_id": "old", "gen": "1",
                  "ts": "1", "data": ev.encode_event(event)}  # fmt: skip
        ids.append((await redis.xadd(keys.events, fields)).decode())  # type: ignore[arg-type]
    # Two were handled before the upgrade; two more were read by a consumer that died.
    await redis.xreadgroup(group, "gone", {keys.events: ">"}, count=2)
    await redis.xack(keys.events, group, *ids[:2])
    await redis.xreadgroup(group, "dead", {keys.events: ">"}, count=2)
    return ids


async def test_an_upgrade_publishes_the_old_groups_outcomes_once_and_retires_it(
    redis: aioredis.Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    store = EventStore(redis, keys, "w")
    await _old_version_outcomes(redis, keys, "publisher", [f"old{i}" for i in range(6)])
    # The new version appends meanwhile: these have their copies in the outcome stream.
    await store.append(completed("new0"), ev.PullStarted(pull_id="p"), completed("new1"))
    pubsub = redis.pubsub()
    await pubsub.subscribe("evaluation:completed")
    heard: list[str] = []

    async def listen() -> None:
        async for msg in pubsub.listen():
            if msg["type"] == "message":
                heard.append(msgspec.json.decode(msg["data"])["eval_id"])

    listener = asyncio.create_task(listen())
    publisher = Publisher(store, "publisher", "c1", block_ms=50, claim_idle_ms=200)
    legacy = publisher.retiring()
    runner = asyncio.create_task(publisher.run())
    try:
        await asyncio.wait_for(legacy.retire(poll_s=0.05), 30)
        assert legacy.retired
        assert "publisher" not in {g["name"] for g in await store.info_groups()}
        await store.append(completed("new2"))
        await eventually(lambda: "new2" in heard)
        await asyncio.sleep(0.3)  # room for a duplicate to show
        assert Counter(heard) == Counter(
            ["old2", "old3", "old4", "old5", "new0", "new1", "new2"]
        )  # old0 and old1 went out before the upgrade; each other one once
        summary = await redis.xpending(keys.outcomes, "publisher")
        assert summary["pending"] == 0
        # Nothing left to hand over: a second retire finds no group and returns.
        again = publisher.retiring()
        await asyncio.wait_for(again.retire(poll_s=0.05), 5)
        assert not again.retired
    finally:
        for task in (runner, listener):
            task.cancel()
        await asyncio.gather(runner, listener, return_exceptions=True)
        await pubsub.aclose()  # type: ignore[no-untyped-call]


async def test_an_upgrade_reports_the_old_groups_outcomes_and_retires_it(
    redis: aioredis.Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    store = EventStore(redis, keys, "w")
    reported: Counter[str] = Counter()

    async def complete(request: web.Request) -> web.Response:
        reported[request.match_info["eval_id"]] += 1
        return web.json_response({"status": "completed"})

    app = web.Application()
    app.router.add_post("/tasks/{eval_id}/complete", complete)
    await _old_version_outcomes(redis, keys, "reporter", [f"old{i}" for i in range(5)])
    await store.append(completed("new0"))
    async with Server(app) as queue, aiohttp.ClientSession() as http:
        client = QueueClient(http, queue.url)
        reporter = Reporter(store, "reporter", "c1", client, block_ms=50, claim_idle_ms=200)
        legacy = reporter.retiring()
        runner = asyncio.create_task(reporter.run())
        try:
            await asyncio.wait_for(legacy.retire(poll_s=0.05), 30)
            assert legacy.retired
            await eventually(lambda: reported["new0"] == 1)
            await asyncio.sleep(0.3)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
    assert reported == Counter(["old2", "old3", "old4", "new0"])
    kinds = [e.event for e in await store.read_all() if isinstance(e.event, ev.TaskReported)]
    assert sorted(e.eval_id for e in kinds) == ["new0", "old2", "old3", "old4"]
    assert "reporter" not in {g["name"] for g in await store.info_groups()}


async def test_retention_trims_both_streams_never_past_an_outcome_group(
    redis: aioredis.Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    store = EventStore(redis, keys, "w")
    ids: list[str] = []
    for i in range(50):
        ids += await store.append(ev.PullStarted(pull_id=str(i)), completed(f"t{i}"))
    outcome_ids = ids[1::2]
    # A group of the outcome stream has read (not acknowledged) up to the 10th outcome.
    await redis.xgroup_create(keys.outcomes, "publisher", id="0")
    await redis.xreadgroup("publisher", "c", {keys.outcomes: ">"}, count=10)
    await redis.xack(keys.outcomes, "publisher", *outcome_ids[:5])
    assert await retention.trim_point(store, 10) == outcome_ids[5]  # its oldest pending
    assert await retention.trim(store, 10, approximate=False) == ids.index(outcome_ids[5])
    assert (await redis.xrange(keys.outcomes, count=1))[0][0].decode() == outcome_ids[5]
    assert (await redis.xrange(keys.events, count=1))[0][0].decode() == outcome_ids[5]
    # Acknowledged and read on: both streams go down to about maxlen, at one point.
    await redis.xack(keys.outcomes, "publisher", *outcome_ids[5:10])
    await redis.xreadgroup("publisher", "c", {keys.outcomes: ">"})
    await redis.xack(keys.outcomes, "publisher", *outcome_ids[10:])
    await retention.trim(store, 10, approximate=False)
    assert await store.length() == 10
    assert [r[0].decode() for r in await redis.xrange(keys.outcomes)] == outcome_ids[-5:]
    info = await stream_info(store)
    assert info.outcomes is not None and info.outcomes.key == keys.outcomes
    assert info.outcomes.length == 5 and [g.name for g in info.outcomes.groups] == ["publisher"]
    text = format_info(info)
    assert f"stream {keys.events}: 10 entries" in text
    assert f"stream {keys.outcomes}: 5 entries" in text


async def test_a_worker_started_on_an_earlier_versions_stream_hands_its_groups_over(
    stack_factory: Any,
) -> None:
    stack: Stack = await stack_factory(start_worker=False)
    keys = stack.store.keys
    redis = stack.redis
    old = [f"old{i}" for i in range(4)]
    for group in ("publisher", "reporter"):
        await redis.xgroup_create(keys.events, group, id="0", mkstream=True)
    for eval_id in old:
        event = completed(eval_id)
        fields = {"type": event.type, "eval_id": eval_id, "worker_id": "old", "gen": "1",
                  "ts": "1", "data": ev.encode_event(event)}  # fmt: skip
        await redis.xadd(keys.events, fields)  # type: ignore[arg-type]
    for group in ("publisher", "reporter"):  # a stopped worker left two of them pending
        await redis.xreadgroup(group, "stopped", {keys.events: ">"}, count=2)
    await stack.start_worker(claim_idle_ms=300)
    await stack.enqueue_many(3)
    await stack.wait_terminal(3)
    await eventually(lambda: len(stack.messages) >= 7)

    async def retired() -> bool:
        return {
            g["name"] for g in await stack.store.info_groups()
        } == set()  # no group left on the main stream

    await eventually(retired)
    await asyncio.sleep(0.5)  # room for a second message or report
    published = Counter(payload["eval_id"] for _, payload in stack.messages)
    assert set(published.values()) == {1} and set(published) >= set(old)
    reports = Counter(
        e.event.eval_id for e in await stack.entries() if isinstance(e.event, ev.TaskReported)
    )
    assert set(reports.values()) == {1} and set(reports) >= set(old)
    groups = {g["name"]: g for g in await stack.store.info_groups(keys.outcomes)}
    assert set(groups) == {"publisher", "reporter"}
    assert groups["publisher"]["pending"] == 0 and groups["reporter"]["pending"] == 0
