"""The command line, as a user runs it: real processes, real signals."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import msgspec

from queue_worker.devstack.serve import free_port
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


def test_bad_setting_stops_start_up_naming_the_variable() -> None:
    result = run_cli("run", env={"EXECUTOR_COUNT": "lots"})
    assert result.returncode == 2
    assert "configuration error: EXECUTOR_COUNT" in result.stderr
    assert "Traceback" not in result.stderr


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
