"""``GET /health`` and ``GET /status``."""

from __future__ import annotations

import time
from collections import Counter

import msgspec
import redis.asyncio as aioredis
from aiohttp import web

from queue_worker import __version__
from queue_worker.http.state import (
    LOOPS,
    PUBLISHER,
    REPORTER,
    ROUTER,
    SETTINGS,
    STARTED,
    STATUS,
    STORE,
)
from queue_worker.openapi import schemas as s
from queue_worker.streams.views import ROUTED_WINDOW_MS, ExecutorView, WorkerView

_encoder = msgspec.json.Encoder()


def json_response(body: object, status: int = 200) -> web.Response:
    return web.Response(body=_encoder.encode(body), status=status, content_type="application/json")


def error_response(status: int, error: str, detail: str | None = None) -> web.Response:
    return json_response(s.ErrorResponse(error=error, status=status, detail=detail), status)


async def _redis_ok(request: web.Request) -> bool:
    if not request.app[STORE].available:  # events are being held for Redis
        return False
    try:
        await request.app[STORE].redis.ping()  # type: ignore[misc]
    except (aioredis.RedisError, OSError):
        return False
    return True


def _this_worker(request: web.Request) -> WorkerView:
    view = request.app[STATUS].view
    return view.workers.get(request.app[SETTINGS].worker_id) or WorkerView()


async def health(request: web.Request) -> web.Response:
    """Service health with executor status."""
    app = request.app
    executors = app[ROUTER].pool.executors
    redis_ok = await _redis_ok(request)
    dead = sorted(name for name, task in app[LOOPS].items() if task.done())
    healthy = sum(1 for x in executors if x.healthy)
    ok = redis_ok and healthy == len(executors) and not dead
    body = s.HealthResponse(
        status="healthy" if ok else "degraded",
        worker_id=app[SETTINGS].worker_id,
        redis=redis_ok,
        queue_reachable=_this_worker(request).queue_reachable,
        executors_healthy=healthy,
        executors_total=len(executors),
        loops_dead=dead,
        executors=[
            s.ExecutorHealth(url=x.url, healthy=x.healthy, reason=x.health_reason)
            for x in executors
        ],
    )
    return json_response(body, 200 if redis_ok and healthy and not dead else 503)


async def _projectors(request: web.Request) -> list[s.ProjectorStatus]:
    app = request.app
    groups = {g["name"]: g for g in await app[STORE].info_groups()}
    out = [s.ProjectorStatus(name="status", last_id=app[STATUS].view.last_id, lag=None)]
    for name in (app[STORE].keys.publisher_group, app[STORE].keys.reporter_group):
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


async def status(request: web.Request) -> web.Response:
    """Detailed worker and executor status, folded from the stream."""
    app = request.app
    settings, router, store = app[SETTINGS], app[ROUTER], app[STORE]
    view = app[STATUS].view
    me = _this_worker(request)
    length = await store.length()
    executors = []
    for x in router.pool.executors:
        folded = view.executors.get(x.url) or ExecutorView()
        executors.append(
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
            )
        )
    body = s.StatusResponse(
        worker_id=settings.worker_id,
        version=__version__,
        strategy=router.balancer.name,
        uptime_s=round(time.monotonic() - app[STARTED], 3),
        in_flight=router.in_flight,
        waiting=router.waiting,
        routed_last_minute=view.routed_since(time.time_ns() // 1_000_000 - ROUTED_WINDOW_MS),
        counters=me.counters,
        live=s.LiveCounters(
            polls=router.polls,
            empty_polls=router.empty_polls,
            published=app[PUBLISHER].published,
            report_errors=app[REPORTER].report_errors,
            events_appended=store.appended,
            append_round_trips=store.round_trips,
        ),
        queue=s.QueueStatus(
            url=settings.queue_service_url,
            reachable=me.queue_reachable,
            consecutive_errors=me.queue_consecutive_errors,
        ),
        executors=executors,
        stream=s.StreamStatus(
            key=store.keys.events,
            length=length,
            last_id=view.last_id,
            projectors=await _projectors(request),
        ),
        fleet=await _fleet(request),
    )
    return json_response(body)


def register(app: web.Application) -> None:
    app.router.add_get("/health", health, allow_head=False)
    app.router.add_get("/status", status, allow_head=False)
