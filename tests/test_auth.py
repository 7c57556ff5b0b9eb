"""Access control against a live worker: tokens, the loopback-only default, tickets for the
event stream, redacted payloads (stream, /status, logs) and the security headers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import msgspec
import pytest
import structlog
from aiohttp import web

from queue_worker.devstack.serve import Server
from queue_worker.http import auth
from queue_worker.http.app import create_app
from queue_worker.streams.events import TaskFailed
from tests.harness import Stack

READ_TOKEN = "read-token-0123456789abcdef"
OTHER_READ_TOKEN = "read-token-rotated-9876543210"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
TOKENS = {
    "api_token": (("reader", READ_TOKEN), ("", OTHER_READ_TOKEN)),
    "admin_token": (("boss", ADMIN_TOKEN),),
}
PROTECTED = [("GET", "/status"), ("GET", "/metrics"), ("GET", "/events/stream"),
             ("POST", "/events/ticket")]  # fmt: skip
OPEN = ["/health", "/health/live", "/dashboard", "/openapi.json", "/docs", "/redoc",
        "/static/dashboard.js"]  # fmt: skip
SECRET = "SECRET-MARKER-7f3a9c"  # in task code: must never show to a read token or in logs


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def non_loopback_address() -> str:
    """An address of this machine that is not loopback: a client bound to it and connecting
    to 127.0.0.1 is seen by the server as that address (a real non-loopback peer)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
        address = str(probe.getsockname()[0])
    except OSError as exc:
        pytest.fail(f"no non-loopback IPv4 address on this machine to test from: {exc}")
    finally:
        probe.close()
    if address.startswith("127."):
        pytest.fail(f"the only IPv4 address found is loopback ({address})")
    return address


@asynccontextmanager
async def client_from(address: str) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(local_addr=(address, 0))
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        yield http


async def call(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, dict[str, str], Any]:
    """Status, headers and body (JSON decoded when it is JSON); a stream is not read."""
    async with http.request(method, url, **kwargs) as resp:
        headers = dict(resp.headers)
        if resp.content_type == "text/event-stream":
            return resp.status, headers, None
        body = await resp.read()
        if resp.content_type == "application/json":
            return resp.status, headers, msgspec.json.decode(body)
        return resp.status, headers, body


async def sse_text(
    http: aiohttp.ClientSession, url: str, until: str, timeout_s: float = 20.0, **kwargs: Any
) -> str:
    """The text of an event stream, read until ``until`` shows up in it."""
    seen = ""
    async with http.get(url, **kwargs) as resp:
        assert resp.status == 200, await resp.text()
        async with asyncio.timeout(timeout_s):
            async for raw in resp.content:
                seen += raw.decode()
                if until in seen:
                    return seen
    raise AssertionError(f"{until!r} not in the stream: {seen[-2000:]}")


def events_of(text: str) -> list[dict[str, Any]]:
    return [
        json.loads(line[6:])["event"] for line in text.splitlines() if line.startswith("data: ")
    ]


# --- tokens ----------------------------------------------------------------------------------


async def test_protected_routes_need_a_token_and_open_ones_do_not(stack_factory) -> None:
    stack: Stack = await stack_factory(**TOKENS)
    assert stack.worker is not None
    base, http = stack.worker.url, stack.http
    for method, path in PROTECTED:
        for headers in ({}, bearer("wrong-token-0123456789abcdef"), {"Authorization": "Basic x"}):
            status, got, body = await call(http, method, base + path, headers=headers)
            assert status == 401, (method, path, headers)
            assert got["Content-Type"].startswith("application/json")
            assert got["WWW-Authenticate"].startswith("Bearer")
            assert body["status"] == 401 and "TOKEN" in body["detail"]
        for token in (READ_TOKEN, OTHER_READ_TOKEN, ADMIN_TOKEN):  # both read tokens work
            status, _, _ = await call(http, method, base + path, headers=bearer(token))
            assert status == 200, (method, path, token)
    for path in OPEN:
        status, _, _ = await call(http, "GET", base + path)
        assert status == 200, path
    status, _, body = await call(http, "GET", base + "/health/live")
    assert body == {"status": "alive", "reason": None}
    # /health tells a caller without read access its verdict alone, with the same status.
    status, _, body = await call(http, "GET", base + "/health")
    assert (status, body) == (200, {"status": "healthy"})
    status, _, body = await call(http, "GET", base + "/health", headers=bearer(READ_TOKEN))
    assert status == 200 and body["worker_id"] == "test-worker" and body["executors"]

    # Full payloads: the admin token only.
    stream = base + "/events/stream?last=0&payloads=1"
    status, _, body = await call(http, "GET", stream, headers=bearer(READ_TOKEN))
    assert status == 403 and "ADMIN_TOKEN" in body["detail"]
    assert (await call(http, "GET", stream, headers=bearer(ADMIN_TOKEN)))[0] == 200
    bad = base + "/events/stream?payloads=yes"
    assert (await call(http, "GET", bad, headers=bearer(ADMIN_TOKEN)))[0] == 400

    # METRICS_PUBLIC opens /metrics, and nothing else.
    await stack.stop_worker()
    await stack.start_worker(metrics_public=True)
    assert stack.worker is not None
    assert (await call(http, "GET", stack.worker.url + "/metrics"))[0] == 200
    assert (await call(http, "GET", stack.worker.url + "/status"))[0] == 401


async def test_the_principal_is_the_token_name(stack_factory) -> None:
    """An admin-only route (as admin actions will be) sees who acted: the token's name, or
    its kind and position for an unnamed one; a read token gets a 403."""
    stack: Stack = await stack_factory(
        start_worker=False,
        api_token=(("reader", READ_TOKEN), ("", OTHER_READ_TOKEN)),
        admin_token=(("", ADMIN_TOKEN),),
    )
    app = create_app(stack.settings)

    async def whoami(request: web.Request) -> web.Response:
        principal = request[auth.PRINCIPAL]
        return web.json_response({"name": principal.name, "role": principal.role})

    app.router.add_get("/_whoami", whoami)
    app[auth.ACCESS][whoami] = "admin"
    stack.worker = Server(app)
    await stack.worker.start()
    url = stack.worker.url + "/_whoami"
    assert (await call(stack.http, "GET", url))[0] == 401
    status, _, body = await call(stack.http, "GET", url, headers=bearer(READ_TOKEN))
    assert status == 403 and body["detail"] == auth.NEED_ADMIN
    status, _, body = await call(stack.http, "GET", url, headers=bearer(ADMIN_TOKEN))
    assert (status, body) == (200, {"name": "admin-1", "role": "admin"})
    app[auth.ACCESS][whoami] = "read"
    for token, name in ((READ_TOKEN, "reader"), (OTHER_READ_TOKEN, "api-2")):
        status, _, body = await call(stack.http, "GET", url, headers=bearer(token))
        assert (status, body) == (200, {"name": name, "role": "read"})


async def test_with_no_token_only_loopback_clients_read(stack_factory) -> None:
    stack: Stack = await stack_factory()
    assert stack.worker is not None
    base = stack.worker.url
    assert (await call(stack.http, "GET", base + "/status"))[0] == 200  # loopback
    async with client_from(non_loopback_address()) as outside:
        for method, path in PROTECTED:
            status, headers, body = await call(outside, method, base + path)
            assert status == 401, (method, path)
            assert headers["Content-Type"].startswith("application/json")
            assert "API_TOKEN" in body["detail"] and "AUTH_DISABLED" in body["detail"]
        for path in OPEN:
            assert (await call(outside, "GET", base + path))[0] == 200, path
        assert (await call(outside, "GET", base + "/health"))[2] == {"status": "healthy"}
    assert "worker_id" in (await call(stack.http, "GET", base + "/health"))[2]  # loopback

    # AUTH_DISABLED opens it to everyone, and says so at start.
    await stack.stop_worker()
    with structlog.testing.capture_logs() as logs:
        await stack.start_worker(auth_disabled=True)
    assert any(e["event"] == "auth_disabled" and e["log_level"] == "warning" for e in logs)
    assert stack.worker is not None
    async with client_from(non_loopback_address()) as outside:
        for method, path in PROTECTED:
            status, _, _ = await call(outside, method, stack.worker.url + path)
            assert status == 200, (method, path)


async def test_a_ticket_opens_the_event_stream_once(stack_factory) -> None:
    stack: Stack = await stack_factory(**TOKENS)
    assert stack.worker is not None
    base, http = stack.worker.url, stack.http
    status, headers, body = await call(
        http, "POST", base + "/events/ticket", headers=bearer(READ_TOKEN)
    )
    assert status == 200 and headers["Cache-Control"] == "no-store"
    ticket = body["ticket"]
    assert len(ticket) >= 32 and body["expires_in_s"] == auth.TICKET_TTL_S
    stream = f"{base}/events/stream?last=1&ticket={ticket}"
    assert "\ndata: " in await sse_text(http, stream, "\ndata: ")
    status, _, body = await call(http, "GET", stream)  # spent
    assert status == 401 and body["detail"] == auth.BAD_TICKET
    for bad in ("nope", "x" * 5000):
        assert (await call(http, "GET", f"{base}/events/stream?ticket={bad}"))[0] == 401
    # A ticket opens the stream only, and only as the one who asked for it.
    _, _, body = await call(http, "POST", base + "/events/ticket", headers=bearer(READ_TOKEN))
    status, _, _ = await call(http, "GET", f"{base}/status?ticket={body['ticket']}")
    assert status == 401
    _, _, body = await call(http, "POST", base + "/events/ticket", headers=bearer(READ_TOKEN))
    status, _, _ = await call(
        http, "GET", f"{stream.split('?')[0]}?payloads=1&ticket={body['ticket']}"
    )
    assert status == 403


# --- redaction -------------------------------------------------------------------------------


def digest_of(text: str) -> dict[str, Any]:
    data = text.encode()
    return {"redacted": True, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


async def test_payloads_are_redacted_for_a_read_token(stack_factory) -> None:
    stack: Stack = await stack_factory(max_attempts=2, eject_after_failures=0, **TOKENS)
    assert stack.worker is not None
    base, http = stack.worker.url, stack.http
    code = f"print('{SECRET}')"
    await stack.enqueue("good", code=code)
    await stack.wait_event("task.reported", eval_id="good")
    for i in range(len(stack.executors)):
        await stack.control(i, execute="error500")
    await stack.enqueue("bad", code=code)
    failed = (await stack.wait_event("task.failed", eval_id="bad")).event
    assert isinstance(failed, TaskFailed)
    assert "simulated internal server error" in failed.error  # kept whole in the stream
    await stack.inject(f'{{"eval_id": "odd", "code": 42, "note": "{SECRET}"}}'.encode())
    await stack.wait_event("task.rejected", eval_id="odd")

    url = base + "/events/stream?last=1000"
    text = await sse_text(http, url, '"task.rejected"', headers=bearer(READ_TOKEN))
    for hidden in (SECRET, "simulated output for", "simulated internal server error"):
        assert hidden not in text, hidden
    events = events_of(text)
    pulled = next(e for e in events if e["type"] == "task.pulled" and e["eval_id"] == "good")
    assert pulled["task"]["code"] == digest_of(code)
    assert pulled["task"]["language"] == "python" and pulled["code_bytes"] == len(code)
    completed = next(e for e in events if e["type"] == "task.completed")
    assert completed["result"]["status"] == "completed" and completed["result"]["exit_code"] == 0
    assert completed["result"]["output"] == digest_of("simulated output for good\n")
    retry = next(e for e in events if e["type"] == "task.retry_scheduled")
    assert retry["error"]["redacted"] is True
    failed_seen = next(e for e in events if e["type"] == "task.failed")
    assert failed_seen["error"] == digest_of(failed.error)
    assert all(a["error"]["redacted"] for a in failed_seen["attempts"])
    rejected = next(e for e in events if e["type"] == "task.rejected")
    assert rejected["excerpt"]["redacted"] is True

    # The admin token asks for them whole.
    full = await sse_text(http, url + "&payloads=1", '"task.rejected"', headers=bearer(ADMIN_TOKEN))
    assert SECRET in full and "simulated internal server error" in full
    # The status view carries none of them.
    for token in (READ_TOKEN, ADMIN_TOKEN):
        status, _, body = await call(http, "GET", base + "/status", headers=bearer(token))
        assert status == 200
        shown = json.dumps(body)
        assert SECRET not in shown and "simulated" not in shown


async def test_logs_carry_no_payload(stack_factory, tmp_path) -> None:
    """A worker process logging at DEBUG runs tasks whose code, error bodies and bad answers
    carry a marker; its log never shows the marker."""
    stack: Stack = await stack_factory(start_worker=False)
    await stack.enqueue("logged-ok", code=f"print('{SECRET}')")
    await stack.inject(f'{{"eval_id": "logged-odd", "code": 7, "note": "{SECRET}"}}'.encode())
    log_path = tmp_path / "worker.log"
    env = stack.process_env("log-worker", LOG_LEVEL="DEBUG", LOG_FORMAT="json")
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "queue_worker", "run", env=env,
            stdout=log_file, stderr=log_file,
        )  # fmt: skip
        try:
            await stack.wait_event("task.reported", 60, eval_id="logged-ok")
            await stack.wait_event("task.rejected", 60, eval_id="logged-odd")
            for i in range(len(stack.executors)):
                await stack.control(i, execute="error500")
            await stack.enqueue("logged-bad", code=f"print('{SECRET}')")
            await stack.wait_event("task.failed", 60, eval_id="logged-bad")
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 60)
    lines = log_path.read_text().splitlines()
    assert len(lines) > 10, lines
    assert not [line for line in lines if SECRET in line or "simulated internal" in line]


async def test_the_log_masks_payload_fields() -> None:
    """What a log call is given under a payload's name is logged as its digest."""
    from queue_worker.logs import redact_payloads

    event = redact_payloads(None, "info", {"event": "x", "code": SECRET, "eval_id": "e"})
    assert event == {"event": "x", "code": digest_of(SECRET), "eval_id": "e"}


# --- headers ---------------------------------------------------------------------------------


async def test_every_response_has_the_security_headers(stack_factory) -> None:
    stack: Stack = await stack_factory(**TOKENS)
    assert stack.worker is not None
    base = stack.worker.url
    cases: list[tuple[str, str, dict[str, str]]]
    cases = [("GET", p, {}) for p in [*OPEN, "/nowhere", "/status"]]
    cases += [("POST", "/status", {}), ("GET", "/status", bearer(READ_TOKEN))]
    cases += [("GET", "/events/stream?last=0", bearer(READ_TOKEN))]
    for method, path, headers in cases:
        _, got, _ = await call(stack.http, method, base + path, headers=headers)
        csp = got["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self';" in csp, path
        assert "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
        assert got["X-Content-Type-Options"] == "nosniff"
        assert got["Referrer-Policy"] == "no-referrer"
    _, _, page = await call(stack.http, "GET", base + "/dashboard")
    assert b"<script>" not in page and b"<style>" not in page  # no inline script or style
    assert b'src="static/dashboard.js"' in page


def test_tickets_expire_and_are_bounded() -> None:
    principal = auth.Principal("reader", "read")
    expired = auth.Tickets(ttl_s=0.0)
    assert expired.redeem(expired.issue(principal)) is None  # valid for no time at all
    tickets = auth.Tickets(limit=2)
    first, second, third = (tickets.issue(principal) for _ in range(3))
    assert len(tickets.issued) == 2 and tickets.redeem(first) is None  # the oldest went
    assert tickets.redeem(third) == principal and tickets.redeem(third) is None
    assert tickets.redeem(second) == principal
