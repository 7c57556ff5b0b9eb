"""Simulated Executor Service: answers like a code executor but never runs the submitted code.

The code may carry directives for tests and demos: ``SIMULATE_FAIL`` (status failed),
``SIMULATE_TIMEOUT`` (status timeout) and ``SIMULATE_OUTPUT_BYTES=N`` (an output of N bytes;
above 1 MiB the answer is streamed in 64 KiB chunks without a ``Content-Length`` and never
held in memory, so N may be 500 MB).

Hostile answers for tests and benchmarks: execute mode ``nested`` answers
``{"status": "completed", "detail": [[[...`` with 50 KB of ``[`` (nested deeper than any
decoder's recursion limit, in a field a typed decoder does not know), ``endless`` streams a
result whose ``output`` never ends (until the client hangs up); health mode ``nested``
answers ``/health`` the same way with ``"status": "healthy"``.

Back-pressure: execute mode ``throttle`` answers every ``/execute`` with 429, and a
busy executor (at its ``capacity``) with 503; both carry ``Retry-After: <retry_after>``
when that setting is a string (seconds or an HTTP date, sent as given).

Cancel: ``POST /execute/{eval_id}/cancel`` aborts the simulated runs of ``eval_id``
(their ``POST /execute`` answers at once ``status: failed``, ``error: cancelled``) and
answers 202, or 404 when none runs. With the setting ``cancel`` false it answers every
cancel 404, like an executor that does not offer the extension.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Final

import msgspec
from aiohttp import web

from queue_worker.devstack.modes import EXECUTE_MODES, HEALTH_MODES

HANG_S: Final = 3600.0
STREAM_ABOVE_BYTES: Final = 1 << 20  # a larger SIMULATE_OUTPUT_BYTES output is streamed
CHUNK_BYTES: Final = 64 << 10
DEPTH: Final = 50_000  # 50 KB of "[": far deeper than any decoder's recursion limit

_Positive = msgspec.Meta(gt=0)


class ExecuteBody(msgspec.Struct):
    """Body of ``POST /execute``."""

    eval_id: Annotated[str, msgspec.Meta(min_length=1)]
    code: str
    timeout: Annotated[int, _Positive] | Annotated[float, _Positive] = 30


def _number(value: Any, low: float, high: float | None) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return low <= value and (high is None or value <= high)


_CHECKS: Final[dict[str, tuple[Callable[[Any], bool], str]]] = {
    "latency_s": (lambda v: _number(v, 0.0, None), "a number >= 0"),
    "failure_rate": (lambda v: _number(v, 0.0, 1.0), "a number in [0, 1]"),
    "capacity": (
        lambda v: v is None or (type(v) is int and v >= 0),
        "an integer >= 0 or null",
    ),
    "health": (lambda v: v in HEALTH_MODES, f"one of {', '.join(HEALTH_MODES)}"),
    "execute": (lambda v: v in EXECUTE_MODES, f"one of {', '.join(EXECUTE_MODES)}"),
    "retry_after": (
        lambda v: v is None or (isinstance(v, str) and 0 < len(v) <= 64 and v.isprintable()),
        "a short string or null",
    ),
    "cancel": (lambda v: isinstance(v, bool), "true or false"),
}


def _check(name: str, value: Any) -> Any:
    """``value`` if it is valid for setting ``name``, else ``ValueError``."""
    if name not in _CHECKS:
        raise ValueError(f"unknown setting {name!r}")
    valid, expected = _CHECKS[name]
    if not valid(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return float(value) if name in ("latency_s", "failure_rate") else value


class ExecutorState:
    """Settings and counters of one simulated executor."""

    def __init__(
        self,
        executor_id: str,
        *,
        latency_s: float,
        failure_rate: float,
        capacity: int | None,
        health: str,
        execute: str,
        seed: int | None,
    ) -> None:
        self.executor_id = executor_id
        self.latency_s: float = _check("latency_s", latency_s)
        self.failure_rate: float = _check("failure_rate", failure_rate)
        self.capacity: int | None = _check("capacity", capacity)
        self.health: str = _check("health", health)
        self.execute: str = _check("execute", execute)
        self.rng = random.Random(seed)
        self.executed = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.rejected_busy = 0
        self.throttled = 0  # 429 answers (execute mode throttle)
        self.retry_after: str | None = None  # the Retry-After of 429/503 answers
        self.eval_ids: Counter[str] = Counter()
        self.idempotency_keys: Counter[str] = Counter()  # Idempotency-Key headers received
        self.authorizations: Counter[str] = Counter()  # Authorization headers received
        # eval_id -> the traceparent header of each POST /execute for it (first 16)
        self.traceparents: dict[str, list[str | None]] = {}
        self.health_checks = 0
        self.flap_healthy = False  # flipped before each answer: the first flap answer is healthy
        self.hanging: set[asyncio.Task[Any]] = set()
        self.cancel = True  # POST /execute/{eval_id}/cancel is offered
        self.runs: dict[str, set[asyncio.Task[Any]]] = {}  # eval_id -> the requests running it
        self.aborted: set[asyncio.Task[Any]] = set()  # runs a cancel is aborting
        self.cancelled = 0  # runs aborted by a cancel

    def configure(self, changes: Mapping[str, Any]) -> None:
        """Apply setting changes, all or none; ``ValueError`` names the first bad one."""
        checked = {name: _check(name, value) for name, value in changes.items()}
        for name, value in checked.items():
            setattr(self, name, value)
        if "health" in checked:
            self.flap_healthy = False

    def settings(self) -> dict[str, Any]:
        """The current behaviour settings."""
        return {
            "executor_id": self.executor_id,
            "latency_s": self.latency_s,
            "failure_rate": self.failure_rate,
            "capacity": self.capacity,
            "health": self.health,
            "execute": self.execute,
            "retry_after": self.retry_after,
            "cancel": self.cancel,
        }

    def stats(self) -> dict[str, Any]:
        """Counters for tests and benchmarks."""
        return {
            "executor_id": self.executor_id,
            "executed": self.executed,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "rejected_busy": self.rejected_busy,
            "throttled": self.throttled,
            "eval_ids": dict(self.eval_ids),
            "idempotency_keys": dict(self.idempotency_keys),
            "authorizations": dict(self.authorizations),
            "traceparents": self.traceparents,
            "health_checks": self.health_checks,
            "cancelled": self.cancelled,
        }

    async def hang(self) -> None:
        """Never answer: sleep until cancelled (the app cancels hangs on shutdown)."""
        task = asyncio.current_task()
        assert task is not None
        self.hanging.add(task)
        try:
            await asyncio.sleep(HANG_S)
        finally:
            self.hanging.discard(task)


EXECUTOR_STATE = web.AppKey("executor_state", ExecutorState)


def _nested(status: str) -> web.Response:
    body = b'{"status": "%s", "detail": ' % status.encode() + b"[" * DEPTH
    return web.Response(body=body, content_type="application/json")


def _json(obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(obj),
        status=status,
        content_type="application/json",
        headers=headers,
    )


async def _health(request: web.Request) -> web.Response:
    state = request.app[EXECUTOR_STATE]
    state.health_checks += 1
    mode = state.health
    if mode == "hang":
        await state.hang()
    if mode == "flap":
        state.flap_healthy = not state.flap_healthy
        mode = "healthy" if state.flap_healthy else "unhealthy"
    if mode == "unhealthy":
        return _json({"status": "unhealthy"}, 503)
    if mode == "nested":
        return _nested("healthy")
    return _json(
        {
            "status": "healthy",
            "executor_id": state.executor_id,
            "in_flight": state.in_flight,
            "capacity": state.capacity,
        }
    )


def _output_bytes(code: str) -> int | None:
    size = re.search(r"SIMULATE_OUTPUT_BYTES=(\d+)", code)
    return None if size is None else int(size.group(1))


def _result(state: ExecutorState, body: ExecuteBody, failed: bool) -> dict[str, Any]:
    result: dict[str, Any] = {
        "eval_id": body.eval_id,
        "status": "completed",
        "output": f"simulated output for {body.eval_id}\n",
        "error": None,
        "exit_code": 0,
        "executor_id": state.executor_id,
    }
    size = _output_bytes(body.code)
    if size is not None:
        result["output"] = "x" * min(size, STREAM_ABOVE_BYTES)
    if "SIMULATE_TIMEOUT" in body.code:
        result.update(status="timeout", output="", error="execution timed out", exit_code=-1)
    elif failed:
        result.update(status="failed", output="", error="simulated failure", exit_code=1)
    if state.execute == "bad_status":
        result["status"] = "exploded"
    return result


async def _stream(
    request: web.Request, result: dict[str, Any], output_bytes: int | None
) -> web.StreamResponse:
    """``result`` with an ``output`` of ``output_bytes`` (``None``: endless), sent in
    chunks as they are made (chunked encoding, no ``Content-Length``)."""
    head = {k: v for k, v in result.items() if k != "output"}
    encoded = msgspec.json.encode(head)
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    chunk = b"x" * CHUNK_BYTES
    try:
        await response.write(encoded[:-1] + b',"output":"')
        left = output_bytes
        while left is None or left > 0:
            piece = chunk if left is None or left >= CHUNK_BYTES else chunk[:left]
            await response.write(piece)
            if left is not None:
                left -= len(piece)
        await response.write(b'"}')
        await response.write_eof()
    except ConnectionError:  # the client stopped reading (a capped reader): done
        pass
    return response


async def _execute(request: web.Request) -> web.StreamResponse:
    state = request.app[EXECUTOR_STATE]
    try:
        body = msgspec.json.decode(await request.read(), type=ExecuteBody)
    except msgspec.DecodeError as exc:
        return _json({"detail": f"Invalid request body: {exc}"}, 400)
    seen = state.traceparents.setdefault(body.eval_id, [])
    if len(seen) < 16 and len(state.traceparents) <= 100_000:
        seen.append(request.headers.get("traceparent"))
    later = {} if state.retry_after is None else {"Retry-After": state.retry_after}
    if state.execute == "throttle":
        state.throttled += 1
        return _json({"detail": "too many requests"}, 429, later)
    if state.capacity is not None and state.in_flight >= state.capacity:
        state.rejected_busy += 1
        return _json({"detail": "executor busy"}, 503, later)
    # Draw on arrival so a seeded run gives the same outcomes in the same request order.
    failed = state.rng.random() < state.failure_rate or "SIMULATE_FAIL" in body.code
    state.in_flight += 1
    state.max_in_flight = max(state.max_in_flight, state.in_flight)
    state.executed += 1
    state.eval_ids[body.eval_id] += 1
    state.idempotency_keys[request.headers.get("Idempotency-Key", "")] += 1
    state.authorizations[request.headers.get("Authorization", "")] += 1
    me = asyncio.current_task()
    assert me is not None
    state.runs.setdefault(body.eval_id, set()).add(me)
    try:
        try:
            if state.execute == "hang":
                await state.hang()
            await asyncio.sleep(state.latency_s)
        except asyncio.CancelledError:
            if me not in state.aborted:
                raise
            me.uncancel()
            state.cancelled += 1
            aborted = _result(state, body, False)
            aborted.update(status="failed", output="", error="cancelled", exit_code=-1)
            return _json(aborted)
        if state.execute == "error500":
            return web.Response(status=500, text="simulated internal server error")
        if state.execute == "garbage":
            return web.Response(body=b"not json{{", content_type="application/json")
        if state.execute == "nested":
            return _nested("completed")
        result = _result(state, body, failed)
        if state.execute == "endless":
            return await _stream(request, result, None)
        size = _output_bytes(body.code)
        if size is not None and size > STREAM_ABOVE_BYTES and result["status"] == "completed":
            return await _stream(request, result, size)
        return _json(result)
    finally:
        state.in_flight -= 1
        state.aborted.discard(me)
        runs = state.runs.get(body.eval_id)
        if runs is not None:
            runs.discard(me)
            if not runs:
                del state.runs[body.eval_id]


async def _cancel(request: web.Request) -> web.Response:
    state = request.app[EXECUTOR_STATE]
    eval_id = request.match_info["eval_id"]
    if not state.cancel:
        return _json({"detail": "Not Found"}, 404)
    runs = state.runs.get(eval_id)
    if not runs:
        return _json({"detail": f"no run of {eval_id} here"}, 404)
    for task in runs - state.aborted:
        state.aborted.add(task)
        task.cancel()
    return _json({"eval_id": eval_id, "status": "cancelling"}, 202)


async def _stats(request: web.Request) -> web.Response:
    return _json(request.app[EXECUTOR_STATE].stats())


async def _control(request: web.Request) -> web.Response:
    state = request.app[EXECUTOR_STATE]
    try:
        state.configure(msgspec.json.decode(await request.read(), type=dict[str, Any]))
    except (msgspec.DecodeError, ValueError) as exc:
        return _json({"detail": f"Invalid control request: {exc}"}, 400)
    return _json(state.settings())


async def _cancel_hangs(app: web.Application) -> None:
    for task in list(app[EXECUTOR_STATE].hanging):
        task.cancel()


def create_executor_app(
    executor_id: str,
    *,
    latency_s: float = 0.05,
    failure_rate: float = 0.0,
    capacity: int | None = None,
    health: str = "healthy",
    execute: str = "normal",
    seed: int | None = None,
) -> web.Application:
    """A simulated executor; raises ``ValueError`` on an invalid setting or mode."""
    state = ExecutorState(
        executor_id,
        latency_s=latency_s,
        failure_rate=failure_rate,
        capacity=capacity,
        health=health,
        execute=execute,
        seed=seed,
    )
    app = web.Application()
    app[EXECUTOR_STATE] = state
    app.on_shutdown.append(_cancel_hangs)
    app.router.add_get("/health", _health)
    app.router.add_post("/execute", _execute)
    app.router.add_post("/execute/{eval_id}/cancel", _cancel)
    app.router.add_get("/stats", _stats)
    app.router.add_post("/_control", _control)
    return app
