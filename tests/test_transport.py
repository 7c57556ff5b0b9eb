"""Transport limits and security against live servers: live stream slots (in all, per
client address, freed as soon as a client goes away), the request body cap (413), HTTPS
with a certificate the test makes, rediss:// to a TLS-only redis-server with the test's CA."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from queue_worker.config import Settings
from queue_worker.devstack.serve import Server, free_port
from queue_worker.errors import ConfigError
from queue_worker.http import dashboard
from queue_worker.http.app import create_app
from queue_worker.http.dashboard import LIVE_STREAMS, RETRY_AFTER_S
from queue_worker.http.state import ROUTER
from queue_worker.openapi.spec import build_spec
from tests.harness import Stack, eventually, spawn_worker
from tests.tls import Certs, TlsRedis, make_certs


def _client(address: str) -> aiohttp.ClientSession:
    """A session whose connections come from ``address`` (any of 127.0.0.0/8 is loopback)."""
    connector = aiohttp.TCPConnector(local_addr=(address, 0), force_close=True)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30))


async def _open(session: aiohttp.ClientSession, url: str) -> aiohttp.ClientResponse:
    resp = await session.get(url, params={"last": "0"})
    if resp.status == 200:
        assert await resp.content.readline() == b"retry: 2000\n"  # the stream is under way
    return resp


async def _refused(resp: aiohttp.ClientResponse, setting: str) -> None:
    assert (resp.status, resp.content_type) == (503, "application/json")
    assert resp.headers["Retry-After"] == str(RETRY_AFTER_S)
    body = msgspec.json.decode(await resp.read())
    assert body["status"] == 503 and setting in body["detail"], body
    resp.release()


async def test_live_streams_are_limited_in_all_and_per_address_and_freed_at_once(
    stack_factory,
) -> None:
    stack: Stack = await stack_factory(stream_max_clients=3, stream_max_per_client=2)
    assert stack.worker is not None
    url = f"{stack.worker.url}/events/stream"
    live = stack.worker.app[LIVE_STREAMS]
    async with AsyncExitStack() as sessions:
        one, two, three = [
            await sessions.enter_async_context(_client(f"127.0.0.{i}")) for i in (1, 2, 3)
        ]
        first, second = await _open(one, url), await _open(one, url)
        assert (first.status, second.status) == (200, 200)
        await _refused(await _open(one, url), "STREAM_MAX_PER_CLIENT")
        other = await _open(two, url)
        assert other.status == 200 and live.count() == 3
        await _refused(await _open(three, url), "STREAM_MAX_CLIENTS")
        assert (live.count("127.0.0.1"), live.count("127.0.0.2")) == (2, 1)

        # A client that goes away (its connection closed; nothing is appended meanwhile, so
        # no write would find out) frees its slot long before the next heartbeat (15 s).
        first.close()
        await eventually(lambda: live.count("127.0.0.1") == 1, timeout_s=5)
        again = await _open(one, url)
        assert again.status == 200 and live.count() == 3
        for resp in (second, other, again):
            resp.close()
        # The handlers themselves end too (their blocked reads cancelled), not only the
        # accounting: nothing is held for a client that has gone.
        await eventually(lambda: not live.tasks and live.count() == 0, timeout_s=5)
        # The freed slots serve again.
        fresh = await _open(three, url)
        assert fresh.status == 200
        fresh.close()


def test_stream_limits_are_settings_checked_together() -> None:
    s = Settings.from_env({"STREAM_MAX_CLIENTS": "2"})
    assert (s.stream_max_clients, s.stream_max_per_client) == (2, 2)  # the default follows
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"STREAM_MAX_CLIENTS": "2", "STREAM_MAX_PER_CLIENT": "3"})
    ((variable, problem),) = caught.value.problems
    assert variable == "STREAM_MAX_PER_CLIENT" and "STREAM_MAX_CLIENTS (2)" in problem


async def test_a_request_body_over_the_cap_gets_a_json_413(stack_factory) -> None:
    stack: Stack = await stack_factory(start_worker=False)
    app = create_app(stack.settings.with_(http_max_body_bytes=4096))

    async def echo(request: web.Request) -> web.Response:  # a route that reads its body
        return web.Response(body=await request.read())

    app.router.add_post("/_echo", echo)
    stack.worker = Server(app)
    await stack.worker.start()
    base = stack.worker.url

    async def chunks(size: int) -> AsyncIterator[bytes]:  # no Content-Length: chunked
        for _ in range(size // 1024):
            yield b"x" * 1024

    async def post(path: str, data: object) -> tuple[int, dict[str, Any] | bytes]:
        async with stack.http.post(base + path, data=data) as resp:
            body = await resp.read()
            if resp.content_type == "application/json":
                return resp.status, msgspec.json.decode(body)
            return resp.status, body

    detail = "the request body is larger than 4096 bytes (HTTP_MAX_BODY_BYTES)"
    for path, data in [
        ("/health", b"x" * 5000),  # Content-Length over the cap: refused before routing
        ("/_echo", b"x" * 5000),
        ("/_echo", chunks(8192)),  # read past the cap
    ]:
        status, body = await post(path, data)
        assert status == 413 and isinstance(body, dict), (path, status, body)
        assert (body["status"], body["detail"]) == (413, detail)
    assert await post("/_echo", b"x" * 4096) == (200, b"x" * 4096)  # at the cap: taken
    assert (await post("/_echo", chunks(4096)))[0] == 200


def test_the_openapi_document_lists_413_where_a_body_is_taken() -> None:
    spec = build_spec([dashboard.ROUTES])
    ref = spec["paths"]["/events/ticket"]["post"]["responses"]["413"]["$ref"]
    assert ref == "#/components/responses/ContentTooLarge"
    assert spec["components"]["responses"]["ContentTooLarge"]["content"]["application/json"]
    gets = [path["get"] for path in spec["paths"].values() if "get" in path]
    assert gets and all("413" not in op["responses"] for op in gets)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("tls"))


def _command(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``queue-worker ARGS`` run to its end."""
    return subprocess.run(
        [sys.executable, "-m", "queue_worker", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``queue-worker run`` expected to stop at start-up (nothing needs to answer)."""
    return _command(["run"], {"HOST": "127.0.0.1", "PORT": "0", **env})


def test_tls_settings_fail_fast_naming_the_variable(certs: Certs, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        # (environment, exit code, the variable the one line names)
        ({"TLS_CERT_FILE": str(certs.cert)}, 2, "TLS_KEY_FILE"),
        ({"TLS_KEY_FILE": str(certs.key)}, 2, "TLS_KEY_FILE"),
        ({"TLS_CERT_FILE": str(tmp_path / "none.pem"), "TLS_KEY_FILE": str(certs.key)},
         2, "TLS_CERT_FILE"),
        ({"TLS_CERT_FILE": str(garbage), "TLS_KEY_FILE": str(certs.key)}, 1, "TLS_CERT_FILE"),
        ({"TLS_CERT_FILE": str(certs.cert), "TLS_KEY_FILE": str(garbage)}, 1, "TLS_KEY_FILE"),
        # a key that is not the certificate's
        ({"TLS_CERT_FILE": str(certs.cert), "TLS_KEY_FILE": str(certs.client_key)},
         1, "TLS_KEY_FILE"),
    ]  # fmt: skip
    for env, code, variable in cases:
        done = _run(env)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == code and len(lines) == 1, (env, done.stderr)
        assert variable in lines[0] and "Traceback" not in done.stderr, (env, lines)


async def test_the_api_is_served_over_https(stack_factory, certs: Certs) -> None:
    stack: Stack = await stack_factory(start_worker=False)
    port = free_port()
    env = stack.process_env(
        "https-worker",
        PORT=str(port),
        TLS_CERT_FILE=str(certs.cert),
        TLS_KEY_FILE=str(certs.key),
    )
    process = await spawn_worker(env)
    try:
        url = f"https://127.0.0.1:{port}"

        async def live() -> bool:
            try:
                async with stack.http.get(f"{url}/health/live", ssl=certs.client_context()) as r:
                    return r.status == 200 and (await r.json())["status"] == "alive"
            except aiohttp.ClientConnectionError:
                assert process.returncode is None, "the worker exited"
                return False

        await eventually(live, timeout_s=30, interval_s=0.1)
        assert process.returncode is None
        # A client that does not trust the test's CA is refused; plain HTTP gets no answer.
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with stack.http.get(f"{url}/health/live", ssl=ssl.create_default_context()):
                pass
        with pytest.raises(aiohttp.ClientError):
            async with stack.http.get(f"http://127.0.0.1:{port}/health/live") as plain:
                await plain.read()
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 30) == 0


@pytest.fixture(scope="module")
def tls_redis(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    server = TlsRedis(certs, tmp_path_factory.mktemp("tls-redis")).start()
    yield server
    server.stop()


async def test_rediss_with_the_tests_ca_and_a_client_certificate(
    tls_redis: TlsRedis, certs: Certs, stack_factory
) -> None:
    """Every client of the worker (the store, the projectors, the wake-up subscription) and
    the stream commands talk to a TLS-only Redis that wants a client certificate."""
    files = {
        "redis_ca_file": str(certs.ca),
        "redis_cert_file": str(certs.client_cert),
        "redis_key_file": str(certs.client_key),
    }
    stack: Stack = await stack_factory(redis=tls_redis.url, **files)
    assert stack.worker is not None
    await stack.enqueue("over-tls")
    await stack.wait_event("task.reported", eval_id="over-tls")
    await stack.wait_messages(1)  # published by the publisher, heard by the test over TLS
    router = stack.worker.app[ROUTER]

    async def woken() -> bool:
        await stack.redis.publish("evaluation:queued", "{}")  # type: ignore[union-attr]
        return router.wakeups > 0

    await eventually(woken, interval_s=0.1)

    env = {"REDIS_URL": tls_redis.url, "STREAM_PREFIX": stack.prefix}
    env |= {name.upper(): path for name, path in files.items()}
    done = _command(["pause", "--reason", "over tls"], env)  # an operator action, appended
    assert done.returncode == 0, done.stderr
    done = _command(["stream-info", "--json"], env)
    assert done.returncode == 0, done.stderr
    assert msgspec.json.decode(done.stdout)["length"] == len(await stack.entries())
    # Without the CA the server is not trusted: one line, exit 1.
    del env["REDIS_CA_FILE"]
    done = _command(["stream-info"], env)
    (line,) = done.stderr.strip().splitlines()
    assert done.returncode == 1 and "(REDIS_URL)" in line and "certificate" in line, line
