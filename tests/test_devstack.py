"""Contract tests of the devstack Queue Service and simulated executor, over real HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest

from queue_worker.devstack.executor import EXECUTOR_STATE, create_executor_app
from queue_worker.devstack.queue import QUEUE_STATE, NewTask, QueueState, create_queue_app
from queue_worker.devstack.serve import Server
from tests.harness import eventually


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@pytest.fixture
async def queue() -> AsyncIterator[Server]:
    async with Server(create_queue_app()) as server:
        yield server


@pytest.fixture
async def executor() -> AsyncIterator[Server]:
    app = create_executor_app("ex-1", latency_s=0.01, seed=7)
    async with Server(app) as server:
        yield server


async def call(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = None, **kw: Any
) -> tuple[int, Any]:
    async with http.request(method, url, json=body, **kw) as resp:
        return resp.status, await resp.json()


async def enqueue(http: aiohttp.ClientSession, queue: Server, eval_id: str, **fields: Any) -> None:
    body = {"eval_id": eval_id, "code": f"print({eval_id!r})", **fields}
    assert await call(http, "POST", f"{queue.url}/tasks", body) == (
        200,
        {"eval_id": eval_id, "status": "queued"},
    )


# --- Queue Service ----------------------------------------------------------------------------


async def test_queue_health_and_empty_next(http: aiohttp.ClientSession, queue: Server) -> None:
    assert await call(http, "GET", f"{queue.url}/health") == (200, {"status": "healthy"})
    assert await call(http, "GET", f"{queue.url}/tasks/next") == (200, None)


async def test_enqueue_pull_complete_then_404(http: aiohttp.ClientSession, queue: Server) -> None:
    await enqueue(http, queue, "e1")
    assert await call(http, "POST", f"{queue.url}/tasks", {"eval_id": "e1", "code": ""}) == (
        409,
        {"detail": "Task e1 already exists"},
    )
    assert await call(http, "GET", f"{queue.url}/tasks/next") == (
        200,
        {"eval_id": "e1", "code": "print('e1')", "language": "python", "engine": "docker",
         "timeout": 30, "priority": 0},
    )  # fmt: skip
    assert (await call(http, "GET", f"{queue.url}/tasks/e1"))[1]["status"] == "running"
    output = {"stdout": "e1\n", "exit_code": 0}
    done = await call(http, "POST", f"{queue.url}/tasks/e1/complete", {"output": output})
    assert done == (200, {"status": "completed"})
    again = await call(http, "POST", f"{queue.url}/tasks/e1/complete", {"output": output})
    assert again == (404, {"detail": "Task not found"})
    assert await call(http, "GET", f"{queue.url}/tasks/e1") == (
        200,
        {"eval_id": "e1", "status": "completed", "output": output, "error": None,
         "complete_calls": 2, "fail_calls": 0, "pulls": 1,
         "report_traceparents": [None, None]},  # no traceparent header on these reports
    )  # fmt: skip
    assert await call(http, "GET", f"{queue.url}/stats") == (
        200,
        {"queued": 0, "running": 0, "completed": 1, "failed": 0, "total": 1,
         "duplicate_reports": 1, "lease_expiries": 0},
    )  # fmt: skip
    assert queue.app[QUEUE_STATE].tasks["e1"].output == output


async def test_complete_unknown_or_queued_is_404(
    http: aiohttp.ClientSession, queue: Server
) -> None:
    await enqueue(http, queue, "q1")
    for eval_id in ("nope", "q1"):
        url = f"{queue.url}/tasks/{eval_id}/complete"
        assert await call(http, "POST", url, {"output": 1}) == (404, {"detail": "Task not found"})
    assert (await call(http, "GET", f"{queue.url}/tasks/nope"))[0] == 404


async def test_fail_running_queued_and_unknown(http: aiohttp.ClientSession, queue: Server) -> None:
    await enqueue(http, queue, "run")
    await enqueue(http, queue, "wait")
    assert (await call(http, "GET", f"{queue.url}/tasks/next"))[1]["eval_id"] == "run"
    for eval_id in ("run", "wait"):
        fail = await call(http, "POST", f"{queue.url}/tasks/{eval_id}/fail", {"error": "boom"})
        assert fail == (200, {"status": "failed"})
    for eval_id in ("run", "ghost"):
        fail = await call(http, "POST", f"{queue.url}/tasks/{eval_id}/fail", {"error": "again"})
        assert fail == (200, {"status": "not_found"})
    record = (await call(http, "GET", f"{queue.url}/tasks/run"))[1]
    assert (record["status"], record["error"], record["fail_calls"]) == ("failed", "boom", 2)
    assert await call(http, "GET", f"{queue.url}/tasks/next") == (200, None)  # "wait" is gone
    stats = (await call(http, "GET", f"{queue.url}/stats"))[1]
    assert (stats["failed"], stats["total"]) == (2, 2)


async def test_priority_then_fifo(http: aiohttp.ClientSession, queue: Server) -> None:
    for eval_id, priority in [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", -1), ("f", 9)]:
        await enqueue(http, queue, eval_id, priority=priority)
    order = [(await call(http, "GET", f"{queue.url}/tasks/next"))[1]["eval_id"] for _ in range(6)]
    assert order == ["f", "b", "d", "a", "c", "e"]
    assert await call(http, "GET", f"{queue.url}/tasks/next") == (200, None)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"code": "x"}',
        b'{"eval_id": "", "code": "x"}',
        b'{"eval_id": "x", "code": "x", "timeout": 0}',
        b'{"eval_id": "x", "code": "x", "priority": "high"}',
    ],
)
async def test_enqueue_rejects_bad_body(
    http: aiohttp.ClientSession, queue: Server, body: bytes
) -> None:
    async with http.post(f"{queue.url}/tasks", data=body) as resp:
        assert resp.status == 400
        assert "detail" in await resp.json()
    assert queue.app[QUEUE_STATE].tasks == {}


async def test_api_key(http: aiohttp.ClientSession) -> None:
    async with Server(create_queue_app(api_key="s3cret")) as queue:
        denied = (401, {"detail": "Invalid API key"})
        for headers in ({}, {"X-API-Key": "wrong"}):
            assert await call(http, "GET", f"{queue.url}/tasks/next", headers=headers) == denied
            url = f"{queue.url}/tasks/x/fail"
            assert await call(http, "POST", url, {"error": "e"}, headers=headers) == denied
        assert await call(http, "GET", f"{queue.url}/health") == (200, {"status": "healthy"})
        ok = {"X-API-Key": "s3cret"}
        assert await call(http, "GET", f"{queue.url}/tasks/next", headers=ok) == (200, None)


async def test_inject_raw_bodies_first(http: aiohttp.ClientSession, queue: Server) -> None:
    await enqueue(http, queue, "real")
    for raw in (b"not json{{", b'{"eval_id": 42}'):
        async with http.post(f"{queue.url}/_inject", data=raw) as resp:
            assert resp.status == 200
    for raw in (b"not json{{", b'{"eval_id": 42}'):
        async with http.get(f"{queue.url}/tasks/next") as resp:
            assert resp.status == 200
            assert resp.content_type == "application/json"
            assert await resp.read() == raw
    assert (await call(http, "GET", f"{queue.url}/tasks/next"))[1]["eval_id"] == "real"


# --- Simulated executor -----------------------------------------------------------------------


async def execute(
    http: aiohttp.ClientSession, executor: Server, eval_id: str, code: str = "print(1)", **kw: Any
) -> tuple[int, Any]:
    body = {"eval_id": eval_id, "code": code, "timeout": 5}
    return await call(http, "POST", f"{executor.url}/execute", body, **kw)


async def test_execute_completed_failed_timeout(
    http: aiohttp.ClientSession, executor: Server
) -> None:
    assert await execute(http, executor, "ok") == (
        200,
        {"eval_id": "ok", "status": "completed", "output": "simulated output for ok\n",
         "error": None, "exit_code": 0, "executor_id": "ex-1"},
    )  # fmt: skip
    assert await execute(http, executor, "bad", "raise SystemExit  # SIMULATE_FAIL") == (
        200,
        {"eval_id": "bad", "status": "failed", "output": "", "error": "simulated failure",
         "exit_code": 1, "executor_id": "ex-1"},
    )  # fmt: skip
    status, body = await execute(http, executor, "slow", "SIMULATE_TIMEOUT")
    assert (status, body["status"], body["exit_code"]) == (200, "timeout", -1)
    assert body["error"] == "execution timed out"
    await execute(http, executor, "ok")
    assert await call(http, "GET", f"{executor.url}/stats") == (
        200,
        {"executor_id": "ex-1", "executed": 4, "in_flight": 0, "max_in_flight": 1,
         "rejected_busy": 0, "throttled": 0, "eval_ids": {"ok": 2, "bad": 1, "slow": 1},
         "idempotency_keys": {"": 4}, "authorizations": {"": 4},
         "traceparents": {"ok": [None, None], "bad": [None], "slow": [None]},
         "health_checks": 0, "cancelled": 0},
    )  # fmt: skip
    await execute(http, executor, "ok", headers={"Idempotency-Key": "ok:2"})
    assert (await call(http, "GET", f"{executor.url}/stats"))[1]["idempotency_keys"] == {
        "": 4, "ok:2": 1,
    }  # fmt: skip


async def test_execute_never_runs_code(
    http: aiohttp.ClientSession, executor: Server, tmp_path: Any
) -> None:
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('x')"
    assert (await execute(http, executor, "evil", code))[1]["status"] == "completed"
    assert not marker.exists()


async def test_failure_rate_is_seeded(http: aiohttp.ClientSession) -> None:
    async def statuses(seed: int) -> list[str]:
        app = create_executor_app("ex", latency_s=0, failure_rate=0.5, seed=seed)
        async with Server(app) as ex:
            return [(await execute(http, ex, f"t{i}"))[1]["status"] for i in range(20)]

    first = await statuses(3)
    assert first == await statuses(3)
    assert {"completed", "failed"} == set(first)


async def test_execute_bad_body(http: aiohttp.ClientSession, executor: Server) -> None:
    for raw in (b"{nope", b'{"code": "x"}'):
        async with http.post(f"{executor.url}/execute", data=raw) as resp:
            assert resp.status == 400
            assert "detail" in await resp.json()


async def test_execute_modes(http: aiohttp.ClientSession, executor: Server) -> None:
    control = f"{executor.url}/_control"
    await call(http, "POST", control, {"execute": "error500"})
    async with http.post(f"{executor.url}/execute", json={"eval_id": "a", "code": ""}) as resp:
        assert resp.status == 500
    await call(http, "POST", control, {"execute": "garbage"})
    async with http.post(f"{executor.url}/execute", json={"eval_id": "b", "code": ""}) as resp:
        assert (resp.status, await resp.read()) == (200, b"not json{{")
    await call(http, "POST", control, {"execute": "bad_status"})
    assert (await execute(http, executor, "c"))[1]["status"] == "exploded"
    await call(http, "POST", control, {"execute": "hang"})
    with pytest.raises(asyncio.TimeoutError):
        await execute(http, executor, "d", timeout=aiohttp.ClientTimeout(total=0.2))
    await call(http, "POST", control, {"execute": "normal"})
    assert (await execute(http, executor, "e"))[1]["status"] == "completed"


async def test_hostile_modes(http: aiohttp.ClientSession, executor: Server) -> None:
    control, url = f"{executor.url}/_control", f"{executor.url}/execute"
    await call(http, "POST", control, {"execute": "nested", "health": "nested"})
    for method, path, status in (("POST", "/execute", "completed"), ("GET", "/health", "healthy")):
        body_in = {"eval_id": "n", "code": ""}
        async with http.request(method, executor.url + path, json=body_in) as r:
            body = await r.read()
        assert r.status == 200
        assert body == b'{"status": "%s", "detail": ' % status.encode() + b"[" * 50_000
    await call(http, "POST", control, {"execute": "endless", "health": "healthy"})
    async with http.post(url, json={"eval_id": "e", "code": ""}) as resp:
        assert "Content-Length" not in resp.headers
        read = 0
        async for chunk in resp.content.iter_any():
            read += len(chunk)
            if read > 4 << 20:
                break
    assert read > 4 << 20
    await eventually(lambda: executor.app[EXECUTOR_STATE].in_flight == 0, 10)  # it noticed
    await call(http, "POST", control, {"execute": "normal"})
    code = "SIMULATE_OUTPUT_BYTES=3000001"  # over 1 MiB: streamed, never held whole
    async with http.post(url, json={"eval_id": "s", "code": code}) as resp:
        assert resp.headers["Transfer-Encoding"] == "chunked"
        assert "Content-Length" not in resp.headers
        result = msgspec.json.decode(await resp.read())
    assert result["status"] == "completed" and result["output"] == "x" * 3_000_001
    assert (result["eval_id"], result["executor_id"], result["exit_code"]) == ("s", "ex-1", 0)


async def test_capacity_busy(http: aiohttp.ClientSession) -> None:
    async with Server(create_executor_app("ex", latency_s=0.3, capacity=2)) as ex:
        results = await asyncio.gather(*(execute(http, ex, f"t{i}") for i in range(3)))
        statuses = sorted(status for status, _ in results)
        assert statuses == [200, 200, 503]
        assert (503, {"detail": "executor busy"}) in results
        stats = (await call(http, "GET", f"{ex.url}/stats"))[1]
        assert (stats["executed"], stats["max_in_flight"], stats["rejected_busy"]) == (2, 2, 1)


async def test_health_modes(http: aiohttp.ClientSession, executor: Server) -> None:
    health, control = f"{executor.url}/health", f"{executor.url}/_control"
    assert await call(http, "GET", health) == (
        200,
        {"status": "healthy", "executor_id": "ex-1", "in_flight": 0, "capacity": None},
    )
    await call(http, "POST", control, {"health": "unhealthy"})
    assert await call(http, "GET", health) == (503, {"status": "unhealthy"})
    await call(http, "POST", control, {"health": "flap"})
    assert [(await call(http, "GET", health))[0] for _ in range(4)] == [200, 503, 200, 503]
    await call(http, "POST", control, {"health": "hang"})
    with pytest.raises(asyncio.TimeoutError):
        await call(http, "GET", health, timeout=aiohttp.ClientTimeout(total=0.2))
    assert executor.app[EXECUTOR_STATE].health_checks == 7


async def test_control(http: aiohttp.ClientSession, executor: Server) -> None:
    control = f"{executor.url}/_control"
    assert await call(http, "POST", control, {"latency_s": 0, "capacity": 3}) == (
        200,
        {"executor_id": "ex-1", "latency_s": 0.0, "failure_rate": 0.0, "capacity": 3,
         "health": "healthy", "execute": "normal", "retry_after": None, "cancel": True},
    )  # fmt: skip
    for bad in (
        {"health": "sleepy"},
        {"execute": "explode"},
        {"failure_rate": 2},
        {"latency_s": -1},
        {"capacity": "many"},
        {"latncy_s": 1},
        {"retry_after": 5},
        {"cancel": 1},
        {"retry_after": "1\r\nX-Injected: 1"},
        [1],
    ):
        status, body = await call(http, "POST", control, bad)
        assert status == 400, bad
        assert "detail" in body
    assert executor.app[EXECUTOR_STATE].capacity == 3  # unchanged by rejected requests


async def test_cancel_aborts_a_run(http: aiohttp.ClientSession, executor: Server) -> None:
    control = f"{executor.url}/_control"
    await call(http, "POST", control, {"latency_s": 30})
    run = asyncio.create_task(execute(http, executor, "long"))
    state = executor.app[EXECUTOR_STATE]
    await eventually(lambda: "long" in state.runs)
    cancel = f"{executor.url}/execute/long/cancel"
    assert await call(http, "POST", cancel) == (202, {"eval_id": "long", "status": "cancelling"})
    status, body = await run  # answered at once, not after 30 s
    assert status == 200 and (body["status"], body["error"]) == ("failed", "cancelled")
    assert state.cancelled == 1 and state.in_flight == 0 and not state.runs
    assert (await call(http, "POST", cancel))[0] == 404  # nothing of it runs now
    await call(http, "POST", control, {"cancel": False, "latency_s": 0.5})
    run = asyncio.create_task(execute(http, executor, "long"))
    await eventually(lambda: "long" in state.runs)
    assert (await call(http, "POST", cancel))[0] == 404  # not offered: it runs to its end
    status, body = await run
    assert status == 200 and body["status"] == "completed"


def test_create_executor_app_validates() -> None:
    with pytest.raises(ValueError, match="health must be one of"):
        create_executor_app("x", health="sleepy")
    with pytest.raises(ValueError, match="execute must be one of"):
        create_executor_app("x", execute="boom")
    with pytest.raises(ValueError, match="failure_rate"):
        create_executor_app("x", failure_rate=1.5)


# --- Server -----------------------------------------------------------------------------------


async def test_server_restarts_on_same_port(http: aiohttp.ClientSession) -> None:
    server = Server(create_queue_app())
    await server.start()
    try:
        await enqueue(http, server, "kept")
        await server.stop()
        with pytest.raises(aiohttp.ClientConnectionError):
            await call(http, "GET", f"{server.url}/health")
        await server.start()
        assert await call(http, "GET", f"{server.url}/health") == (200, {"status": "healthy"})
        assert (await call(http, "GET", f"{server.url}/tasks/next"))[1]["eval_id"] == "kept"
    finally:
        await server.stop()


async def test_stop_does_not_wait_for_hung_handlers(http: aiohttp.ClientSession) -> None:
    server = await Server(create_executor_app("ex", health="hang", execute="hang")).start()
    pending = [
        asyncio.ensure_future(call(http, "GET", f"{server.url}/health")),
        asyncio.ensure_future(execute(http, server, "h")),
    ]
    await asyncio.sleep(0.2)
    await asyncio.wait_for(server.stop(), timeout=5)
    for result in await asyncio.gather(*pending, return_exceptions=True):
        assert isinstance(result, aiohttp.ClientError)


async def test_lease_expires_renews_and_returns_the_task(
    http: aiohttp.ClientSession, queue: Server
) -> None:
    await enqueue(http, queue, "leased")
    status, task = await call(http, "GET", f"{queue.url}/tasks/next?lease_s=0.3")
    assert status == 200 and task["lease_s"] == 0.3
    assert (await call(http, "POST", f"{queue.url}/tasks/leased/renew?lease_s=0.3"))[0] == 200
    await asyncio.sleep(0.2)
    assert (await call(http, "GET", f"{queue.url}/tasks/next"))[1] is None  # still leased
    await asyncio.sleep(0.25)  # the renewal at ~0 s moved the deadline to ~0.3 s: now past it
    status, again = await call(http, "GET", f"{queue.url}/tasks/next")
    assert again["eval_id"] == "leased" and "lease_s" not in again
    assert queue.app[QUEUE_STATE].stats()["lease_expiries"] == 1
    assert queue.app[QUEUE_STATE].tasks["leased"].pulls == 2
    status, _ = await call(http, "POST", f"{queue.url}/tasks/leased/renew")
    assert status == 404  # the second pull took no lease
    assert (await call(http, "GET", f"{queue.url}/tasks/next?lease_s=-1"))[0] == 400
    assert (await call(http, "GET", f"{queue.url}/tasks/next?lease_s=x"))[0] == 400


async def test_a_lease_dropped_on_demand_is_404_on_renewal_and_a_late_result_counts(
    http: aiohttp.ClientSession, queue: Server
) -> None:
    await enqueue(http, queue, "dropped")
    assert (await call(http, "GET", f"{queue.url}/tasks/next?lease_s=30"))[1]["eval_id"]
    assert (await call(http, "POST", f"{queue.url}/_expire/dropped"))[0] == 200
    assert (await call(http, "POST", f"{queue.url}/_expire/dropped"))[0] == 404  # none left
    assert (await call(http, "POST", f"{queue.url}/tasks/dropped/renew"))[0] == 404
    record = queue.app[QUEUE_STATE].tasks["dropped"]
    assert record.status == "queued" and record.pulls == 1
    # The run it was leased to still reports: a queued task that was handed out takes it.
    ok = await call(http, "POST", f"{queue.url}/tasks/dropped/complete", {"output": {"x": 1}})
    assert ok == (200, {"status": "completed"})
    assert (await call(http, "GET", f"{queue.url}/tasks/next"))[1] is None


async def test_leases_expire_by_deadline_and_a_renewal_outlives_the_old_one() -> None:
    state = QueueState()
    for name in ("short", "renewed", "reported", "plain"):
        state.enqueue(NewTask(eval_id=name, code="x"))
    leased = [state.pull(0.05) for _ in range(3)]
    assert [t.eval_id for t in leased if t] == ["short", "renewed", "reported"]
    assert state.pull() is not None  # "plain": no lease, never expires
    assert state.renew("renewed", 30.0)
    assert state.complete("reported", {"ok": True})
    await asyncio.sleep(0.1)
    state.expire_leases()
    statuses = {name: t.status for name, t in state.tasks.items()}
    assert statuses == {
        "short": "queued", "renewed": "running", "reported": "completed", "plain": "running",
    }  # fmt: skip
    assert state.lease_expiries == 1
    again = state.pull()
    assert again is not None and again.eval_id == "short" and again.pulls == 2
    assert state.pull() is None
    assert state.renew("renewed", 0.05)  # a renewal's own deadline expires too
    await asyncio.sleep(0.1)
    state.expire_leases()
    assert state.tasks["renewed"].status == "queued" and state.lease_expiries == 2
