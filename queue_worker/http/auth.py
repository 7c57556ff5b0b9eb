"""Who may call what: bearer tokens, the loopback default, and the security headers.

Every operation declares its access (:class:`queue_worker.openapi.operations.Operation`):
``open`` (``/health``, ``/health/live``, the pages and the documentation), ``read``
(``/status``, ``/events/stream``, ``POST /events/ticket``), ``metrics`` (``read`` unless
``METRICS_PUBLIC``) or ``admin``. :func:`authenticate` resolves who asks:

* ``Authorization: Bearer <token>`` matching an ``ADMIN_TOKEN`` (admin, who also reads) or
  an ``API_TOKEN`` (read). Every configured token is compared, in constant time
  (``hmac.compare_digest``), so the time taken tells nothing of which one nearly matched.
  A wrong token is a 401, wherever it comes from.
* No credentials: with ``AUTH_DISABLED``, anyone reads. With no token configured at all,
  a client connected from a loopback address reads (the TCP peer, never a header such as
  ``X-Forwarded-For``); any other client gets a JSON 401 telling how to set a token.

The principal is put on the request under :data:`PRINCIPAL`: its name (the ``name:`` of
the token, ``api-<n>`` / ``admin-<n>`` when it has none, ``loopback`` or ``anonymous``)
is who acted for audit events, and its role says whether it may see full payloads.

:func:`security_headers` adds ``Content-Security-Policy`` (no inline script anywhere;
``/docs`` and ``/redoc`` allow the inline styles and blob workers their viewers need),
``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer`` and
``X-Frame-Options: DENY`` to every response the app sends.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import msgspec
import structlog
from aiohttp import hdrs, web

from queue_worker.config import Settings
from queue_worker.http.state import SETTINGS
from queue_worker.openapi.operations import Access, Operation
from queue_worker.openapi.schemas import ErrorResponse

Role = Literal["read", "admin"]
SET_TOKEN_HINT = (
    "no API token is configured, so only loopback clients may read this; set API_TOKEN "
    "(or API_TOKEN_FILE) and send 'Authorization: Bearer <token>', or set AUTH_DISABLED=true"
)
NEED_TOKEN = "send 'Authorization: Bearer <token>' with an API_TOKEN or ADMIN_TOKEN"
BAD_TOKEN = "the bearer token is not a configured API_TOKEN or ADMIN_TOKEN"
NEED_ADMIN = "an ADMIN_TOKEN is needed for this"
BAD_TICKET = "the ticket is unknown, used or expired; POST /events/ticket for a new one"
CHALLENGE = 'Bearer realm="queue-worker"'

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
# Swagger UI and ReDoc set inline styles, ReDoc runs a worker from a blob: still no inline
# script.
VIEWER_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
VIEWER_PATHS = ("/docs", "/redoc")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts as."""

    name: str
    role: Role

    @property
    def admin(self) -> bool:
        return self.role == "admin"


PRINCIPAL = web.RequestKey("principal", Principal)
LOOPBACK = Principal("loopback", "read")
ANONYMOUS = Principal("anonymous", "read")


class Tokens:
    """Every configured token with the principal it stands for."""

    def __init__(self, settings: Settings) -> None:
        self.known: list[tuple[bytes, Principal]] = []
        for role, given in (
            ("admin", (*settings.admin_token, *settings.admin_token_file)),
            ("read", (*settings.api_token, *settings.api_token_file)),
        ):
            prefix = "api" if role == "read" else role
            for number, (name, token) in enumerate(given, 1):
                principal = Principal(name or f"{prefix}-{number}", role)  # type: ignore[arg-type]
                self.known.append((_fingerprint(token.encode()), principal))

    def __bool__(self) -> bool:
        return bool(self.known)

    def resolve(self, presented: bytes) -> Principal | None:
        """The principal of ``presented``; every token is compared, each in constant time
        (their SHA-256 digests are: equal lengths, so not even a length is told)."""
        fingerprint = _fingerprint(presented)
        found: Principal | None = None
        for known, principal in self.known:
            if hmac.compare_digest(known, fingerprint) and found is None:
                found = principal
        return found


def _fingerprint(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


TOKENS = web.AppKey("tokens", Tokens)


def access_table(operations: Iterable[Operation]) -> dict[object, Access]:
    """Each declared handler's access."""
    return {op.handler: op.access for op in operations}


ACCESS: web.AppKey[dict[object, Access]] = web.AppKey("access")


def is_loopback(peer: object) -> bool:
    """Whether a transport's ``peername`` is a loopback address (IPv4-mapped too)."""
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return False
    try:
        address = ipaddress.ip_address(peer[0].split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def error_response(status: int, error: str, detail: str) -> web.Response:
    """The API's JSON error (as ``handlers.error_response``, which this module cannot import:
    the handlers ask it who may read)."""
    body = msgspec.json.encode(ErrorResponse(error=error, status=status, detail=detail))
    return web.Response(body=body, status=status, content_type="application/json")


def _unauthorized(detail: str) -> web.Response:
    response = error_response(401, "Unauthorized", detail)
    response.headers[hdrs.WWW_AUTHENTICATE] = CHALLENGE
    return response


def _bearer(request: web.Request) -> bytes | None:
    """The token of an ``Authorization: Bearer`` header; ``b""`` for any other scheme."""
    header = request.headers.get(hdrs.AUTHORIZATION)
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return b""
    return token.strip().encode("utf-8", "surrogateescape")


def principal_of(request: web.Request) -> Principal | web.Response:
    """Who ``request`` acts as, or the 401 to answer it with."""
    app = request.app
    tokens, settings = app[TOKENS], app[SETTINGS]
    presented = _bearer(request)
    ticket = request.query.get("ticket")
    if presented is None and ticket is not None and request.path in TICKET_PATHS:
        redeemed = app[TICKETS].redeem(ticket) if len(ticket) <= MAX_TICKET_CHARS else None
        return redeemed if redeemed is not None else _unauthorized(BAD_TICKET)
    if presented is not None:
        principal = tokens.resolve(presented) if presented else None
        return principal if principal is not None else _unauthorized(BAD_TOKEN)
    if settings.auth_disabled:
        return ANONYMOUS
    if not tokens:
        transport = request.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return LOOPBACK if is_loopback(peer) else _unauthorized(SET_TOKEN_HINT)
    return _unauthorized(NEED_TOKEN)


def access_of(request: web.Request) -> Access:
    access: Access = request.app[ACCESS].get(request.match_info.handler, "open")
    if access == "metrics":
        return "open" if request.app[SETTINGS].metrics_public else "read"
    return access


@web.middleware
async def authenticate(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Answer 401 (or 403) before a protected handler runs; put the principal on the request."""
    access = access_of(request)
    if access == "open":
        return await handler(request)
    found = principal_of(request)
    if isinstance(found, web.Response):
        return found
    if access == "admin" and not found.admin:
        return error_response(403, "Forbidden", NEED_ADMIN)
    request[PRINCIPAL] = found
    return await handler(request)


def wants_payloads(request: web.Request) -> bool:
    """Whether the request asks for full payloads (``?payloads=1``); only an admin may:
    anyone else asking is refused (403) rather than silently given less."""
    raw = request.query.get("payloads", "0")
    if raw not in ("0", "1"):
        raise web.HTTPBadRequest(text="payloads must be 1 or 0")
    if raw == "0":
        return False
    principal = request.get(PRINCIPAL)
    if principal is None or not principal.admin:
        raise web.HTTPForbidden(text="full payloads (payloads=1) need an ADMIN_TOKEN")
    return True


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the security headers, on every response."""
    viewer = request.path in VIEWER_PATHS
    response.headers.setdefault("Content-Security-Policy", VIEWER_CSP if viewer else CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Frame-Options", "DENY")


# --- single-use tickets for the event stream (an EventSource cannot send headers) --------

TICKET_TTL_S = 30.0
MAX_TICKETS = 256
MAX_TICKET_CHARS = 64
TICKET_PATHS = ("/events/stream",)


class Tickets:
    """Short-lived single-use tickets, each standing for the principal that asked for it."""

    def __init__(self, ttl_s: float = TICKET_TTL_S, limit: int = MAX_TICKETS) -> None:
        self.ttl_s, self.limit = ttl_s, limit
        self.issued: dict[str, tuple[float, Principal]] = {}

    def _expire(self, now: float) -> None:
        for ticket in [t for t, (until, _) in self.issued.items() if until <= now]:
            del self.issued[ticket]

    def issue(self, principal: Principal) -> str:
        now = time.monotonic()
        self._expire(now)
        while len(self.issued) >= self.limit:  # the oldest go first
            del self.issued[next(iter(self.issued))]
        ticket = secrets.token_urlsafe(32)
        self.issued[ticket] = (now + self.ttl_s, principal)
        return ticket

    def redeem(self, ticket: str) -> Principal | None:
        """The ticket's principal, once; None when unknown, used or expired."""
        self._expire(time.monotonic())
        found = self.issued.pop(ticket, None)
        return None if found is None else found[1]


TICKETS = web.AppKey("tickets", Tickets)


def setup(app: web.Application, settings: Settings, operations: Iterable[Operation]) -> None:
    """Tokens, the access table, tickets and the security headers for ``app``."""
    app[TOKENS] = Tokens(settings)
    app[ACCESS] = access_table(operations)
    app[TICKETS] = Tickets()
    app.on_response_prepare.append(security_headers)
    log = structlog.get_logger(__name__)  # once per app: as logging is configured now
    if settings.auth_disabled:
        log.warning(
            "auth_disabled",
            detail="AUTH_DISABLED=true: anyone who reaches the HTTP API may read status, "
            "metrics and the event stream",
        )
    elif not app[TOKENS]:
        log.info("auth_loopback_only", detail=SET_TOKEN_HINT)
