"""``GET /health``, ``GET /health/live`` and ``GET /status``.

Each is declared in ``ROUTES`` next to its handler: the declaration registers the route and
is its part of the OpenAPI document (:mod:`queue_worker.openapi.operations`).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import msgspec
from aiohttp import web

from queue_worker import __version__
from queue_worker.http.auth import principal_of
from queue_worker.http.state import (
    FATE,
    FORMATS,
    LIVENESS,
    PUBLISHER,
    REPORTER,
    ROUTER,
    SETTINGS,
    STARTED,
    STATUS,
    STORE,
    SUPERVISOR,
)
from queue_worker.openapi import examples as ex
from queue_worker.openapi import schemas as s
from queue_worker.openapi.operations import RouteTable, json_body
from queue_worker.streams import events as ev
from queue_worker.streams.connection import REDIS_ERRORS
from queue_worker.streams.views import ROUTED_WINDOW_MS, ExecutorView, WorkerView

_encoder = msgspec.json.Encoder()
REDIS_TIMEOUT_S = 2.0  # a Redis that stops answering must not stop these from answering
ROUTES = RouteTable(tag="monitoring")


def json_response(body: object, status: int = 200) -> web.Response:
    return web.Response(body=_encoder.encode(body), status=status, content_type="application/json")


def error_response(status: int, error: str, detail: str | None = None) -> web.Response:
    return json_response(s.ErrorResponse(error=error, status=status, detail=detail), status)


async def _redis_problem(request: web.Request) -> str | None:
    """Why Redis cannot record this worker's events now (``None``: it can)."""
    store = request.app[STORE]
    if store.fenced:
        return None  # said by the liveness problem
    if not store.writable:
        return f"Redis refuses writes: {store.write_error}"
    try:
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            await store.redis.ping()  # type: ignore[misc]
    except (*REDIS_ERRORS, TimeoutError) as exc:
        return f"Redis unreachable: {type(exc).__name__}: {exc}"
    if not store.reachable:
        return "Redis unreachable: events are held until it answers"
    return None


def may_read(request: web.Request) -> bool:
    """Whether the caller of an open route could read a protected one (see ``http.auth``)."""
    return not isinstance(principal_of(request), web.StreamResponse)


def _this_worker(request: web.Request) -> WorkerView:
    view = request.app[STATUS].view
    return view.workers.get(request.app[SETTINGS].worker_id) or WorkerView()


@ROUTES.get(
    "/health",
    operation_id="getHealth",
    summary="Service health with executor status",
    description="`status` is `healthy` when Redis takes writes, every executor is healthy and "
    "nothing stops the worker, else `degraded`. The HTTP status is 503 when the worker cannot "
    "make progress, with the reasons in `reasons`; use it as the readiness probe "
    "(`/health/live` is the liveness probe). It needs no token; a caller without read access "
    "(with a token configured, one that sent none) gets the `status` alone (`HealthStatus`).",
    responses={
        200: json_body(
            "The worker can make progress: Redis takes writes, at least one healthy executor, "
            "not fenced (`status` may still be `degraded` when some executors are unhealthy).",
            ex.HEALTHY,
            also=(s.HealthStatus,),
        ),
        503: json_body(
            "The worker cannot make progress: Redis is unreachable or refuses writes (out of "
            "memory, read-only) or refuses a projector a permission (ACL), "
            "no executor is healthy, the worker is fenced (its liveness key "
            "is not being refreshed) or was taken over, a background loop kept failing "
            "(`loops_dead`), or workers of an incompatible (earlier) version are alive: it "
            "waits for them to stop before it pulls.",
            ex.DEGRADED,
            also=(s.HealthStatus,),
        ),
    },
)
async def health(request: web.Request) -> web.Response:
    app = request.app
    executors = app[ROUTER].pool.executors
    supervisor = app[SUPERVISOR]
    reasons: list[str] = []
    if app[FATE].reason is not None:
        reasons.append(f"stopping: {app[FATE].reason}")
    if not app[STATUS].replayed.is_set():
        reasons.append("replaying the event stream (nothing is pulled until it is folded)")
    if (formats_problem := app[FORMATS].problem()) is not None:
        reasons.append(formats_problem)
    liveness_problem = app[LIVENESS].problem()
    if liveness_problem is not None:
        reasons.append(liveness_problem)
    redis_problem = await _redis_problem(request)
    if redis_problem is not None:
        reasons.append(redis_problem)
    healthy = sum(1 for x in executors if x.healthy)
    if not healthy:
        reasons.append("no healthy executor")
    reasons += [f"loop {name} gave up: {error}" for name, error in supervisor.failed.items()]
    for projector in (app.get(PUBLISHER), app.get(REPORTER)):
        if projector is not None and projector.refused is not None:
            reasons.append(f"Redis refuses the {projector.name}: {projector.refused}")
    body = s.HealthResponse(
        status="healthy" if not reasons and healthy == len(executors) else "degraded",
        worker_id=app[SETTINGS].worker_id,
        redis=redis_problem is None,
        queue_reachable=_this_worker(request).queue_reachable,
        executors_healthy=healthy,
        executors_total=len(executors),
        loops_dead=sorted(supervisor.failed),
        executors=[
            s.ExecutorHealth(url=x.url, healthy=x.healthy, reason=x.health_reason)
            for x in executors
        ],
        reasons=reasons,
        loop_restarts=dict(sorted(supervisor.crashes.items())),
    )
    if not may_read(request):  # the verdict only: the probe needs no more
        return json_response(s.HealthStatus(status=body.status), 503 if reasons else 200)
    return json_response(body, 503 if reasons else 200)


@ROUTES.get(
    "/health/live",
    operation_id="getLiveness",
    summary="Liveness: whether the process should be restarted",
    description="200 while the process makes progress or waits for something outside it "
    "(Redis, executors: see `/health`). 503 once it cannot go on: a background loop crashed "
    "more than 5 times in 60 s, or a peer took this worker over; it is then stopping and "
    "exits non-zero. Reveals nothing else.",
    responses={
        200: json_body("Alive.", ex.ALIVE),
        503: json_body("Failing: the process is stopping; restart it.", ex.FAILING),
    },
)
async def live(request: web.Request) -> web.Response:
    app = request.app
    reason = app[FATE].reason
    if reason is None and app[SUPERVISOR].failed:
        name, error = next(iter(app[SUPERVISOR].failed.items()))
        reason = f"loop {name} gave up: {error}"
    if reason is None:
        return json_response(s.LivenessResponse(status="alive"))
    told = reason if may_read(request) else None
    return json_response(s.LivenessResponse(status="failing", reason=told), 503)


async def _projectors(request: web.Request) -> list[s.ProjectorStatus]:
    app = request.app
    store = app[STORE]
    groups = {g["name"]: g for g in await store.info_groups(store.keys.outcomes)}
    out = [s.ProjectorStatus(name="status", last_id=app[STATUS].view.last_id, lag=None)]
    for name in (store.keys.publisher_group, store.keys.reporter_group):
        group = groups.get(name, {})
        out.append(
            s.ProjectorStatus(
                name=name,
                last_id=group.get("last-delivered-id"),
                pending=group.get("pending"),
                lag=group.get("lag"),
            )
        )
    return out


async def _fleet(request: web.Request) -> list[s.FleetMember]:
    view, store = request.app[STATUS].view, request.app[STORE]
    ids = sorted(view.workers)
    alive = await store.redis.mget([store.keys.alive(w) for w in ids]) if ids else []
    in_flight = Counter(task.worker_id for task in view.in_flight.values())
    return [
        s.FleetMember(
            worker_id=w,
            alive=flag is not None,
            running=view.workers[w].running,
            in_flight=in_flight[w],
            counters=view.workers[w].counters,
        )
        for w, flag in zip(ids, alive, strict=True)
    ]


def _executors(request: web.Request) -> list[s.ExecutorStatus]:
    """Each executor's health and load, with its counters folded from the stream."""
    view = request.app[STATUS].view
    out = []
    for x in request.app[ROUTER].pool.executors:
        folded = view.executors.get(x.url) or ExecutorView()
        shown = x.candidate()  # cooling and warmth as the choices record them
        out.append(
            s.ExecutorStatus(
                url=x.url,
                healthy=x.healthy,
                health_reason=x.health_reason,
                last_check_ms=x.last_check_ms,
                latency_ms=None if x.latency_ms is None else round(x.latency_ms, 3),
                capacity=x.capacity,
                in_flight=x.in_flight,
                routed=folded.routed,
                completed=folded.completed,
                failed=folded.failed,
                ejected=x.ejected,
                throttles=folded.throttles,
                cooling_s=shown.cooling_s,
                warmth=shown.warmth,
                drained=x.drained,
            )
        )
    return out


def _paused(request: web.Request) -> s.PauseStatus | None:
    """The pause that holds this worker, as folded from the stream."""
    settings, view = request.app[SETTINGS], request.app[STATUS].view
    scope = settings.worker_id if settings.worker_id in view.paused else ev.FLEET
    pause = view.paused.get(scope)
    if pause is None:
        return None
    return s.PauseStatus(scope=scope, by=pause.by, reason=pause.reason, since_ms=pause.since_ts)


def _live(app: web.Application) -> s.LiveCounters:
    """What only this process counts."""
    router, store, status = app[ROUTER], app[STORE], app[STATUS]
    return s.LiveCounters(
        polls=router.polls,
        empty_polls=router.empty_polls,
        published=app[PUBLISHER].published,
        report_errors=app[REPORTER].report_errors,
        events_appended=store.appended,
        append_round_trips=store.round_trips,
        quarantined=router.quarantined,
        generation=store.generation,
        wakeups=router.wakeups,
        long_polls=router.puller.long_polls,
        folded_as_written=status.folded_as_written,
        folded_parked=status.folded_parked,
        read_back=status.read_back,
    )


@ROUTES.get(
    "/status",
    operation_id="getStatus",
    summary="Detailed worker and executor status",
    description="Counters folded from the event stream (`counters`, per-executor "
    "`routed`/`completed`/`failed`), live process counters (`live`), executor health and "
    "load, and the stream with its projectors' progress. It carries no task payload (code, "
    "output, error texts).",
    access="read",
    responses={
        200: json_body("The status view.", ex.STATUS),
        503: json_body("Redis is unreachable.", ex.REDIS_DOWN),
    },
)
async def status(request: web.Request) -> web.Response:
    app = request.app
    settings, router, store = app[SETTINGS], app[ROUTER], app[STORE]
    view = app[STATUS].view
    me = _this_worker(request)
    async with asyncio.timeout(REDIS_TIMEOUT_S):  # a stalled Redis: 503, not a hang
        length = await store.length()
        projectors = await _projectors(request)
        fleet = await _fleet(request)
    body = s.StatusResponse(
        worker_id=settings.worker_id,
        version=__version__,
        strategy=router.balancer.name,
        uptime_s=round(time.monotonic() - app[STARTED], 3),
        in_flight=router.in_flight,
        waiting=router.waiting,
        routed_last_minute=view.routed_since(time.time_ns() // 1_000_000 - ROUTED_WINDOW_MS),
        panic=router.pool.panic,
        paused=_paused(request),
        counters=me.counters,
        live=_live(app),
        queue=s.QueueStatus(
            url=settings.queue_service_url,
            reachable=me.queue_reachable,
            consecutive_errors=me.queue_consecutive_errors,
        ),
        executors=_executors(request),
        stream=s.StreamStatus(
            key=store.keys.events, length=length, last_id=view.last_id, projectors=projectors
        ),
        fleet=fleet,
    )
    return json_response(body)


def register(app: web.Application) -> None:
    """Add ``/health``, ``/health/live`` and ``/status`` (see ``ROUTES``) to ``app``."""
    ROUTES.register(app)
