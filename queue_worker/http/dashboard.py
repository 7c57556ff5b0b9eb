"""The live dashboard (``/dashboard``) and the stream pushed as Server-Sent Events.

``GET /events/stream`` sends the last ``last`` entries (default 50), then every
new one as it is appended (``XREAD BLOCK``), each as an SSE message whose
``id`` is the stream id, so a browser that reconnects resumes from
``Last-Event-ID``; ``HEAD`` gets the headers a ``GET`` would start with. A read
token sees task payloads (code, output, error texts) as sizes and hashes
(:mod:`queue_worker.streams.redaction`); an admin token may ask for them whole
(``?payloads=1``). Each stream holds a slot: at most ``STREAM_MAX_CLIENTS`` at once
in all and ``STREAM_MAX_PER_CLIENT`` per client address; one over either gets a JSON
503 with ``Retry-After``. A client that goes away frees its slot at once: its
connection is watched while the read blocks (:func:`_gone`), not only found out at the
next write. An ``EventSource`` cannot send an ``Authorization`` header, so the page
first asks ``POST /events/ticket`` (with its bearer token) for a single-use ticket
valid 30 s, and passes it as ``?ticket=``: the token itself never goes into a URL.
The page is plain HTML with its CSS and JavaScript in files served from the package
(``/static/``; no inline script, no CDN, no build step). The routes are declared in
``ROUTES``, which registers them and is their part of the OpenAPI document
(:mod:`queue_worker.openapi.operations`).
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from importlib import resources
from typing import Any

import msgspec
import structlog
from aiohttp import hdrs, web

from queue_worker.config import Settings
from queue_worker.http import auth
from queue_worker.http.handlers import error_response, json_response
from queue_worker.http.state import STORE
from queue_worker.openapi import examples as ex
from queue_worker.openapi import schemas as s
from queue_worker.openapi.operations import Parameter, Response, RouteTable, json_body
from queue_worker.streams.connection import REDIS_DOWN
from queue_worker.streams.entries import RawEntry, parse_entry
from queue_worker.streams.redaction import redact_event
from queue_worker.streams.store import EventStore

log = structlog.get_logger(__name__)

HEARTBEAT_S = 15.0  # a comment line this often keeps proxies from closing an idle stream
GONE_CHECK_S = 0.2  # how often a blocked stream looks whether its client went away
RETRY_AFTER_S = 5  # what a refused stream is told to wait
MAX_BACKLOG = 1000
BAD_LAST = f"last must be a whole number from 0 to {MAX_BACKLOG}"
# A full Redis stream id: two unsigned 64-bit numbers, in ASCII digits (documented as is).
STREAM_ID_PATTERN = "[0-9]{1,20}-[0-9]{1,20}"
STREAM_ID = re.compile(STREAM_ID_PATTERN)


class LiveStreams:
    """The handlers serving ``/events/stream`` now (so shutdown can end them), and the
    slots they hold per client address. A slot whose client has gone counts no more,
    even before its handler has noticed and ended."""

    def __init__(self, max_clients: int, max_per_client: int) -> None:
        self.max_clients = max_clients
        self.max_per_client = max_per_client
        self.tasks: set[asyncio.Task[Any]] = set()
        self.by_address: Counter[str] = Counter()
        self._held: dict[asyncio.Task[Any], tuple[str, web.Request]] = {}

    def _prune(self) -> None:
        for task, (_, request) in list(self._held.items()):
            if _is_gone(request):
                self.release(task)

    def count(self, address: str | None = None) -> int:
        """Streams served now: in all, or to ``address``."""
        self._prune()
        return len(self._held) if address is None else self.by_address[address]

    def refusal(self, address: str) -> str | None:
        """Why one more stream for ``address`` is refused now (None: it is not)."""
        self._prune()
        if len(self._held) >= self.max_clients:
            return f"at most {self.max_clients} live streams at once (STREAM_MAX_CLIENTS)"
        if self.by_address[address] >= self.max_per_client:
            return (
                f"at most {self.max_per_client} live streams at once per client address "
                "(STREAM_MAX_PER_CLIENT)"
            )
        return None

    def take(self, task: asyncio.Task[Any], address: str, request: web.Request) -> None:
        self.tasks.add(task)
        self._held[task] = (address, request)
        self.by_address[address] += 1

    def release(self, task: asyncio.Task[Any]) -> None:
        """Free ``task``'s slot (once; its handler may still be ending)."""
        held = self._held.pop(task, None)
        if held is not None:
            address = held[0]
            self.by_address[address] -= 1
            if self.by_address[address] <= 0:
                del self.by_address[address]


LIVE_STREAMS = web.AppKey("live_streams", LiveStreams)

_encoder = msgspec.json.Encoder()
ROUTES = RouteTable(tag="monitoring")


def _page() -> bytes:
    return (resources.files("queue_worker.http") / "static" / "dashboard.html").read_bytes()


@ROUTES.get(
    "/",
    operation_id="getRoot",
    summary="Redirect to the dashboard",
    responses={
        302: Response("To `/dashboard`.", headers={"Location": {"schema": {"type": "string"}}})
    },
)
async def root(request: web.Request) -> web.Response:
    raise web.HTTPFound("/dashboard")


@ROUTES.get(
    "/dashboard",
    operation_id="getDashboard",
    summary="Live dashboard",
    description="Executors (health, in flight, latency, routed), counters, throughput over the "
    "last minutes and a live tail of the event stream. Served by the worker itself; no CDN. "
    "The page holds no data: it asks for a token (kept in the tab's `sessionStorage`) when "
    "the API wants one.",
    responses={200: Response("The page.", "text/html")},
)
async def dashboard(request: web.Request) -> web.Response:
    return web.Response(body=_page(), content_type="text/html", charset="utf-8")


def is_stream_id(text: str) -> bool:
    """Whether ``text`` is a stream id Redis accepts: ``<ms>-<seq>``, each below 2**64."""
    if STREAM_ID.fullmatch(text) is None:
        return False
    return all(int(part) < 1 << 64 for part in text.split("-"))


def _start_id(request: web.Request) -> tuple[str | None, int]:
    """Where to start: after ``Last-Event-ID`` when resuming, else the last ``last`` entries.

    Both are checked before the response starts, so a bad one is a JSON 400, never a
    stream that ends as soon as it began.
    """
    raw = request.query.get("last", "50")
    if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_BACKLOG:
        raise web.HTTPBadRequest(text=BAD_LAST)
    resume = request.headers.get("Last-Event-ID", "")
    if not resume:
        return None, int(raw)
    if not is_stream_id(resume):
        raise web.HTTPBadRequest(
            text="Last-Event-ID must be a stream id <ms>-<seq> (each a number below 2**64), "
            "as sent in the id field of this stream's messages"
        )
    return resume, 0


def _message(raw: RawEntry, *, payloads: bool) -> bytes | None:
    """One SSE message; without ``payloads``, the event's task payloads are redacted."""
    entry = parse_entry(raw)
    if entry is None:
        return None
    event: object = entry.event
    if not payloads:
        event = redact_event(msgspec.to_builtins(entry.event))
    body = _encoder.encode(
        {"id": entry.id, "ts": entry.ts, "worker_id": entry.worker_id, "event": event}
    )
    return b"id: " + entry.id.encode() + b"\ndata: " + body + b"\n\n"


async def _backlog(store: EventStore, last: int) -> tuple[list[RawEntry], str]:
    if last == 0:
        newest = await store.redis.xrevrange(store.keys.events, count=1)
        return [], newest[0][0].decode() if newest else "0-0"
    raws: list[RawEntry] = await store.redis.xrevrange(store.keys.events, count=last)
    raws.reverse()
    return raws, raws[-1][0].decode() if raws else "0-0"


@ROUTES.get(
    "/events/stream",
    operation_id="getEventStream",
    summary="The event stream, live, as Server-Sent Events",
    description="The last `last` entries, then every new one as it is appended. Each message's "
    "`id` is the stream id (send it back as `Last-Event-ID` to resume) and its `data` is "
    '`{"id", "ts", "worker_id", "event": <StreamEvent>}`. Task code, executor output and error '
    'texts are shown as `{"redacted": true, "bytes": N, "sha256": "..."}` unless an admin '
    "token asks for `payloads=1`. Authenticate with `Authorization: Bearer <token>`, or with a "
    "`ticket` from `POST /events/ticket` (what a browser's EventSource does).",
    access="read",
    parameters=(
        Parameter(
            "last",
            "query",
            f"Entries to send first (0 to {MAX_BACKLOG}).",
            {"type": "integer", "minimum": 0, "maximum": MAX_BACKLOG},
        ),
        Parameter(
            "Last-Event-ID",
            "header",
            "Resume after this stream id (the `id` of the last message received); `last` is "
            "then ignored. `<ms>-<seq>`, each a number below 2**64.",
            {"type": "string", "pattern": f"^{STREAM_ID_PATTERN}$"},
        ),
        Parameter(
            "payloads",
            "query",
            "`1`: task payloads whole (an admin token only; 403 for any other).",
            {"type": "string", "enum": ["0", "1"]},
        ),
        Parameter(
            "ticket",
            "query",
            "A single-use ticket from `POST /events/ticket`, instead of the bearer token.",
            {"type": "string", "maxLength": auth.MAX_TICKET_CHARS},
        ),
    ),
    responses={
        200: Response("An endless `text/event-stream`.", "text/event-stream"),
        400: json_body(
            f"`last` is not a whole number from 0 to {MAX_BACKLOG}, `Last-Event-ID` is not a "
            "stream id, or `payloads` is neither `0` nor `1`.",
            s.ErrorResponse(error="Bad Request", status=400, detail=BAD_LAST),
        ),
        403: json_body("`payloads=1` without an admin token.", ex.FORBIDDEN),
        503: json_body(
            "Too many live streams at once (in all, `STREAM_MAX_CLIENTS`, or from this client "
            "address, `STREAM_MAX_PER_CLIENT`; `detail` says which), or Redis unreachable.",
            ex.TOO_MANY_STREAMS,
            headers={
                "Retry-After": {
                    "description": "Seconds to wait before trying again (refused streams).",
                    "schema": {"type": "integer"},
                    "example": RETRY_AFTER_S,
                }
            },
        ),
    },
)
async def event_stream(request: web.Request) -> web.StreamResponse:
    live = request.app[LIVE_STREAMS]
    address = request.remote or ""
    refusal = live.refusal(address)
    if refusal is not None:
        refused = error_response(503, "Service Unavailable", refusal)
        refused.headers[hdrs.RETRY_AFTER] = str(RETRY_AFTER_S)
        return refused
    store = request.app[STORE]
    after, last = _start_id(request)
    payloads = auth.wants_payloads(request)
    headers = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    if request.method == hdrs.METH_HEAD:  # what a GET would start with, and no body
        return web.StreamResponse(headers=headers)
    current = asyncio.current_task()
    assert current is not None
    live.take(current, address, request)  # before the first await: limits hold in a burst
    response = web.StreamResponse(headers=headers)
    try:
        if after is None:
            backlog, after = await _backlog(store, last)
        else:
            backlog = []
        await response.prepare(request)
        await response.write(b"retry: 2000\n\n")
        for raw in backlog:
            if (message := _message(raw, payloads=payloads)) is not None:
                await response.write(message)
        while True:
            try:
                resp = await _read_unless_gone(request, store, after)
            except REDIS_DOWN as exc:
                log.warning("event_stream_redis_error", error=str(exc))
                await response.write(b": redis unreachable\n\n")
                await asyncio.sleep(1.0)
                continue
            if resp is None:
                break  # the client left
            if not resp:
                await response.write(b": heartbeat\n\n")
                continue
            for raw in resp[0][1]:
                after = raw[0].decode()
                if (message := _message(raw, payloads=payloads)) is not None:
                    await response.write(message)
    except ConnectionResetError:
        pass  # the client left while we wrote
    finally:
        live.release(current)
        live.tasks.discard(current)
    return response


def _is_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _gone(request: web.Request) -> None:
    """Return once the client's connection is closed (aiohttp drops it on the client's
    FIN or reset, which a blocked handler would otherwise only find at its next write).
    Polled: aiohttp signals a lost connection to no one but a request body's reader, and
    these requests have none."""
    while not _is_gone(request):  # noqa: ASYNC110
        await asyncio.sleep(GONE_CHECK_S)


async def _read_unless_gone(
    request: web.Request, store: EventStore, after: str
) -> list[Any] | None:
    """The next entries after ``after`` (``[]`` after ``HEARTBEAT_S`` without any), or None
    as soon as the client is gone (the blocked read is then cancelled)."""
    read = asyncio.ensure_future(
        store.redis.xread({store.keys.events: after}, count=200, block=int(HEARTBEAT_S * 1000))
    )
    gone = asyncio.ensure_future(_gone(request))
    try:
        await asyncio.wait({read, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not read.done():
            read.cancel()
            await asyncio.gather(read, return_exceptions=True)
    if not read.done() or read.cancelled() or _is_gone(request):
        return None
    result: list[Any] = read.result()
    return result


@ROUTES.route(
    hdrs.METH_POST,
    "/events/ticket",
    operation_id="createEventTicket",
    summary="A single-use ticket for the event stream",
    description="For a browser's `EventSource`, which cannot send an `Authorization` header: "
    f"a ticket valid {auth.TICKET_TTL_S:g} s for one `GET /events/stream?ticket=...`, acting "
    "as the principal that asked for it. The request needs the bearer token; no body.",
    access="read",
    responses={200: json_body("The ticket.", ex.TICKET)},
)
async def event_ticket(request: web.Request) -> web.Response:
    ticket = request.app[auth.TICKETS].issue(request[auth.PRINCIPAL])
    body = s.TicketResponse(ticket=ticket, expires_in_s=auth.TICKET_TTL_S)
    response = json_response(body)
    response.headers["Cache-Control"] = "no-store"
    return response


# The page's own files, each with its content type (nothing else is served from the package).
STATIC_FILES = {
    "dashboard.js": "application/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "swagger-init.js": "application/javascript; charset=utf-8",
}


async def static_file(request: web.Request) -> web.Response:
    """``GET /static/{name}``: a file of the dashboard or of the docs pages."""
    name = request.match_info["name"]
    if name not in STATIC_FILES:
        raise web.HTTPNotFound()
    body = (resources.files("queue_worker.http") / "static" / name).read_bytes()
    headers = {"Content-Type": STATIC_FILES[name], "Cache-Control": "no-cache"}
    return web.Response(body=body, headers=headers)


async def _close_streams(app: web.Application) -> None:
    """On shutdown, end the live streams instead of waiting for their clients."""
    for task in list(app[LIVE_STREAMS].tasks):
        task.cancel()


def register(app: web.Application, settings: Settings) -> None:
    """Add ``/``, ``/dashboard``, ``/events/stream`` and ``/events/ticket`` (see ``ROUTES``)
    to ``app``."""
    app[LIVE_STREAMS] = LiveStreams(settings.stream_max_clients, settings.stream_max_per_client)
    app.on_shutdown.append(_close_streams)
    ROUTES.register(app)
    app.router.add_get("/static/{name}", static_file)
