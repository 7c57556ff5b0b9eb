"""Simulated Executor Service: answers like a code executor but never runs the submitted code.

The code may carry directives for tests and demos: ``SIMULATE_FAIL`` (status failed),
``SIMULATE_TIMEOUT`` (status timeout) and ``SIMULATE_OUTPUT_BYTES=N`` (an output of N bytes).
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

HEALTH_MODES: Final = ("healthy", "unhealthy", "hang", "flap")
EXECUTE_MODES: Final = ("normal", "error500", "garbage", "hang", "bad_status")
HANG_S: Final = 3600.0
MAX_SIMULATED_OUTPUT: Final = 16 << 20

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
        self.eval_ids: Counter[str] = Counter()
        self.health_checks = 0
        self.flap_healthy = False  # flipped before each answer: the first flap answer is healthy
        self.hanging: set[asyncio.Task[Any]] = set()

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
        }

    def stats(self) -> dict[str, Any]:
        """Counters for tests and benchmarks."""
        return {
            "executor_id": self.executor_id,
            "executed": self.executed,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "rejected_busy": self.rejected_busy,
            "eval_ids": dict(self.eval_ids),
            "health_checks": self.health_checks,
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


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(obj), status=status, content_type="application/json"
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
    return _json(
        {
            "status": "healthy",
            "executor_id": state.executor_id,
            "in_flight": state.in_flight,
            "capacity": state.capacity,
        }
    )


def _result(state: ExecutorState, body: ExecuteBody, failed: bool) -> dict[str, Any]:
    result: dict[str, Any] = {
        "eval_id": body.eval_id,
        "status": "completed",
        "output": f"simulated output for {body.eval_id}\n",
        "error": None,
        "exit_code": 0,
        "executor_id": state.executor_id,
    }
    size = re.search(r"SIMULATE_OUTPUT_BYTES=(\d+)", body.code)
    if size:
        result["output"] = "x" * min(int(size.group(1)), MAX_SIMULATED_OUTPUT)
    if "SIMULATE_TIMEOUT" in body.code:
        result.update(status="timeout", output="", error="execution timed out", exit_code=-1)
    elif failed:
        result.update(status="failed", output="", error="simulated failure", exit_code=1)
    if state.execute == "bad_status":
        result["status"] = "exploded"
    return result


async def _execute(request: web.Request) -> web.Response:
    state = request.app[EXECUTOR_STATE]
    try:
        body = msgspec.json.decode(await request.read(), type=ExecuteBody)
    except msgspec.DecodeError as exc:
        return _json({"detail": f"Invalid request body: {exc}"}, 400)
    if state.capacity is not None and state.in_flight >= state.capacity:
        state.rejected_busy += 1
        return _json({"detail": "executor busy"}, 503)
    # Draw on arrival so a seeded run gives the same outcomes in the same request order.
    failed = state.rng.random() < state.failure_rate or "SIMULATE_FAIL" in body.code
    state.in_flight += 1
    state.max_in_flight = max(state.max_in_flight, state.in_flight)
    state.executed += 1
    state.eval_ids[body.eval_id] += 1
    try:
        if state.execute == "hang":
            await state.hang()
        await asyncio.sleep(state.latency_s)
        if state.execute == "error500":
            return web.Response(status=500, text="simulated internal server error")
        if state.execute == "garbage":
            return web.Response(body=b"not json{{", content_type="application/json")
        return _json(_result(state, body, failed))
    finally:
        state.in_flight -= 1


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
    app.router.add_get("/stats", _stats)
    app.router.add_post("/_control", _control)
    return app
