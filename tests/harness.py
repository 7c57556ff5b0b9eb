"""A live stack for tests: the devstack queue and executors, the worker, a real Redis."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec

from queue_worker.config import Settings
from queue_worker.devstack.executor import EXECUTOR_STATE, ExecutorState, create_executor_app
from queue_worker.devstack.queue import QUEUE_STATE, QueueState, create_queue_app
from queue_worker.devstack.serve import Server
from queue_worker.http.app import create_app
from queue_worker.http.state import STATUS
from queue_worker.streams.connection import RedisClient, RedisTls, open_redis, plain_client
from queue_worker.streams.events import Entry
from queue_worker.streams.keys import COMPLETED_CHANNEL, FAILED_CHANNEL, Keys
from queue_worker.streams.store import EventStore


async def eventually(
    check: Callable[[], Any], timeout_s: float = 20.0, interval_s: float = 0.02
) -> Any:
    """Poll ``check`` (sync or async) until it returns a truthy value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s: {check}")
        await asyncio.sleep(interval_s)


@dataclass
class Stack:
    redis_url: str
    prefix: str
    executors: list[Server]
    queue: Server
    settings: Settings
    worker: Server | None = None
    http: aiohttp.ClientSession = field(init=False)
    redis: RedisClient = field(init=False)
    store: EventStore = field(init=False)
    messages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    _listener: asyncio.Task[None] | None = None

    @property
    def redis_tls(self) -> RedisTls:
        s = self.settings
        return RedisTls(s.redis_ca_file, s.redis_cert_file, s.redis_key_file)

    async def start(self, *, worker: bool = True) -> Stack:
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        self.redis = await open_redis(self.redis_url, self.redis_tls)
        self.store = EventStore(self.redis, Keys(self.prefix), "test")
        await self.queue.start()
        for x in self.executors:
            await x.start()
        ready = asyncio.Event()
        self._listener = asyncio.create_task(self._listen(ready))
        await ready.wait()
        if worker:
            await self.start_worker()
        return self

    async def start_worker(self, **changes: Any) -> Server:
        settings = self.settings.with_(**changes) if changes else self.settings
        self.worker = Server(create_app(settings))
        await self.worker.start()
        await self.worker.app[STATUS].replayed.wait()  # it folds the stream as it starts
        return self.worker

    async def stop_worker(self) -> None:
        if self.worker is not None:
            await self.worker.stop()
            self.worker = None

    async def _listen(self, ready: asyncio.Event) -> None:
        # A plain client on the URL's node: in a cluster, messages reach every node.
        client = plain_client(self.redis_url, self.redis_tls)
        pubsub = client.pubsub()
        await pubsub.subscribe(COMPLETED_CHANNEL, FAILED_CHANNEL)
        ready.set()
        try:
            async for msg in pubsub.listen():
                if msg["type"] == "message":
                    payload = msgspec.json.decode(msg["data"])
                    if isinstance(payload, dict):
                        self.messages.append((msg["channel"].decode(), payload))
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            await client.aclose()

    async def close(self) -> None:
        await self.stop_worker()
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        for x in self.executors:
            await x.stop()
        await self.queue.stop()
        await self.http.close()
        await self.redis.aclose()

    # --- helpers ---------------------------------------------------------------------------

    @property
    def queue_state(self) -> QueueState:
        return self.queue.app[QUEUE_STATE]

    def executor_state(self, i: int) -> ExecutorState:
        return self.executors[i].app[EXECUTOR_STATE]

    async def enqueue(self, eval_id: str, code: str = "print(1)", **fields: Any) -> None:
        body = {"eval_id": eval_id, "code": code, **fields}
        headers = {"X-API-Key": self.settings.queue_api_key or ""}
        async with self.http.post(f"{self.queue.url}/tasks", json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()

    async def enqueue_many(self, n: int, prefix: str = "t", **fields: Any) -> list[str]:
        ids = [f"{prefix}-{i:05d}" for i in range(n)]
        await asyncio.gather(*(self.enqueue(i, **fields) for i in ids))
        return ids

    async def expire(self, eval_id: str) -> None:
        """Let the queue's lease on ``eval_id`` run out now (it goes back to the queue)."""
        async with self.http.post(f"{self.queue.url}/_expire/{eval_id}") as resp:
            assert resp.status == 200, await resp.text()

    async def inject(self, body: bytes) -> None:
        async with self.http.post(f"{self.queue.url}/_inject", data=body) as resp:
            assert resp.status == 200

    async def control(self, i: int, **changes: Any) -> None:
        async with self.http.post(f"{self.executors[i].url}/_control", json=changes) as resp:
            assert resp.status == 200, await resp.text()

    def terminal_in_queue(self) -> int:
        stats = self.queue_state.stats()
        return stats["completed"] + stats["failed"]

    async def wait_terminal(self, n: int, timeout_s: float = 60.0) -> None:
        await eventually(lambda: self.terminal_in_queue() >= n, timeout_s)

    async def wait_messages(self, n: int, timeout_s: float = 30.0) -> None:
        await eventually(lambda: len(self.messages) >= n, timeout_s)

    async def entries(self) -> list[Entry]:
        return await self.store.read_all()

    async def types_for(self, eval_id: str) -> list[str]:
        return [e.event.type for e in await self.entries() if e.event.eval_id_or_empty == eval_id]

    async def wait_event(self, type_: str, timeout_s: float = 20.0, **fields: Any) -> Entry:
        async def find() -> Entry | None:
            for e in await self.entries():
                if e.event.type == type_ and all(
                    getattr(e.event, k, None) == v for k, v in fields.items()
                ):
                    return e
            return None

        found: Entry = await eventually(find, timeout_s, 0.05)
        return found

    def process_env(self, hostname: str, **settings: str) -> dict[str, str]:
        """The environment of a worker run as its own process against this stack."""
        return {
            **os.environ,
            "QUEUE_SERVICE_URL": self.queue.url,
            "REDIS_URL": self.redis_url,
            "EXECUTOR_URLS": ",".join(x.url for x in self.executors),
            "STREAM_PREFIX": self.prefix,
            "HOSTNAME": hostname,
            "HOST": "127.0.0.1",
            "PORT": "0",
            "POLL_INTERVAL_S": "0.05",
            **settings,
        }

    async def get_json(self, path: str) -> tuple[int, Any]:
        assert self.worker is not None
        async with self.http.get(f"{self.worker.url}{path}") as resp:
            return resp.status, msgspec.json.decode(await resp.read())

    async def post_json(self, url: str, path: str, body: object, token: str) -> tuple[int, Any]:
        """POST ``body`` as JSON to ``url + path`` with a bearer ``token``; status and JSON."""
        headers = {"Authorization": f"Bearer {token}"}
        async with self.http.post(f"{url}{path}", json=body, headers=headers) as resp:
            return resp.status, msgspec.json.decode(await resp.read())


async def spawn_worker(env: dict[str, str]) -> asyncio.subprocess.Process:
    """``python -m queue_worker run`` with ``env``, its output discarded."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "queue_worker", "run", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


def make_stack(
    redis_url: str,
    prefix: str,
    *,
    executors: int = 3,
    latency_s: float = 0.01,
    executor_options: list[dict[str, Any]] | None = None,
    api_key: str | None = None,
    **settings: Any,
) -> Stack:
    options = executor_options or [{} for _ in range(executors)]
    servers = [
        Server(create_executor_app(f"executor-{i + 1}", **{"latency_s": latency_s, **opts}))
        for i, opts in enumerate(options)
    ]
    queue = Server(create_queue_app(api_key=api_key))
    base = Settings(
        queue_service_url=queue.url,
        queue_api_key=api_key,
        redis_url=redis_url,
        executor_urls=tuple(x.url for x in servers),
        executor_capacity=2,
        hostname="test-worker",
        stream_prefix=prefix,
        poll_interval_s=0.02,
        health_interval_s=0.5,
        health_timeout_s=0.5,
        queue_backoff_step_s=0.05,
        queue_backoff_max_s=0.2,
        report_backoff_max_s=0.2,
        projector_block_ms=100,
        shutdown_grace_s=2.0,
        # A test process shares the machine with others: a heartbeat late by seconds is
        # not what these tests are about (fencing is tested with its own timing).
        dead_after_s=30.0,
        log_level="WARNING",
    )
    return Stack(
        redis_url=redis_url,
        prefix=prefix,
        executors=servers,
        queue=queue,
        settings=base.with_(**settings),
    )
