"""The aiohttp application: one ``cleanup_ctx`` per resource, state under AppKeys.

Start order: Redis, HTTP client session, event store, status projector (it
replays the stream before the app serves), publisher, reporter, router.
Each is stopped in reverse order, cancelled and awaited.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import aiohttp
import redis.asyncio as aioredis
import structlog
from aiohttp import web

from queue_worker import __version__
from queue_worker.config import Settings
from queue_worker.errors import QueueWorkerError
from queue_worker.http import dashboard, handlers, metrics
from queue_worker.http.state import (
    LOOPS,
    PUBLISHER,
    REDIS,
    REPORTER,
    ROUTER,
    SESSION,
    SETTINGS,
    STARTED,
    STATUS,
    STORE,
)
from queue_worker.openapi import routes as openapi_routes
from queue_worker.router.queue_client import QueueClient
from queue_worker.router.reporter import Reporter
from queue_worker.router.worker import Router
from queue_worker.streams import retention
from queue_worker.streams.connection import RedisClient, open_redis
from queue_worker.streams.keys import Keys
from queue_worker.streams.projector import REDIS_DOWN, TailProjector
from queue_worker.streams.publisher import Publisher
from queue_worker.streams.store import EventStore

log = structlog.get_logger(__name__)


class RedisUnavailable(QueueWorkerError):
    """Redis could not be reached at start-up."""


async def connect_redis(settings: Settings, attempts: int = 5) -> RedisClient:
    delay = 0.2
    for attempt in range(1, attempts + 1):
        try:
            return await open_redis(settings.redis_url)
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
            if attempt == attempts:
                raise RedisUnavailable(
                    f"cannot reach Redis at {settings.redacted_redis_url()} (REDIS_URL): {exc}"
                ) from exc
            log.warning("redis_unreachable", attempt=attempt, retry_in_s=delay)
            await asyncio.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _start_loop(
    app: web.Application, name: str, coro: Coroutine[Any, Any, None]
) -> asyncio.Task[None]:
    async def supervised() -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("loop_died", loop=name)
            raise

    task = app[LOOPS][name] = asyncio.create_task(supervised(), name=name)
    return task


async def _stop_loop(app: web.Application, name: str) -> None:
    task = app[LOOPS].pop(name, None)
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    app[REDIS] = await connect_redis(app[SETTINGS])
    yield
    await app[REDIS].aclose()


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=30)
    app[SESSION] = aiohttp.ClientSession(connector=connector)
    yield
    await app[SESSION].close()


async def store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    store = EventStore(
        app[REDIS],
        Keys(settings.stream_prefix),
        settings.worker_id,
        buffer_max=settings.event_buffer_max,
    )
    await store.start()
    app[STORE] = store
    yield
    await store.stop()


async def status_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    projector = TailProjector(
        app[STORE], block_ms=settings.projector_block_ms, on_entry=[app[metrics.METRICS].observe]
    )
    await projector.replay()
    app[STATUS] = projector
    _start_loop(app, "status", projector.run())
    yield
    await _stop_loop(app, "status")


async def projectors_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    store, keys = app[STORE], app[STORE].keys
    options = {
        "block_ms": settings.projector_block_ms,
        "batch": settings.projector_batch,
        "claim_idle_ms": settings.claim_idle_ms,
        "max_deliveries": settings.max_deliveries,
    }
    app[PUBLISHER] = Publisher(store, keys.publisher_group, settings.worker_id, **options)
    queue = QueueClient(
        app[SESSION],
        settings.queue_service_url,
        api_key=settings.queue_api_key,
        timeout_s=settings.queue_timeout_s,
    )
    app[REPORTER] = Reporter(
        store,
        keys.reporter_group,
        settings.worker_id,
        queue,
        backoff_max_s=settings.report_backoff_max_s,
        **options,
    )
    _start_loop(app, "publisher", app[PUBLISHER].run())
    _start_loop(app, "reporter", app[REPORTER].run())
    yield
    await _stop_loop(app, "reporter")
    await _stop_loop(app, "publisher")


async def router_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    router = Router(settings, app[STORE], app[SESSION], view=app[STATUS].view)
    app[ROUTER] = router
    running = _start_loop(app, "router", router.run())
    yield
    app[LOOPS].pop("router", None)
    await router.stop(running, settings.shutdown_grace_s)


async def _retain(app: web.Application) -> None:
    settings, store, view = app[SETTINGS], app[STORE], app[STATUS].view
    while True:
        await asyncio.sleep(settings.retention_interval_s)
        protect = [t.pulled_id for t in view.in_flight.values()]
        try:
            await retention.trim(store, settings.stream_maxlen, protect)
        except REDIS_DOWN as exc:
            log.warning("retention_skipped", error=str(exc))


async def _heartbeat(app: web.Application) -> None:
    """Keep this worker's liveness key: peers take over a worker whose key expired."""
    settings, store = app[SETTINGS], app[STORE]
    ttl_ms = int(settings.dead_after_s * 1000)
    while True:
        try:
            await store.redis.set(store.keys.alive(settings.worker_id), __version__, px=ttl_ms)
            store.redis_state(ok=True)
        except REDIS_DOWN as exc:
            store.redis_state(ok=False)
            log.warning("heartbeat_failed", error=str(exc))
        await asyncio.sleep(settings.heartbeat_interval_s)


async def heartbeat_ctx(app: web.Application) -> AsyncIterator[None]:
    _start_loop(app, "heartbeat", _heartbeat(app))
    yield
    await _stop_loop(app, "heartbeat")
    store = app[STORE]
    try:  # a clean stop: peers need not wait for the key to expire
        await store.redis.delete(store.keys.alive(app[SETTINGS].worker_id))
    except REDIS_DOWN as exc:
        log.warning("liveness_key_left", error=str(exc))


async def retention_ctx(app: web.Application) -> AsyncIterator[None]:
    if app[SETTINGS].stream_maxlen:
        _start_loop(app, "retention", _retain(app))
    yield
    await _stop_loop(app, "retention")


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error of our own API is JSON with a proper status, never an HTML page."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = handlers.error_response(exc.status, exc.reason, exc.text)
        if "Allow" in exc.headers:  # 405: the methods the path supports (RFC 9110)
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except (aioredis.RedisError, OSError) as exc:
        log.warning("request_redis_error", path=request.path, error=str(exc))
        return handlers.error_response(503, "Service Unavailable", "Redis is unreachable")


def create_app(settings: Settings) -> web.Application:
    """The worker as an aiohttp application; nothing starts until it runs."""
    app = web.Application(middlewares=[json_errors])
    app[SETTINGS] = settings
    app[LOOPS] = {}
    app[STARTED] = time.monotonic()
    app.cleanup_ctx.extend(
        [
            redis_ctx,
            session_ctx,
            store_ctx,
            status_ctx,
            projectors_ctx,
            retention_ctx,
            heartbeat_ctx,
            router_ctx,
        ]
    )
    handlers.register(app)
    metrics.register(app)
    dashboard.register(app)
    openapi_routes.register(app)
    return app
