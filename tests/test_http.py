"""The worker's own API: /health, /status, and errors that are JSON."""

from __future__ import annotations

import asyncio

import aiohttp
import msgspec
from aiohttp import web

from queue_worker.http.serve import JsonErrorHandler
from queue_worker.streams.views import fold
from tests.harness import Stack, eventually


async def test_health_when_all_is_well(stack_factory) -> None:
    stack: Stack = await stack_factory()
    await eventually(lambda: _all_healthy(stack))
    status, body = await stack.get_json("/health")
    assert status == 200
    assert body["status"] == "healthy" and body["redis"] is True
    assert body["executors_healthy"] == body["executors_total"] == 3
    assert body["loops_dead"] == [] and body["worker_id"] == "test-worker"


async def _all_healthy(stack: Stack) -> bool:
    _, body = await stack.get_json("/health")
    return bool(body["executors_healthy"] == 3)


async def test_degraded_but_serving_when_one_executor_is_down(stack_factory) -> None:
    stack: Stack = await stack_factory(executor_options=[{}, {"health": "unhealthy"}])
    await stack.wait_event("executor.health_changed", healthy=False)
    status, body = await stack.get_json("/health")
    assert (status, body["status"], body["executors_healthy"]) == (200, "degraded", 1)
    bad = [x for x in body["executors"] if not x["healthy"]]
    assert bad[0]["reason"] == "health answered HTTP 503"


async def test_status_shows_the_run_and_equals_a_fresh_replay(stack_factory) -> None:
    stack: Stack = await stack_factory()
    await stack.enqueue_many(20)
    await stack.enqueue("fails", code="SIMULATE_FAIL")
    await stack.wait_terminal(21)
    await stack.wait_messages(21)
    await stack.wait_event("task.reported", eval_id="fails")

    async def settled() -> dict | None:  # type: ignore[type-arg]
        # Quiet: every report folded, and the publisher has acknowledged what it read
        # (an entry is pending between its delivery and the acknowledging script) and
        # counted what it published (just after the script's answer).
        _, body = await stack.get_json("/status")
        publisher = next(p for p in body["stream"]["projectors"] if p["name"] == "publisher")
        quiet = body["counters"]["reported"] == 21 and publisher["lag"] == 0
        quiet = quiet and body["live"]["published"] == 21
        return body if quiet and publisher["pending"] == 0 else None

    body = await eventually(settled)
    replay = fold(await stack.entries())
    assert body["counters"] == msgspec.to_builtins(replay.workers["test-worker"].counters)
    assert body["counters"]["pulled"] == 21 and body["counters"]["failed"] == 1
    for x in body["executors"]:
        folded = replay.executors[x["url"]]
        assert (x["routed"], x["completed"], x["failed"]) == (
            folded.routed, folded.completed, folded.failed,
        )  # fmt: skip
        assert x["healthy"] is True and x["latency_ms"] is not None and x["capacity"] == 2
    assert sum(x["routed"] for x in body["executors"]) == 21
    assert body["routed_last_minute"] == 21
    assert body["stream"]["length"] == replay.events
    assert body["stream"]["key"] == f"{{{stack.prefix}}}:events"
    projectors = {p["name"]: p for p in body["stream"]["projectors"]}
    assert set(projectors) == {"status", "publisher", "reporter"}
    assert projectors["publisher"]["pending"] == 0
    assert body["live"]["published"] == 21 and body["live"]["polls"] >= 21
    assert body["live"]["append_round_trips"] <= body["live"]["events_appended"]


async def test_counters_survive_a_restart(stack_factory) -> None:
    stack: Stack = await stack_factory()
    await stack.enqueue_many(5)
    await stack.wait_terminal(5)
    await stack.wait_event("task.reported", eval_id="t-00004")
    await stack.stop_worker()
    stopped = await stack.wait_event("worker.stopped")
    assert stopped.event.in_flight == 0  # type: ignore[union-attr]
    await stack.start_worker()
    _, body = await stack.get_json("/status")
    assert body["counters"]["completed"] == 5 and body["counters"]["pulled"] == 5


async def test_bad_requests_get_json_errors(stack_factory) -> None:
    stack: Stack = await stack_factory()
    assert stack.worker is not None
    for method, path, expected in [
        ("GET", "/nope", 404),
        ("POST", "/status", 405),
        ("DELETE", "/health", 405),
        ("GET", "/status/extra", 404),
    ]:
        async with stack.http.request(method, f"{stack.worker.url}{path}") as resp:
            assert resp.status == expected
            assert resp.content_type == "application/json"
            body = msgspec.json.decode(await resp.read())
            assert body["status"] == expected and body["error"]


async def test_no_secret_in_status_or_health(stack_factory) -> None:
    stack: Stack = await stack_factory(api_key="TOPSECRET-42")
    await stack.enqueue("x")
    await stack.wait_terminal(1)
    for path in ("/status", "/health"):
        assert stack.worker is not None
        async with stack.http.get(f"{stack.worker.url}{path}") as resp:
            assert "TOPSECRET-42" not in await resp.text()


async def test_status_shows_the_fleet_and_liveness(stack_factory) -> None:
    stack: Stack = await stack_factory()
    await stack.enqueue("one")
    await stack.wait_event("task.reported", eval_id="one")
    # A worker that ran before and is gone: in the stream, without a liveness key.
    from queue_worker.streams import events as ev
    from queue_worker.streams.keys import Keys
    from queue_worker.streams.store import EventStore

    gone = EventStore(stack.redis, Keys(stack.prefix), "gone-worker")
    await gone.append(ev.WorkerStarted(version="0", executors=[], strategy="x", capacity=1))

    async def fleet() -> dict[str, dict] | None:  # type: ignore[type-arg]
        _, body = await stack.get_json("/status")
        members = {m["worker_id"]: m for m in body["fleet"]}
        return members if "gone-worker" in members else None

    members = await eventually(fleet)
    me = members["test-worker"]
    assert me["alive"] and me["running"] and me["counters"]["completed"] == 1
    assert me["in_flight"] == 0
    assert members["gone-worker"]["alive"] is False and members["gone-worker"]["running"]
    key = Keys(stack.prefix).alive("test-worker")
    assert await stack.redis.pttl(key) > 0  # refreshed, with a TTL
    await stack.stop_worker()
    assert await stack.redis.exists(key) == 0  # a clean stop removes it


async def test_every_get_route_answers_head(stack_factory) -> None:
    """HEAD: the status and headers of a GET, and no body (RFC 9110)."""
    stack: Stack = await stack_factory()
    assert stack.worker is not None
    await eventually(lambda: _all_healthy(stack))  # /health: 200 for both requests
    paths = {
        route.resource.canonical.replace("{name}", "favicon-16x16.png")
        for route in stack.worker.app.router.routes()
        if route.method == "GET" and route.resource is not None
    }
    assert {
        "/health",
        "/status",
        "/metrics",
        "/events/stream",
        "/docs/static/favicon-16x16.png",
    } <= paths
    for path in sorted(paths - {"/events/stream"}):
        url = stack.worker.url + path
        async with stack.http.get(url, allow_redirects=False) as get:
            await get.read()
        async with stack.http.head(url, allow_redirects=False) as head:
            assert head.status == get.status, path
            assert head.headers.get("Content-Type") == get.headers.get("Content-Type"), path
            assert await head.read() == b""

    # The endless stream: its headers at once, then the end of the response (raw, so a body
    # sent anyway would show). A bad query is the 400 a GET gets.
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.worker.port)
    writer.write(b"HEAD /events/stream HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)  # to the end: the server closes
    writer.close()
    headers, _, body = answer.partition(b"\r\n\r\n")
    assert headers.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in headers
    assert body == b""
    async with stack.http.head(stack.worker.url + "/events/stream?last=many") as resp:
        assert (resp.status, resp.content_type) == (400, "application/json")

    # Other methods: 405, naming both in Allow.
    async with stack.http.post(stack.worker.url + "/health") as resp:
        assert resp.status == 405 and resp.content_type == "application/json"
        assert set(resp.headers["Allow"].split(",")) == {"GET", "HEAD"}


async def test_a_crash_in_a_handler_is_a_json_500() -> None:
    """What the middlewares let through (a bug) is answered in JSON by the connection handler."""

    async def crash(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    app = web.Application()
    app.router.add_get("/crash", crash)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    server = runner.server
    assert server is not None
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: JsonErrorHandler(server, loop=loop), "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        url = f"http://127.0.0.1:{port}/crash"
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            assert (resp.status, resp.content_type) == (500, "application/json")
            body = msgspec.json.decode(await resp.read())
        assert body == {"error": "Internal Server Error", "status": 500, "detail": None}
    finally:
        listener.close()
        await runner.cleanup()
