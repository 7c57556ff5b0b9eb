"""The command line, as a user runs it: real processes, real signals."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from pathlib import Path

import aiohttp
import msgspec
import pytest

from queue_worker.devstack.serve import free_port
from queue_worker.streams.keys import Keys
from tests.harness import Stack, eventually

CLI = [sys.executable, "-m", "queue_worker"]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def worker_env(stack: Stack, **extra: str) -> dict[str, str]:
    return stack.process_env("cli-worker", LOG_FORMAT="json", **extra)


def test_help_lists_commands_and_settings() -> None:
    out = run_cli("--help").stdout
    for word in ("run", "demo", "audit", "devstack", "QUEUE_SERVICE_URL", "EXECUTOR_CAPACITY"):
        assert word in out
    assert "--port" in run_cli("run", "--help").stdout


def test_demo_rejects_arguments_it_cannot_run_with() -> None:
    for option, value in [
        ("--capacity", "0"),
        ("--tasks", "0"),
        ("--tasks", "many"),
        ("--latency-ms", "-1"),
        ("--latency-ms", "nan"),
    ]:
        result = run_cli("demo", option, value, timeout=30)
        assert result.returncode == 2, (option, value, result.stderr)
        assert f"argument {option}: expected" in result.stderr and repr(value) in result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""


def test_bad_setting_stops_start_up_naming_the_variable() -> None:
    result = run_cli("run", env={"EXECUTOR_COUNT": "lots"})
    assert result.returncode == 2
    assert "configuration error: EXECUTOR_COUNT" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_redis_url_with_a_bad_port_is_a_configuration_error() -> None:
    for command in (["run"], ["audit", "x"], ["stream-info"]):
        result = run_cli(*command, env={"REDIS_URL": "redis://:hunter2@redis:notaport/0"})
        assert result.returncode == 2, (command, result.stderr)
        assert "configuration error: REDIS_URL" in result.stderr
        assert "hunter2" not in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.splitlines()) == 1


def test_unreachable_redis_fails_fast_with_a_clear_message() -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    result = run_cli("run", "--port", str(free_port()), env={"REDIS_URL": url})
    assert result.returncode == 1
    assert "cannot reach Redis" in result.stderr and "REDIS_URL" in result.stderr
    assert "hunter2" not in result.stderr and "Traceback" not in result.stderr


async def test_run_routes_tasks_and_stops_gracefully_on_sigterm(stack_factory) -> None:
    stack: Stack = await stack_factory(start_worker=False, api_key="KEY-do-not-log")
    port = free_port()
    env = worker_env(stack, QUEUE_API_KEY="KEY-do-not-log", LOG_LEVEL="DEBUG")
    proc = await asyncio.create_subprocess_exec(
        *CLI, "run", "--port", str(port), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await stack.enqueue_many(10)
        await stack.wait_terminal(10, timeout_s=30)
        await stack.wait_messages(10)
        async with stack.http.get(f"http://127.0.0.1:{port}/status") as resp:
            body = msgspec.json.decode(await resp.read())
        assert body["worker_id"] == "cli-worker"
        await eventually(lambda: _reported(stack, port, 10))
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    assert b"KEY-do-not-log" not in stderr
    assert b'"event": "task_completed"' in stderr or b'"event":"task_completed"' in stderr
    stopped = await stack.wait_event("worker.stopped")
    assert stopped.worker_id == "cli-worker"


async def test_a_port_in_use_fails_before_anything_starts(stack_factory) -> None:
    stack: Stack = await stack_factory(start_worker=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = worker_env(stack, HOSTNAME="ghost-worker")
        result = await asyncio.to_thread(run_cli, "run", "--port", str(port), env=env)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"queue-worker: cannot listen on 127.0.0.1:{port} (HOST, PORT): ")
    assert not [e for e in await stack.entries() if e.worker_id == "ghost-worker"]
    assert not await stack.redis.exists(Keys(stack.prefix).alive("ghost-worker"))


async def test_sigterm_during_start_up_stops_it(stack_factory) -> None:
    stack: Stack = await stack_factory(start_worker=False)
    with socket.socket() as silent:  # a "Redis" that takes connections and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.setblocking(False)
        redis_url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        env = worker_env(stack, REDIS_URL=redis_url, HOSTNAME="stopped-early")
        proc = await asyncio.create_subprocess_exec(
            *CLI, "run", "--port", str(free_port()), env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        connection, _ = await asyncio.wait_for(loop.sock_accept(silent), 30)
        with connection:  # the worker waits for Redis's answer: it is starting
            proc.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, stderr
    assert b"Traceback" not in stderr


async def send_raw(port: int, request: bytes) -> tuple[int, str, bytes]:
    """``request`` as bytes on a fresh connection: the answer's status, Content-Type, body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(), 10)  # the server closes after an error
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers.get("Content-Type", ""), body


async def test_requests_it_cannot_parse_get_json_errors_and_one_log_line(stack_factory) -> None:
    stack: Stack = await stack_factory(start_worker=False)
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *CLI, "run", "--port", str(port), env=worker_env(stack, LOG_LEVEL="DEBUG"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    many_fields = b"".join(b"X-%d: 1\r\n" % i for i in range(200))
    cases = [
        (b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: w\r\n\r\n", 414),
        (b"GET /health HTTP/1.1\r\nHost: w\r\nX-Big: " + b"b" * 100_000 + b"\r\n\r\n", 431),
        (b"GET /health HTTP/1.1\r\nHost: w\r\n" + many_fields + b"\r\n", 431),
        (b"GET /health HTTP/1.1\r\nHost: w\r\nno colon here\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 TLS on a plain port\r\n\r\n", 400),
    ]
    try:
        await eventually(lambda: _answers(stack, port))
        for request, expected in cases:
            status, content_type, body = await send_raw(port, request)
            assert (status, content_type) == (expected, "application/json"), request[:40]
            error = msgspec.json.decode(body)
            assert error["status"] == expected and error["error"] == HTTPStatus(expected).phrase
            assert error["detail"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    lines = stderr.decode().splitlines()
    logged = [msgspec.json.decode(line) for line in lines]  # every line a JSON event
    rejected = [e for e in logged if e["event"] == "http_request_rejected"]
    assert [e["status"] for e in rejected] == [expected for _, expected in cases]


async def _answers(stack: Stack, port: int) -> bool:
    try:
        async with stack.http.get(f"http://127.0.0.1:{port}/health") as resp:
            return resp.status in (200, 503)
    except aiohttp.ClientConnectionError:
        return False


async def _reported(stack: Stack, port: int, n: int) -> bool:
    async with stack.http.get(f"http://127.0.0.1:{port}/status") as resp:
        body = msgspec.json.decode(await resp.read())
    return bool(body["counters"]["reported"] == n)


async def test_audit_prints_an_evaluations_history(stack_factory) -> None:
    stack: Stack = await stack_factory()
    await stack.enqueue("audited")
    await stack.wait_event("task.reported", eval_id="audited")
    env = worker_env(stack)
    result = await asyncio.to_thread(run_cli, "audit", "audited", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "history of evaluation audited (5 events)"
    steps = [
        "task.pulled",
        "executor.selected",
        "task.dispatched",
        "task.completed",
        "task.reported",
    ]
    assert [next(s for s in steps if f" {s} " in line) for line in lines[1:]] == steps
    assert "completed, HTTP 200" in lines[-1]
    as_json = await asyncio.to_thread(run_cli, "audit", "audited", "--json", env=env)
    entries = msgspec.json.decode(as_json.stdout)
    assert [e["event"]["type"] for e in entries] == steps
    assert all(e["event"]["eval_id"] == "audited" for e in entries)
    missing = await asyncio.to_thread(run_cli, "audit", "never-seen", env=env)
    assert missing.returncode == 1 and "no events" in missing.stdout


def test_audit_with_redis_down_says_so() -> None:
    result = run_cli("audit", "x", env={"REDIS_URL": f"redis://127.0.0.1:{free_port()}"})
    assert result.returncode == 1
    assert "cannot reach Redis" in result.stderr and "Traceback" not in result.stderr


# --- the demo and its private redis-server ---------------------------------------------------


def redis_servers_on(port: int) -> list[int]:
    """Pids of the live redis-server processes on ``port`` (redis-server rewrites its
    command line into a title such as ``/usr/bin/redis-server 127.0.0.1:6379``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            words = re.split(rb"[\0 ]+", (proc / "cmdline").read_bytes())
        except OSError:
            continue  # gone meanwhile
        on_port = f"127.0.0.1:{port}".encode() in words or (
            b"--port" in words and str(port).encode() in words
        )
        if words[0].endswith(b"redis-server") and on_port:
            pids.append(int(proc.name))
    return pids


async def start_demo() -> tuple[asyncio.subprocess.Process, int]:
    """A running ``queue-worker demo`` routing its tasks, and its redis-server's port."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    demo = await asyncio.create_subprocess_exec(
        *CLI, "demo", "--tasks", "2000", "--latency-ms", "100", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert demo.stdout is not None
    port = 0
    async with asyncio.timeout(60):
        while not (line := (await demo.stdout.readline()).decode()).startswith("enqueued"):
            assert line, "the demo ended before it enqueued its tasks"
            if match := re.match(r"redis-server \S+ on redis://127\.0\.0\.1:(\d+)/", line):
                port = int(match[1])
    assert port and redis_servers_on(port)
    return demo, port


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_demo_stopped_by_a_signal_stops_its_redis_server(signum: int) -> None:
    demo, port = await start_demo()
    try:
        demo.send_signal(signum)
        _, stderr = await asyncio.wait_for(demo.communicate(), 60)
        assert demo.returncode == 128 + signum, stderr
        assert f"demo stopped by {signal.Signals(signum).name}" in stderr.decode()
        assert b"Traceback" not in stderr
        assert redis_servers_on(port) == []  # stopped and reaped before the demo exited
    finally:
        _kill_leftovers(demo, port)


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
async def test_demo_killed_takes_its_redis_server_along() -> None:
    demo, port = await start_demo()
    try:
        demo.kill()
        await asyncio.wait_for(demo.wait(), 30)
        await eventually(lambda: redis_servers_on(port) == [], timeout_s=30)
    finally:
        _kill_leftovers(demo, port)


def _kill_leftovers(demo: asyncio.subprocess.Process, port: int) -> None:
    if demo.returncode is None:
        demo.kill()
    for pid in redis_servers_on(port):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
async def test_demo_keep_leaves_the_stack_running_until_ctrl_c() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    demo = await asyncio.create_subprocess_exec(
        *CLI, "demo", "--tasks", "3", "--latency-ms", "10", "--keep", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert demo.stdout is not None
    port, dashboard, token = 0, "", ""
    try:
        async with asyncio.timeout(90):
            while not dashboard:
                line = (await demo.stdout.readline()).decode()
                assert line, "the demo ended before it printed the dashboard's address"
                if match := re.match(r"redis-server \S+ on redis://127\.0\.0\.1:(\d+)/", line):
                    port = int(match[1])
                if match := re.match(r"dashboard (\S+)/dashboard \(sign in with (\S+)\)", line):
                    dashboard, token = match[1], match[2]
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(headers=headers) as http:

            async def completed() -> int:
                async with http.get(f"{dashboard}/status") as resp:
                    assert resp.status == 200
                    return int((await resp.json())["counters"]["completed"])

            first = await completed()
            await eventually(lambda: _more(completed, first), timeout_s=30)  # the trickle runs
        demo.send_signal(signal.SIGINT)
        _, stderr = await asyncio.wait_for(demo.communicate(), 60)
        assert demo.returncode == 0, stderr  # Ctrl+C is how --keep ends
        assert b"Traceback" not in stderr
        assert redis_servers_on(port) == []
    finally:
        _kill_leftovers(demo, port)


async def _more(completed: Callable[[], Awaitable[int]], than: int) -> bool:
    return await completed() > than
