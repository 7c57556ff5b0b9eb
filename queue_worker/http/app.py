"""The aiohttp application: one ``cleanup_ctx`` per resource, state under AppKeys.

Start order: Redis, HTTP client session, event store, the supervisor of every
loop, liveness (this worker's generation and heartbeat, before anything is
appended; then the look for live workers of another stream format, which the
router and the hand-over of an earlier version's groups wait for), status
projector (it replays the stream in its loop, from the latest
checkpoint: the app serves meanwhile, ``/health`` says "replaying", and the router and
retention wait for it), publisher, reporter, the span projector (when tracing is
on), retention, router. Each is
stopped in reverse order, cancelled and awaited. Every long-running loop runs under
the supervisor: a crash restarts it, a loop that keeps failing makes the worker fail
(``fail``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import redis.asyncio as aioredis
import structlog
from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware

from queue_worker.config import Settings
from queue_worker.http import (
    admin,
    auth,
    dashboard,
    docs,
    handlers,
    metrics,
    ops,
    task_actions,
    tasks,
)
from queue_worker.http.state import (
    FATE,
    FORMATS,
    LIVENESS,
    PUBLISHER,
    REDIS,
    REPORTER,
    ROUTER,
    SESSION,
    SETTINGS,
    SPANS,
    STARTED,
    STATUS,
    STORE,
    SUPERVISOR,
    TASK_INDEX,
    Fate,
)
from queue_worker.router.formats import FormatGuard
from queue_worker.router.liveness import Liveness
from queue_worker.router.queue_client import QueueClient
from queue_worker.router.reporter import Reporter
from queue_worker.router.router import Router
from queue_worker.streams import retention
from queue_worker.streams.checkpoint import Checkpoints
from queue_worker.streams.connection import (
    REDIS_ERRORS,
    RedisTls,
    RedisUnavailable,
    connect,
    denied,
)
from queue_worker.streams.index import TaskIndex
from queue_worker.streams.keys import Keys
from queue_worker.streams.projector import GroupProjector
from queue_worker.streams.publisher import Publisher
from queue_worker.streams.store import EventStore
from queue_worker.streams.tail import TailProjector
from queue_worker.streams.tracing import SpanProjector
from queue_worker.supervisor import LoopFactory, Supervisor

log = structlog.get_logger(__name__)

RESET_WINDOW_S = 60.0  # a NOGROUP this soon after a reset was found comes from that reset
START_ATTEMPTS = 5  # tries to reach Redis at start-up (0.2 s, 0.4 s, ... apart)


def fail(app: web.Application, reason: str, *, grace: bool = True) -> None:
    """The process cannot go on: stop pulling, turn liveness red, and stop the process
    (``Fate.exit``; ``queue-worker run`` then exits non-zero), once."""
    fate = app[FATE]
    if fate.reason is not None:
        return
    fate.reason, fate.grace = reason, grace
    log.error("worker_failing", reason=reason, grace=grace)
    router = app.get(ROUTER)
    if router is not None:
        router.halt(reason)
    if fate.exit is not None:
        fate.exit()


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    tls = RedisTls(settings.redis_ca_file, settings.redis_cert_file, settings.redis_key_file)
    app[REDIS] = await connect(
        settings.redis_url, settings.redacted_redis_url(), attempts=START_ATTEMPTS, tls=tls
    )
    yield
    await app[REDIS].aclose()


def basic_auth(credentials: tuple[tuple[str, str, str], ...]) -> aiohttp.ClientMiddlewareType:
    """A client middleware that sends the HTTP Basic credentials given with a queue's or an
    executor's URL to that origin (the URLs are kept without them, so they never show)."""
    by_origin = {
        origin: aiohttp.BasicAuth(user, password) for origin, user, password in credentials
    }

    async def middleware(
        request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        auth = by_origin.get(str(request.url.origin()))
        if auth is not None and hdrs.AUTHORIZATION not in request.headers:
            request.headers[hdrs.AUTHORIZATION] = auth.encode()
        return await handler(request)

    return middleware


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=30)
    credentials = app[SETTINGS].credentials
    middlewares = (basic_auth(credentials),) if credentials else ()
    app[SESSION] = aiohttp.ClientSession(connector=connector, middlewares=middlewares)
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


async def supervisor_ctx(app: web.Application) -> AsyncIterator[None]:
    """Every long-running loop below runs under this one supervisor."""

    def give_up(loop: str, error: str) -> None:
        fail(app, f"loop {loop} keeps failing: {error}")

    supervisor = Supervisor(record=app[STORE].append, on_give_up=give_up)
    app[SUPERVISOR] = supervisor
    yield
    await supervisor.stop_all()


async def liveness_ctx(app: web.Application) -> AsyncIterator[None]:
    """This worker's generation and heartbeat (before anything is appended)."""
    settings = app[SETTINGS]

    def reset(reason: str, stream_last_id: str | None) -> None:
        app[SUPERVISOR].start("reset", lambda: _handle_reset(app, reason, stream_last_id))

    def taken_over(reason: str) -> None:
        fail(app, reason, grace=False)

    liveness = Liveness(
        app[STORE],
        heartbeat_interval_s=settings.heartbeat_interval_s,
        dead_after_s=settings.dead_after_s,
        on_reset=reset,
        on_taken_over=taken_over,
    )
    try:
        await liveness.start()
    except REDIS_ERRORS as exc:  # out of memory, read-only, ...: one line, not a traceback
        shown = settings.redacted_redis_url()
        reason = f"{type(exc).__name__}: {exc}"
        raise RedisUnavailable(f"Redis at {shown} (REDIS_URL) refused to start: {reason}") from exc
    app[LIVENESS] = liveness
    app[SUPERVISOR].start("heartbeat", liveness.run)
    # Workers of another stream format (an earlier version): until none is alive, the
    # router does not start and their groups are not handed over (router/formats.py).
    # It looks once the status projector exists (status_ctx): without +scan it asks it.
    # Once clear, it watches the status view for such workers that start later.
    app[FORMATS] = FormatGuard(
        app[STORE],
        interval_s=settings.heartbeat_interval_s,
        known=lambda: _named(app),
        view=lambda: app[STATUS].view,
    )
    yield
    await app[SUPERVISOR].stop("heartbeat")
    await liveness.stop()


async def _handle_reset(app: web.Application, reason: str, stream_last_id: str | None) -> None:
    """Redis lost data: read the new stream from where it is, make sure the groups exist
    (from its start: every entry in it is new to them), re-record what runs here."""
    app[STATUS].rewind(stream_last_id)
    for projector in (app.get(PUBLISHER), app.get(REPORTER)):
        if projector is not None:
            await projector.ensure_group("0")
    router = app.get(ROUTER)
    if router is not None:
        await router.restore(reason, stream_last_id, app[PUBLISHER].was_published)


async def _nogroup_start(app: web.Application) -> str:
    """Where a consumer group that Redis lost is created again: at the stream's start when
    Redis lost data (a reset, found now or lately), else (an operator deleted the group)
    at its end, so that nothing handled before is handled twice."""
    liveness = app[LIVENESS]
    await liveness.beat_now()
    return "0" if liveness.reset_within(RESET_WINDOW_S) else "$"


async def status_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    store = app[STORE]
    projector = TailProjector(
        store,
        block_ms=settings.projector_block_ms,
        on_entry=[app[metrics.METRICS].observe],
        checkpoints=Checkpoints(store.redis, store.keys) if settings.checkpoint_every else None,
        checkpoint_every=settings.checkpoint_every,
    )
    app[STATUS] = projector  # it replays in its loop; /health says "replaying" until done
    app[SUPERVISOR].start("status", projector.run)
    app[SUPERVISOR].start("formats", app[FORMATS].run)
    yield
    await app[SUPERVISOR].stop("formats")
    await app[SUPERVISOR].stop("status")


async def _named(app: web.Application) -> list[str]:
    """The workers the event stream names, once it is folded."""
    await app[STATUS].replayed.wait()
    return list(app[STATUS].view.workers)


async def projectors_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    store, keys = app[STORE], app[STORE].keys
    options = {
        "block_ms": settings.projector_block_ms,
        "batch": settings.projector_batch,
        "claim_idle_ms": settings.claim_idle_ms,
        "max_deliveries": settings.max_deliveries,
    }

    async def nogroup() -> str:
        return await _nogroup_start(app)

    app[PUBLISHER] = Publisher(
        store,
        keys.publisher_group,
        settings.worker_id,
        max_message_bytes=settings.publish_max_bytes,
        gate=app[LIVENESS].wait_ok,
        on_nogroup=nogroup,
        view=app[STATUS].view,
        **options,
    )
    queue = QueueClient.from_settings(app[SESSION], settings)
    app[REPORTER] = Reporter(
        store,
        keys.reporter_group,
        settings.worker_id,
        queue,
        backoff_max_s=settings.report_backoff_max_s,
        on_nogroup=nogroup,
        **options,
    )
    app[TASK_INDEX] = TaskIndex(store.redis, keys)
    app[SUPERVISOR].start("publisher", app[PUBLISHER].run)
    app[SUPERVISOR].start("reporter", app[REPORTER].run)
    # An earlier version's groups on the main stream: what they still hold is handled,
    # then they go (see GroupProjector.retire; docs/OPERATIONS.md, upgrading), once no
    # worker of that version is alive to read them.
    clear = app[FORMATS].clear

    def retire(projector: GroupProjector) -> LoopFactory:
        async def hand_over() -> None:
            await clear.wait()
            await projector.retiring().retire()

        return hand_over

    app[SUPERVISOR].start("publisher-retire", retire(app[PUBLISHER]))
    app[SUPERVISOR].start("reporter-retire", retire(app[REPORTER]))
    yield
    await app[SUPERVISOR].stop("reporter-retire")
    await app[SUPERVISOR].stop("publisher-retire")
    await app[SUPERVISOR].stop("reporter")
    await app[SUPERVISOR].stop("publisher")


async def tracing_ctx(app: web.Application) -> AsyncIterator[None]:
    """The span projector, when an OTLP endpoint is set (and ``OTEL_SDK_DISABLED`` is not):
    its exporter is built here from the settings, the SDK imported only then."""
    settings, store = app[SETTINGS], app[STORE]
    endpoint = settings.traces_endpoint
    app[SPANS] = None
    if endpoint is None:
        await _tracing_left_behind(store)
        yield
        return
    from queue_worker import __version__
    from queue_worker.streams.tracing import OtlpExporter  # the SDK loads with it

    timeout_s = settings.otel_exporter_otlp_timeout / 1000
    exporter = OtlpExporter(
        endpoint,
        headers=dict(settings.otel_exporter_otlp_headers),
        timeout_s=timeout_s,
        compression=settings.otel_exporter_otlp_compression,
        resource={
            "service.name": settings.otel_service_name,
            "service.version": __version__,
            "service.instance.id": settings.worker_id,
        },
    )

    async def nogroup() -> str:
        return await _nogroup_start(app)

    spans = SpanProjector(
        store, store.keys.tracing_group, settings.worker_id, exporter,
        export_timeout_s=timeout_s + 1.0, on_nogroup=nogroup,
        block_ms=settings.projector_block_ms, batch=settings.projector_batch,
        claim_idle_ms=settings.claim_idle_ms, max_deliveries=settings.max_deliveries,
    )  # fmt: skip
    app[SPANS] = spans
    log.info("tracing_on", endpoint=endpoint, service=settings.otel_service_name)
    app[SUPERVISOR].start("tracing", spans.run)
    yield
    await app[SUPERVISOR].stop("tracing")
    await asyncio.to_thread(exporter.shutdown)


async def _tracing_left_behind(store: EventStore) -> None:
    """Tracing is off: say so when a ``tracing`` group is left from when it was on
    (retention does not wait for it; ``XGROUP DESTROY`` removes it)."""
    try:
        groups = await store.info_groups()
    except REDIS_ERRORS:
        return
    if any(g.get("name") == store.keys.tracing_group for g in groups):
        log.warning("tracing_group_left", group=store.keys.tracing_group,
                    hint="tracing is off; retention does not wait for this group")  # fmt: skip


async def router_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    router = Router(
        settings,
        app[STORE],
        app[SESSION],
        view=app[STATUS].view,
        supervisor=app[SUPERVISOR],
        liveness=app[LIVENESS],
        folded=app[STATUS].wait_folded,
        replayed=app[STATUS].replayed,
        formats=app[FORMATS],
    )
    app[ROUTER] = router
    running = app[SUPERVISOR].start("pull", router.run)
    yield
    fate = app[FATE]
    await router.stop(running, settings.shutdown_grace_s if fate.grace else 0.0)


async def _retain(app: web.Application) -> None:
    settings, store, view = app[SETTINGS], app[STORE], app[STATUS].view
    await app[STATUS].replayed.wait()  # the checkpoint it saves must cover the whole stream
    while True:
        await asyncio.sleep(settings.retention_interval_s)
        protect = [t.pulled_id for t in view.in_flight.values()]
        try:
            # An earlier version's index group would hold every entry it has not read
            # (handed over once no worker of that version is alive to read it).
            if app[FORMATS].clear.is_set():
                await app[TASK_INDEX].retire_legacy_group(store)
            status = app[STATUS]
            length = await store.length()
            if length <= settings.stream_maxlen:
                continue
            if status.checkpoints is not None:  # what goes is counted in it first
                await status.save_checkpoint()
                if (saved := await status.checkpoints.stored_id()) is not None:
                    protect.append(saved)
            lossy = (store.keys.tracing_group,)  # spans are not worth keeping entries for
            trimmed = await retention.trim(
                store, settings.stream_maxlen, protect, lossy=lossy, length=length
            )
            if trimmed:
                oldest = await store.redis.xrange(store.keys.events, count=1)
                if oldest:  # the tasks whose every entry is gone leave the index
                    await app[TASK_INDEX].forget_before(oldest[0][0].decode())
        except REDIS_ERRORS as exc:
            log.warning("retention_skipped", error=str(exc))


async def retention_ctx(app: web.Application) -> AsyncIterator[None]:
    if app[SETTINGS].stream_maxlen:
        app[SUPERVISOR].start("retention", lambda: _retain(app))
    yield
    await app[SUPERVISOR].stop("retention")


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
        detail = f"Redis refused: {exc}" if denied(exc) else "Redis is unreachable"
        return handlers.error_response(503, "Service Unavailable", detail)


def body_cap(max_bytes: int) -> Middleware:
    """Request bodies over ``max_bytes`` (``HTTP_MAX_BODY_BYTES``) get a JSON 413: at once
    when ``Content-Length`` says so (the body is not read, the connection is closed), or
    when a handler reads a body without one (chunked) past the cap (``client_max_size``)."""
    detail = f"the request body is larger than {max_bytes} bytes (HTTP_MAX_BODY_BYTES)"

    def too_large() -> web.Response:
        response = handlers.error_response(413, "Content Too Large", detail)
        response.force_close()  # the rest of the body is not worth reading
        return response

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        length = request.content_length
        if length is not None and length > max_bytes:
            return too_large()
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return too_large()

    return middleware


def create_app(settings: Settings, *, exit: Callable[[], None] | None = None) -> web.Application:
    """The worker as an aiohttp application; nothing starts until it runs.

    ``exit`` is called once the worker cannot go on (a loop kept failing, a peer took it
    over): it should stop the process (``queue-worker run`` raises SIGTERM at itself and
    then exits non-zero). Without it the app stops pulling and reports itself failing.
    """
    app = web.Application(
        middlewares=[json_errors, body_cap(settings.http_max_body_bytes), auth.authenticate],
        client_max_size=settings.http_max_body_bytes,
    )
    app[SETTINGS] = settings
    app[FATE] = Fate(exit=exit)
    app[STARTED] = time.monotonic()
    app.cleanup_ctx.extend(
        [
            redis_ctx,
            session_ctx,
            store_ctx,
            supervisor_ctx,
            liveness_ctx,
            status_ctx,
            projectors_ctx,
            tracing_ctx,
            retention_ctx,
            router_ctx,
        ]
    )
    handlers.register(app)
    metrics.register(app)
    dashboard.register(app, settings)
    tasks.register(app)
    task_actions.register(app)
    admin.register(app)
    ops.register(app)
    docs.register(app)
    auth.setup(app, settings, (op for table in docs.API for op in table))
    return app
