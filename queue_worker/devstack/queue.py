"""Reference Queue Service: an in-memory priority queue behind the queue worker's HTTP contract.

Besides the contract it implements the two extensions the worker uses when a queue offers
them: leases (``GET /tasks/next?lease_s=N``, ``POST /tasks/{id}/renew``) and long polling
(``GET /tasks/next?wait_s=N`` waits up to N seconds for a task instead of answering ``null``).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

TaskStatus = Literal["queued", "running", "completed", "failed"]
T = TypeVar("T")

_Positive = msgspec.Meta(gt=0)
# Requests it accepts: large results (POST /complete) and oversized task bodies for tests
# (POST /_inject); aiohttp's default is 1 MiB.
CLIENT_MAX_BYTES = 64 << 20
MAX_LEASE_S = 3600.0
MAX_WAIT_S = 30.0  # the longest GET /tasks/next?wait_s= (long polling)
REPORT_HEADERS_KEPT = 16
LEASE_LOOK_S = 0.25  # a long poll looks for leases that ran out this often


class NewTask(msgspec.Struct):
    """Body of ``POST /tasks``; only ``eval_id`` and ``code`` are required."""

    eval_id: Annotated[str, msgspec.Meta(min_length=1)]
    code: str
    language: str = "python"
    engine: str = "docker"
    timeout: Annotated[int, _Positive] | Annotated[float, _Positive] = 30
    priority: int = 0
    deadline: Annotated[float, _Positive] | None = None  # unix seconds, handed out as given
    # Trace context from the gateway, handed out as given (``traceparent`` on the task, or
    # inside ``metadata``): anything, so tests can hand out hostile values too.
    traceparent: Any = None
    tracestate: Any = None
    metadata: Any = None


class CompleteBody(msgspec.Struct):
    """Body of ``POST /tasks/{eval_id}/complete``."""

    output: Any


class FailBody(msgspec.Struct):
    """Body of ``POST /tasks/{eval_id}/fail``."""

    error: str


@dataclass
class Task:
    """One task and everything the queue observed about it."""

    eval_id: str
    code: str
    language: str
    engine: str
    timeout: float
    priority: int
    status: TaskStatus = "queued"
    output: Any = None
    error: str | None = None
    complete_calls: int = 0
    fail_calls: int = 0
    pulls: int = 0
    lease_s: float | None = None
    lease_deadline: float | None = None
    deadline: float | None = None  # the task's own (unix seconds), when it was given one
    traceparent: Any = None
    tracestate: Any = None
    metadata: Any = None
    # The traceparent header of each report (complete, fail) received, in order (the
    # first REPORT_HEADERS_KEPT).
    report_traceparents: list[str | None] = field(default_factory=list)

    def payload(self) -> dict[str, Any]:
        """What ``GET /tasks/next`` hands to a worker (``lease_s`` when it holds a lease)."""
        body: dict[str, Any] = {
            "eval_id": self.eval_id,
            "code": self.code,
            "language": self.language,
            "engine": self.engine,
            "timeout": self.timeout,
            "priority": self.priority,
        }
        if self.deadline is not None:
            body["deadline"] = self.deadline
        if self.lease_s is not None:
            body["lease_s"] = self.lease_s
        for name in ("traceparent", "tracestate", "metadata"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        return body

    def record(self) -> dict[str, Any]:
        """What ``GET /tasks/{eval_id}`` shows to tests."""
        return {
            "eval_id": self.eval_id,
            "status": self.status,
            "output": self.output,
            "error": self.error,
            "complete_calls": self.complete_calls,
            "fail_calls": self.fail_calls,
            "pulls": self.pulls,
            "report_traceparents": self.report_traceparents,
        }

    def reported_with(self, traceparent: str | None) -> None:
        if len(self.report_traceparents) < REPORT_HEADERS_KEPT:
            self.report_traceparents.append(traceparent)


class QueueState:
    """In-memory queue: highest priority first, FIFO within a priority."""

    def __init__(self) -> None:
        self.tasks: dict[str, Task] = {}
        self.injected: deque[bytes] = deque()
        self.duplicate_reports = 0
        self.lease_expiries = 0
        self._heap: list[tuple[int, int, str]] = []
        self._seq = itertools.count()
        # Lease deadlines, earliest first; a renewal pushes a new one and the stale
        # entry is skipped when it comes up. Expiry stays O(log N) per pull.
        self._deadlines: list[tuple[float, str]] = []
        self._arrived = asyncio.Event()  # set (and replaced) when a task is queued
        self.long_polls = 0  # GET /tasks/next?wait_s= that waited

    def _notify(self) -> None:
        self._arrived.set()
        self._arrived = asyncio.Event()

    async def pull_waiting(
        self, lease_s: float | None, wait_s: float, gone: Callable[[], bool] = lambda: False
    ) -> Task | None:
        """:meth:`pull`, waiting up to ``wait_s`` for a task when the queue is empty (a
        lease that runs out meanwhile is noticed within a quarter second). Nothing is
        handed out once ``gone()`` says the client went away: it would be stranded."""
        deadline = time.monotonic() + wait_s
        waited = False
        while True:
            if gone():
                return None
            task = self.pull(lease_s)
            remaining = deadline - time.monotonic()
            if task is not None or remaining <= 0:
                self.long_polls += waited
                return task
            waited = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(remaining, LEASE_LOOK_S))

    def enqueue(self, new: NewTask) -> Task:
        """Queue a new task; raises ``KeyError`` if the eval_id is already known."""
        if new.eval_id in self.tasks:
            raise KeyError(new.eval_id)
        task = Task(
            new.eval_id, new.code, new.language, new.engine, new.timeout, new.priority,
            deadline=new.deadline, traceparent=new.traceparent, tracestate=new.tracestate,
            metadata=new.metadata,
        )  # fmt: skip
        self.tasks[task.eval_id] = task
        heapq.heappush(self._heap, (-task.priority, next(self._seq), task.eval_id))
        self._notify()
        return task

    def pull(self, lease_s: float | None = None) -> Task | None:
        """Mark the next queued task running and return it (``None`` when empty).

        With ``lease_s`` the task goes back to the queue unless it is completed,
        failed or renewed within that many seconds.
        """
        self.expire_leases()
        while self._heap:
            task = self.tasks[heapq.heappop(self._heap)[2]]
            if task.status == "queued":  # a queued task may have been failed meanwhile
                task.status = "running"
                task.pulls += 1
                task.lease_s = lease_s
                task.lease_deadline = None if lease_s is None else time.monotonic() + lease_s
                self._watch(task)
                return task
        return None

    def _watch(self, task: Task) -> None:
        if task.lease_deadline is not None:
            heapq.heappush(self._deadlines, (task.lease_deadline, task.eval_id))

    def expire_leases(self) -> None:
        """Put running tasks whose lease ran out back in the queue."""
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] < now:
            _, eval_id = heapq.heappop(self._deadlines)
            task = self.tasks[eval_id]
            if task.status != "running" or task.lease_deadline is None:
                continue  # reported, or pulled again without a lease
            if task.lease_deadline >= now:
                continue  # renewed since: a later entry covers it
            task.status, task.lease_s, task.lease_deadline = "queued", None, None
            self.lease_expiries += 1
            heapq.heappush(self._heap, (-task.priority, next(self._seq), task.eval_id))
            self._notify()

    def drop_lease(self, eval_id: str) -> bool:
        """Let a running task's lease run out now (for tests): it goes back to the queue,
        and its holder's next renewal answers 404. ``False`` when it holds no lease."""
        task = self.tasks.get(eval_id)
        if task is None or task.status != "running" or task.lease_deadline is None:
            return False
        task.lease_deadline = time.monotonic() - 1
        self._watch(task)
        self.expire_leases()
        return True

    def renew(self, eval_id: str, lease_s: float) -> bool:
        """Extend a running task's lease; ``False`` when it holds none (or is not running)."""
        self.expire_leases()
        task = self.tasks.get(eval_id)
        if task is None or task.status != "running" or task.lease_deadline is None:
            return False
        task.lease_s, task.lease_deadline = lease_s, time.monotonic() + lease_s
        self._watch(task)
        return True

    def complete(self, eval_id: str, output: Any) -> bool:
        """Record a result; ``False`` when the task is unknown or finished. A task whose
        lease ran out (queued again) still takes the result of the run it was leased to."""
        task = self.tasks.get(eval_id)
        if task is not None:
            task.complete_calls += 1
        handed_out = task is not None and (
            task.status == "running" or (task.status == "queued" and task.pulls > 0)
        )
        if task is None or not handed_out:
            self.duplicate_reports += 1
            return False
        task.status, task.output, task.lease_deadline = "completed", output, None
        return True

    def fail(self, eval_id: str, error: str) -> bool:
        """Record a failure of a running (or still queued) task; ``False`` otherwise."""
        task = self.tasks.get(eval_id)
        if task is not None:
            task.fail_calls += 1
        if task is None or task.status != "running":
            self.duplicate_reports += 1
        if task is None or task.status not in ("running", "queued"):
            return False
        task.status, task.error, task.lease_deadline = "failed", error, None
        return True

    def stats(self) -> dict[str, int]:
        """Counts per status plus ``total``, ``duplicate_reports`` and ``lease_expiries``."""
        self.expire_leases()
        counts = dict.fromkeys(("queued", "running", "completed", "failed"), 0)
        for task in self.tasks.values():
            counts[task.status] += 1
        return {
            **counts,
            "total": len(self.tasks),
            "duplicate_reports": self.duplicate_reports,
            "lease_expiries": self.lease_expiries,
        }


QUEUE_STATE = web.AppKey("queue_state", QueueState)
QUEUE_API_KEY = web.AppKey("queue_api_key", str)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(obj), status=status, content_type="application/json"
    )


def _error(status: int, detail: str) -> web.Response:
    return _json({"detail": detail}, status)


async def _decode(request: web.Request, kind: type[T]) -> T | web.Response:
    try:
        return msgspec.json.decode(await request.read(), type=kind)
    except msgspec.DecodeError as exc:
        return _error(400, f"Invalid request body: {exc}")


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    key = request.app.get(QUEUE_API_KEY)
    guarded = key is not None and request.path.startswith("/tasks")
    if guarded and request.headers.get("X-API-Key") != key:
        return _error(401, "Invalid API key")
    return await handler(request)


async def _health(request: web.Request) -> web.Response:
    return _json({"status": "healthy"})


async def _next(request: web.Request) -> web.Response:
    state = request.app[QUEUE_STATE]
    if state.injected:
        return web.Response(body=state.injected.popleft(), content_type="application/json")
    lease_s = _lease_s(request)
    if isinstance(lease_s, web.Response):
        return lease_s
    wait_s = _seconds(request, "wait_s", MAX_WAIT_S)
    if isinstance(wait_s, web.Response):
        return wait_s
    if wait_s:

        def gone() -> bool:
            return request.transport is None or request.transport.is_closing()

        task = await state.pull_waiting(lease_s, wait_s, gone)
    else:
        task = state.pull(lease_s)
    return _json(None if task is None else task.payload())


def _seconds(request: web.Request, name: str, most: float) -> float | web.Response | None:
    """An optional query value of seconds in (0, ``most``]."""
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= most:
        return _error(400, f"{name} must be a number of seconds in (0, {most:g}]")
    return value


def _lease_s(request: web.Request) -> float | web.Response | None:
    """The optional ``lease_s`` query value: a number of seconds in (0, 3600]."""
    return _seconds(request, "lease_s", MAX_LEASE_S)


async def _renew(request: web.Request) -> web.Response:
    lease_s = _lease_s(request)
    if isinstance(lease_s, web.Response):
        return lease_s
    eval_id = request.match_info["eval_id"]
    state = request.app[QUEUE_STATE]
    task = state.tasks.get(eval_id)
    if not state.renew(eval_id, lease_s or (task.lease_s if task and task.lease_s else 60.0)):
        return _error(404, "Task not found or holds no lease")
    return _json({"status": "renewed", "lease_s": state.tasks[eval_id].lease_s})


async def _create(request: web.Request) -> web.Response:
    new = await _decode(request, NewTask)
    if isinstance(new, web.Response):
        return new
    try:
        request.app[QUEUE_STATE].enqueue(new)
    except KeyError:
        return _error(409, f"Task {new.eval_id} already exists")
    return _json({"eval_id": new.eval_id, "status": "queued"})


async def _get(request: web.Request) -> web.Response:
    task = request.app[QUEUE_STATE].tasks.get(request.match_info["eval_id"])
    return _error(404, "Task not found") if task is None else _json(task.record())


def _reported_with(request: web.Request) -> None:
    """Note the report's ``traceparent`` header on its task (for tests)."""
    task = request.app[QUEUE_STATE].tasks.get(request.match_info["eval_id"])
    if task is not None:
        task.reported_with(request.headers.get("traceparent"))


async def _complete(request: web.Request) -> web.Response:
    body = await _decode(request, CompleteBody)
    if isinstance(body, web.Response):
        return body
    _reported_with(request)
    if request.app[QUEUE_STATE].complete(request.match_info["eval_id"], body.output):
        return _json({"status": "completed"})
    return _error(404, "Task not found")


async def _fail(request: web.Request) -> web.Response:
    body = await _decode(request, FailBody)
    if isinstance(body, web.Response):
        return body
    _reported_with(request)
    ok = request.app[QUEUE_STATE].fail(request.match_info["eval_id"], body.error)
    return _json({"status": "failed" if ok else "not_found"})


async def _stats(request: web.Request) -> web.Response:
    return _json(request.app[QUEUE_STATE].stats())


async def _drop_lease(request: web.Request) -> web.Response:
    if request.app[QUEUE_STATE].drop_lease(request.match_info["eval_id"]):
        return _json({"status": "expired"})
    return _error(404, "Task not found or holds no lease")


async def _inject(request: web.Request) -> web.Response:
    request.app[QUEUE_STATE].injected.append(await request.read())
    return _json({"status": "injected"})


def create_queue_app(*, api_key: str | None = None) -> web.Application:
    """The Queue Service; with ``api_key`` every ``/tasks*`` call needs ``X-API-Key``."""
    app = web.Application(middlewares=[_auth], client_max_size=CLIENT_MAX_BYTES)
    app[QUEUE_STATE] = QueueState()
    if api_key is not None:
        app[QUEUE_API_KEY] = api_key
    app.router.add_get("/health", _health)
    app.router.add_get("/stats", _stats)
    app.router.add_post("/_inject", _inject)
    app.router.add_post("/_expire/{eval_id}", _drop_lease)
    app.router.add_get("/tasks/next", _next)
    app.router.add_post("/tasks", _create)
    app.router.add_get("/tasks/{eval_id}", _get)
    app.router.add_post("/tasks/{eval_id}/complete", _complete)
    app.router.add_post("/tasks/{eval_id}/fail", _fail)
    app.router.add_post("/tasks/{eval_id}/renew", _renew)
    return app
