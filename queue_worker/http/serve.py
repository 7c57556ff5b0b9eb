"""Serving the worker: its listening sockets, and aiohttp's connection handler.

``queue-worker run`` binds the sockets first (:func:`listen`), so a port in use
fails before the application starts anything, then :func:`serve` runs the
application on them until SIGTERM or SIGINT. With ``TLS_CERT_FILE`` and
``TLS_KEY_FILE`` it serves HTTPS only (:func:`tls_context`, loaded before the
sockets are bound: a bad certificate or key stops start-up with one line).

A request aiohttp cannot parse (a request line or header field over the
limits, too many header fields, garbage) never reaches the application or its
middlewares: aiohttp answers it from ``RequestHandler.handle_error`` with a
text/plain body and logs the parser's traceback. :class:`JsonErrorHandler`
overrides that one method to answer like every other error of the API (JSON,
with 414 or 431 where they fit) and log one line; aiohttp has no other hook for
it (aio-libs/aiohttp#3287), so :func:`serve` creates the connection handlers
itself instead of ``web.run_app``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import ssl
from collections.abc import Awaitable, Sequence
from http import HTTPStatus

import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong

from queue_worker.errors import QueueWorkerError
from queue_worker.http.handlers import error_response

log = structlog.get_logger(__name__)

# aiohttp's parser limits; they differ, so a LineTooLong tells which one was passed.
MAX_REQUEST_LINE_BYTES = 8190
MAX_HEADER_FIELD_BYTES = 16384
MAX_HEADER_FIELDS = 128
KEEPALIVE_TIMEOUT_S = 75.0  # web.run_app's
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ListenError(QueueWorkerError):
    """The HTTP API's address cannot be listened on (in use, not local, unknown)."""


def listen(host: str, port: int, backlog: int = 128) -> list[socket.socket]:
    """Sockets listening on every address of ``host`` at ``port``; raise ListenError."""
    where = f"{host}:{port} (HOST, PORT)"
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {where}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(addresses):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # one socket per family, as asyncio does
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ListenError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    return sockets


class TlsError(QueueWorkerError):
    """The HTTP API's certificate or key cannot be used (the message names the variable)."""


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context (TLS 1.2 or later) with ``cert_file``'s certificate (chain) and
    ``key_file``'s key; raise TlsError naming the variable at fault."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ssl.create_default_context().load_verify_locations(cafile=cert_file)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(
            f"TLS_CERT_FILE: {cert_file!r} holds no usable PEM certificate: {_reason(exc)}"
        ) from None
    try:
        context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(
            f"TLS_KEY_FILE: {key_file!r} is not a PEM private key (unencrypted) of the "
            f"certificate in TLS_CERT_FILE: {_reason(exc)}"
        ) from None
    return context


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def _rejection(exc: HttpProcessingError) -> tuple[int, str]:
    """The status and detail for a request the parser refused."""
    if isinstance(exc, LineTooLong):
        if exc.args[1:2] == (MAX_REQUEST_LINE_BYTES,):
            return 414, f"the request line is longer than {MAX_REQUEST_LINE_BYTES} bytes"
        return 431, f"a header field is longer than {MAX_HEADER_FIELD_BYTES} bytes"
    if exc.message.startswith("Too many headers"):
        return 431, f"more than {MAX_HEADER_FIELDS} header fields"
    return 400, f"malformed HTTP request ({type(exc).__name__})"


class JsonErrorHandler(web.RequestHandler):
    """aiohttp's connection handler; requests it cannot parse get the API's JSON errors."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, HttpProcessingError):  # the client's fault: one line, no traceback
            if request.writer.output_size > 0:
                raise ConnectionError("a response is under way; cannot send an error")
            status, detail = _rejection(exc)
            # TLS or other non-HTTP traffic on the port is common noise (aiohttp's view too).
            emit = log.debug if isinstance(exc, BadHttpMethod) else log.info
            emit(
                "http_request_rejected",
                status=status,
                error=type(exc).__name__,
                remote=request.remote,
            )
        else:  # a crash or a timeout of our own: aiohttp logs it, with its traceback
            super().handle_error(request, status, exc, message)
            detail = None
        response = error_response(status, HTTPStatus(status).phrase, detail)
        response.force_close()
        return response


async def serve(
    app: web.Application,
    sockets: Sequence[socket.socket],
    *,
    shutdown_timeout_s: float,
    tls: ssl.SSLContext | None = None,
) -> None:
    """Run ``app`` on ``sockets`` (HTTPS with ``tls``) until SIGTERM or SIGINT, then stop
    accepting, let the requests under way finish (up to ``shutdown_timeout_s``) and clean
    the app up. A signal during start-up cancels the start."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stopping.set)
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, shutdown_timeout=shutdown_timeout_s
    )
    listeners: list[asyncio.Server] = []
    try:
        if not await _unless_stopped(runner.setup(), stopping):
            return
        server = runner.server
        assert server is not None

        def connection() -> JsonErrorHandler:
            return JsonErrorHandler(
                server,
                loop=loop,
                access_log=None,  # type: ignore[arg-type]  # None: no access log
                keepalive_timeout=KEEPALIVE_TIMEOUT_S,
                max_line_size=MAX_REQUEST_LINE_BYTES,
                max_field_size=MAX_HEADER_FIELD_BYTES,
                max_headers=MAX_HEADER_FIELDS,
            )

        for sock in sockets:
            listeners.append(await loop.create_server(connection, sock=sock, ssl=tls))
            host, port = sock.getsockname()[:2]
            log.info("http_listening", host=host, port=port, scheme="https" if tls else "http")
        await stopping.wait()
    finally:
        for listener in listeners:
            listener.close()
        await runner.cleanup()
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)


async def _unless_stopped(work: Awaitable[None], stopping: asyncio.Event) -> bool:
    """Await ``work``: True when it is done, False when ``stopping`` came first (and
    ``work`` was cancelled). Errors of ``work`` are raised."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return False
    task.result()
    return True
