"""The live dashboard (``/dashboard``) and the stream pushed as Server-Sent Events.

``GET /events/stream`` sends the last ``last`` entries (default 50), then every
new one as it is appended (``XREAD BLOCK``), each as an SSE message whose
``id`` is the stream id, so a browser that reconnects resumes from
``Last-Event-ID``. The page is plain HTML, CSS and JavaScript served from the
package: no CDN, no build step.
"""

from __future__ import annotations

import asyncio
import re
from importlib import resources
from typing import Any

import msgspec
import structlog
from aiohttp import web

from queue_worker.http.state import STORE
from queue_worker.streams.projector import REDIS_DOWN
from queue_worker.streams.store import EventStore, RawEntry, parse_entry

log = structlog.get_logger(__name__)

MAX_CLIENTS = 32
HEARTBEAT_S = 15.0
STREAM_ID = re.compile(r"^\d+-\d+$")


class LiveStreams:
    """The handlers serving ``/events/stream`` now, so shutdown can end them."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()


LIVE_STREAMS = web.AppKey("live_streams", LiveStreams)

_encoder = msgspec.json.Encoder()


def _page() -> bytes:
    return (resources.files("queue_worker.http") / "static" / "dashboard.html").read_bytes()


async def dashboard(request: web.Request) -> web.Response:
    """The live dashboard: executors, throughput, and the event stream as it happens."""
    return web.Response(body=_page(), content_type="text/html", charset="utf-8")


async def root(request: web.Request) -> web.Response:
    """The service root leads to the dashboard."""
    raise web.HTTPFound("/dashboard")


def _start_id(request: web.Request) -> tuple[str | None, int]:
    """Where to start: after ``Last-Event-ID`` when resuming, else the last ``last`` entries."""
    resume = request.headers.get("Last-Event-ID", "")
    if STREAM_ID.match(resume):
        return resume, 0
    raw = request.query.get("last", "50")
    if not raw.isdigit() or int(raw) > 1000:
        raise web.HTTPBadRequest(text="last must be a whole number from 0 to 1000")
    return None, int(raw)


def _message(raw: RawEntry) -> bytes | None:
    entry = parse_entry(raw)
    if entry is None:
        return None
    body = _encoder.encode(
        {"id": entry.id, "ts": entry.ts, "worker_id": entry.worker_id, "event": entry.event}
    )
    return b"id: " + entry.id.encode() + b"\ndata: " + body + b"\n\n"


async def _backlog(store: EventStore, last: int) -> tuple[list[RawEntry], str]:
    if last == 0:
        newest = await store.redis.xrevrange(store.keys.events, count=1)
        return [], newest[0][0].decode() if newest else "0-0"
    raws: list[RawEntry] = await store.redis.xrevrange(store.keys.events, count=last)
    raws.reverse()
    return raws, raws[-1][0].decode() if raws else "0-0"


async def event_stream(request: web.Request) -> web.StreamResponse:
    """The stream's entries as Server-Sent Events, live."""
    tasks = request.app[LIVE_STREAMS].tasks
    if len(tasks) >= MAX_CLIENTS:
        raise web.HTTPServiceUnavailable(text=f"at most {MAX_CLIENTS} live streams at once")
    store = request.app[STORE]
    after, last = _start_id(request)
    if after is None:
        backlog, after = await _backlog(store, last)
    else:
        backlog = []
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    current = asyncio.current_task()
    assert current is not None
    tasks.add(current)
    try:
        await response.write(b"retry: 2000\n\n")
        for raw in backlog:
            if (message := _message(raw)) is not None:
                await response.write(message)
        while True:
            try:
                resp = await store.redis.xread(
                    {store.keys.events: after}, count=200, block=int(HEARTBEAT_S * 1000)
                )
            except REDIS_DOWN as exc:
                log.warning("event_stream_redis_error", error=str(exc))
                await response.write(b": redis unreachable\n\n")
                await asyncio.sleep(1.0)
                continue
            if not resp:
                await response.write(b": heartbeat\n\n")
                continue
            for raw in resp[0][1]:
                after = raw[0].decode()
                if (message := _message(raw)) is not None:
                    await response.write(message)
    except ConnectionResetError:
        pass  # the client left
    finally:
        tasks.discard(current)
    return response


async def _close_streams(app: web.Application) -> None:
    """On shutdown, end the live streams instead of waiting for their clients."""
    for task in list(app[LIVE_STREAMS].tasks):
        task.cancel()


def register(app: web.Application) -> None:
    app[LIVE_STREAMS] = LiveStreams()
    app.on_shutdown.append(_close_streams)
    app.router.add_get("/", root, allow_head=False)
    app.router.add_get("/dashboard", dashboard, allow_head=False)
    app.router.add_get("/events/stream", event_stream, allow_head=False)
