"""The Redis ACL user of the README, on a private redis-server: the worker, its projectors
and the stream commands need no more (Redis logs no refusal), and without a permission
they fail loudly with one line naming it, never by losing work."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from queue_worker.devstack.otlp import OTLP_RECEIVER, create_otlp_app
from queue_worker.devstack.redis import RedisServer
from queue_worker.devstack.serve import Server
from queue_worker.http.state import ROUTER
from tests.harness import Stack, eventually

README = Path(__file__).parents[1] / "README.md"
PASSWORD = "acl-test-password"


def documented_acl(prefix: str, user: str) -> list[str]:
    """The README's ``ACL SETUSER`` line for ``user`` and ``prefix``, as arguments."""
    block = re.search(r"<!-- acl-user -->\s*```\s*(.+?)\s*```", README.read_text(), re.S)
    assert block is not None, "README: no <!-- acl-user --> block"
    (line,) = block.group(1).strip().splitlines()
    args = shlex.split(line)
    assert args[:3] == ["ACL", "SETUSER", "queue-worker"] and ">CHANGE-ME" in args
    return [
        "ACL", "SETUSER", user,
        *(
            f">{PASSWORD}" if a == ">CHANGE-ME" else a.replace("{queue-worker}", f"{{{prefix}}}")
            for a in args[3:]
        ),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisServer]:
    """A redis-server of this module's own: its ACL users and log are the tests'."""
    with RedisServer() as server:
        yield server


@pytest.fixture
async def admin(acl_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(acl_server.url)
    await _redis(client, "ACL", "LOG", "RESET")
    yield client
    await client.aclose()


async def _redis(client: aioredis.Redis, *args: str) -> Any:
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


def _url(server: RedisServer, user: str) -> str:
    return f"redis://{user}:{PASSWORD}@127.0.0.1:{server.port}/0"


def _cli(args: list[str], url: str, prefix: str, **more: str) -> subprocess.CompletedProcess[str]:
    """``queue-worker ARGS`` as user and prefix, run to its end."""
    env = {**os.environ, "REDIS_URL": url, "STREAM_PREFIX": prefix, **more}
    return subprocess.run(
        [sys.executable, "-m", "queue_worker", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_the_documented_acl_user_is_all_the_worker_and_the_commands_need(
    acl_server: RedisServer, admin: aioredis.Redis, prefix: str, stack_factory
) -> None:
    await _redis(admin, *documented_acl(prefix, "qw"))
    url = _url(acl_server, "qw")
    # An earlier version's task-index group: retention retires it, under this user too.
    await admin.xgroup_create(f"{{{prefix}}}:events", "index", id="0", mkstream=True)
    receiver = Server(create_otlp_app())  # tracing on: the span projector's script and keys
    await receiver.start()
    # Shared capacity, takeover, retention, the rate limit, the task index and tracing too:
    # every script and key family.
    stack: Stack = await stack_factory(
        redis=url,
        shared_capacity=True,
        takeover_interval_s=0.2,
        heartbeat_interval_s=0.1,
        retention_interval_s=0.1,
        stream_maxlen=5,
        executor_rate_limit=1000.0,
        otel_exporter_otlp_endpoint=receiver.url,
    )
    assert stack.worker is not None
    await stack.enqueue("acl-fail", code="SIMULATE_FAIL")
    await stack.wait_terminal(1)
    # Enough entries (a few hundred) for retention to trim whole stream nodes, and then
    # the task index to forget the tasks trimmed away.
    await stack.enqueue_many(30, prefix="acl-many")
    await stack.enqueue("acl-ok")
    await stack.wait_terminal(32)
    await stack.wait_messages(32)  # all published on evaluation:*

    async def forgotten() -> bool:  # trimmed from the stream, then from the task index
        status, _ = await stack.get_json("/tasks/acl-fail")
        return status == 404

    await eventually(forgotten, interval_s=0.1)
    groups = await admin.xinfo_groups(f"{{{prefix}}}:events")
    assert b"index" not in [g["name"] for g in groups]
    router = stack.worker.app[ROUTER]

    async def woken() -> bool:  # the wake-up subscription (evaluation:queued)
        await admin.publish("evaluation:queued", "{}")
        return router.wakeups > 0

    await eventually(woken, interval_s=0.1)
    spans = receiver.app[OTLP_RECEIVER].spans
    await eventually(lambda: any(s.name == "report" for s in spans), interval_s=0.1)
    await receiver.stop()
    status, health = await stack.get_json("/health")
    assert status == 200 and health["reasons"] == [], health
    for path in ("/status", "/tasks/acl-ok", "/tasks?state=completed"):
        status, body = await stack.get_json(path)
        assert status == 200, (path, body)
    await stack.stop_worker()  # a clean stop (its writes too)

    for args in (
        ["stream-info", "--json"],
        ["audit", "acl-ok"],
        ["replay"],
        ["tail", "--from-start", "--count", "1"],
        ["list", "--state", "completed"],
        ["pause", "--reason", "acl test"],
        ["resume", "--reason", "acl test"],
    ):
        done = _cli(args, url, prefix)
        assert done.returncode == 0, (args, done.stderr)
    assert msgspec.json.decode(_cli(["stream-info", "--json"], url, prefix).stdout)["length"]
    # Nothing the worker or the commands did was refused (swallowed refusals included).
    assert await _redis(admin, "ACL", "LOG") == []


async def test_without_a_permission_the_commands_say_which_in_one_line(
    acl_server: RedisServer, admin: aioredis.Redis, prefix: str
) -> None:
    args = [a for a in documented_acl(prefix, "no-groups") if a != "+xinfo|groups"]
    await _redis(admin, *args)
    await admin.xadd(f"{{{prefix}}}:events", {"type": "x"})  # a stream to describe
    done = _cli(["stream-info"], _url(acl_server, "no-groups"), prefix)
    (line,) = done.stderr.strip().splitlines()
    assert done.returncode == 1 and "'xinfo|groups'" in line and "(REDIS_URL)" in line, line
    assert PASSWORD not in line

    args = [a for a in documented_acl(prefix, "no-info") if a != "+info"]
    await _redis(admin, *args)
    done = _cli(
        ["run"],
        _url(acl_server, "no-info"),
        prefix,
        HOST="127.0.0.1",
        PORT="0",
        EXECUTOR_URLS="http://127.0.0.1:9",
    )
    (line,) = [x for x in done.stderr.strip().splitlines() if x.startswith("queue-worker:")]
    assert done.returncode == 1 and "'info'" in line, done.stderr


async def test_a_running_worker_refused_a_channel_reports_it_and_loses_nothing(
    acl_server: RedisServer, admin: aioredis.Redis, prefix: str, stack_factory
) -> None:
    """The publisher may not PUBLISH on evaluation:completed: /health says so (503), the
    outcome stays pending (not acknowledged, not dead-lettered), and once the permission is
    granted the message goes out and /health is clear."""
    args = [
        "&evaluation:queued" if a == "&evaluation:*" else a
        for a in documented_acl(prefix, "no-publish")
    ]
    await _redis(admin, *args)
    stack: Stack = await stack_factory(redis=_url(acl_server, "no-publish"))
    await stack.enqueue("acl-denied")
    await stack.wait_event("task.reported", eval_id="acl-denied")  # the reporter may act

    async def refused() -> list[str]:
        status, health = await stack.get_json("/health")
        wanted = "publish to the channel evaluation:completed"
        return [r for r in health["reasons"] if wanted in r] if status == 503 else []

    (reason,) = await eventually(refused, timeout_s=30, interval_s=0.1)
    assert reason.startswith("Redis refuses the publisher: NoPermissionError"), reason
    assert not stack.messages
    pending = await admin.xpending(f"{{{prefix}}}:outcomes", "publisher")
    assert pending["pending"] >= 1  # held, not acknowledged unsent

    async with admin.pubsub() as heard:  # the test's own stack listens as that user
        await heard.subscribe("evaluation:completed")
        await _redis(admin, "ACL", "SETUSER", "no-publish", "&evaluation:*")
        message = await eventually(lambda: heard.get_message(True, timeout=0.1), 30, 0)
    assert msgspec.json.decode(message["data"])["eval_id"] == "acl-denied"

    async def clear() -> bool:
        status, health = await stack.get_json("/health")
        return status == 200 and not health["reasons"]

    await eventually(clear, interval_s=0.1)
    types = [e.event.type for e in await stack.entries()]
    assert "entry.dead_lettered" not in types and "loop.crashed" not in types
