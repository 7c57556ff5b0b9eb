"""The processes the benchmarks start and measure, and the bench's own side of Redis.

* ``Harness``: the private ``redis-server``, an HTTP session, the ``Listener`` on
  ``evaluation:*``, and every process it starts (``spawn``: one log file each);
* ``Stack``: a ``bench.stack`` process (the reference queue and the simulated
  executors) and the queue's benchmark routes: fill, progress, stats;
* the routers: ours (``python -m queue_worker run``, configured by environment by
  ``worker_env``; ready when ``GET /health`` answers 200) and the references
  (``bench.baseline``, ``bench.ceiling``; ready when they print their first line,
  routing once told ``go``), and ``py-spy`` attached to one of them;
* ``CpuMeter``: CPU seconds from ``/proc`` of the router, of the other processes and of
  the whole machine over a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import redis.asyncio as aioredis

from bench.common import BENCH_CODE, machine_cpu, proc_cpu_s
from bench.scenarios import Scenario
from queue_worker.devstack.redis import RedisServer
from queue_worker.devstack.serve import free_port
from queue_worker.streams.keys import COMPLETED_CHANNEL, FAILED_CHANNEL

ROOT = Path(__file__).resolve().parent.parent
WORKER_ARGV = (sys.executable, "-m", "queue_worker", "run")


class _Message(msgspec.Struct):
    eval_id: str


_message = msgspec.json.Decoder(_Message)


class Listener:
    """Subscribes to ``evaluation:*``: when each eval_id's first message arrived, how
    many messages came and the largest of them (bytes)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.received: dict[str, float] = {}
        self.messages = 0
        self.largest_bytes = 0
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def reset(self) -> None:
        self.received = {}

    @property
    def done(self) -> bool:
        """True once the subscription has ended (Redis dropped it, or ``stop``)."""
        return self._task is not None and self._task.done()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="bench-listener")
        await asyncio.wait_for(self.ready.wait(), 10)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _listen(self) -> None:
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(COMPLETED_CHANNEL, FAILED_CHANNEL)
            self.ready.set()
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg is None:
                    continue
                now = time.time()
                self.messages += 1
                self.largest_bytes = max(self.largest_bytes, len(msg["data"]))
                try:
                    eval_id = _message.decode(msg["data"]).eval_id
                except msgspec.DecodeError:
                    continue
                self.received.setdefault(eval_id, now)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]


@dataclass
class Child:
    """A process started by the bench, with its log file."""

    name: str
    proc: asyncio.subprocess.Process
    log: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def stop(self, timeout_s: float = 15.0, sig: int = signal.SIGTERM) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()

    async def json_line(self, timeout_s: float) -> Any:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
        if not line:
            raise RuntimeError(f"{self.name} exited without output; see {self.log}")
        return msgspec.json.decode(line)

    async def go(self) -> None:
        """Tell a reference router that is ready to start routing."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        await self.proc.stdin.drain()


async def spawn(
    name: str, argv: Sequence[str], log: Path, *, env: Mapping[str, str] | None = None
) -> Child:
    """Start ``argv`` in the project's folder: stdin and stdout piped, stderr to ``log``."""
    err = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=ROOT,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
        )
    finally:
        os.close(err)  # the child keeps its own copy
    return Child(name, proc, log)


def worker_env(
    queue: str, executors: Sequence[str], redis_url: str, settings: Mapping[str, str]
) -> dict[str, str]:
    """The environment of ``python -m queue_worker run``: this process's without any
    ``QW_``/``EXECUTOR_`` setting of its own, the services' URLs, then ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QW_", "EXECUTOR_"))}
    env.update(QUEUE_SERVICE_URL=queue, REDIS_URL=redis_url, EXECUTOR_URLS=",".join(executors))
    env.update(settings)
    return env


def py_spy() -> Path:
    local = Path(sys.executable).parent / "py-spy"
    found = local if local.exists() else shutil.which("py-spy")
    if not found:
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    return Path(found)


@dataclass
class Stack:
    """A ``bench.stack`` process: the reference queue and the simulated executors."""

    child: Child
    queue: str
    executors: list[str]
    http: aiohttp.ClientSession

    async def fill(self, count: int, prefix: str, code: str = BENCH_CODE) -> None:
        """Enqueue ``count`` tasks ``<prefix>-0000000``... in the queue's own process."""
        body = msgspec.json.encode({"count": count, "prefix": prefix, "code": code})
        async with self.http.post(f"{self.queue}/_bench/fill", data=body) as resp:
            resp.raise_for_status()

    async def progress(self) -> dict[str, int]:
        """How many tasks were pulled and how many reported so far."""
        async with self.http.get(f"{self.queue}/_bench/progress") as resp:
            progress: dict[str, int] = msgspec.json.decode(await resp.read())
        return progress

    async def stats(self) -> dict[str, Any]:
        """The run as the queue and the executors saw it (see ``bench.stack.summarise``)."""
        async with self.http.get(f"{self.queue}/_bench/stats") as resp:
            stats: dict[str, Any] = msgspec.json.decode(await resp.read())
        return stats

    async def stop(self) -> None:
        await self.child.stop()


@dataclass
class CpuReading:
    router_s: float | None
    others_s: dict[str, float]
    machine_busy_pct: float | None


class CpuMeter:
    """CPU seconds from ``/proc`` of the router, of ``others`` (name → pid) and of the
    machine, from its creation to ``stop``."""

    def __init__(self, router_pid: int, others: dict[str, int]) -> None:
        self.router_pid = router_pid
        self.others = others
        self._others0 = {k: proc_cpu_s(pid) for k, pid in others.items()}
        self._machine0 = machine_cpu()
        self._router0 = proc_cpu_s(router_pid)

    def stop(self) -> CpuReading:
        router1 = proc_cpu_s(self.router_pid)
        machine1 = machine_cpu()
        others = {
            k: (proc_cpu_s(pid) or 0.0) - (self._others0[k] or 0.0)
            for k, pid in self.others.items()
        }
        router = None if self._router0 is None or router1 is None else router1 - self._router0
        wall = machine1[1] - self._machine0[1]
        busy = 100 * (machine1[0] - self._machine0[0]) / wall if wall > 0 else None
        return CpuReading(router, others, busy)


class Harness:
    """The private ``redis-server``, an HTTP session, the listener (unless ``listen`` is
    false: a subscriber costs Redis and this process CPU), and the processes."""

    def __init__(
        self,
        workdir: Path,
        *,
        log_level: str = "INFO",
        extra_env: Mapping[str, str] | None = None,
        listen: bool = True,
    ) -> None:
        self.workdir = workdir
        self.listen = listen
        self.log_level = log_level  # of every worker it starts
        self.extra_env = dict(extra_env or {})  # added to every worker's environment
        self.redis_server = RedisServer(directory=str(workdir))
        self.redis: aioredis.Redis
        self.http: aiohttp.ClientSession
        self.listener: Listener
        self._seq = 0

    async def __aenter__(self) -> Harness:
        await asyncio.to_thread(self.redis_server.start)
        self.redis = aioredis.Redis.from_url(self.redis_server.url)
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        self.listener = Listener(aioredis.Redis.from_url(self.redis_server.url))
        if self.listen:
            await self.listener.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.listener.stop()
        await self.listener.redis.aclose()
        await self.http.close()
        await self.redis.aclose()
        await asyncio.to_thread(self.redis_server.close)

    @property
    def redis_url(self) -> str:
        return self.redis_server.url

    @property
    def redis_pid(self) -> int:
        assert self.redis_server.process is not None
        return self.redis_server.process.pid

    async def spawn(
        self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None
    ) -> Child:
        self._seq += 1
        return await spawn(name, argv, self.workdir / f"{self._seq:03d}-{name}.log", env=env)

    async def start_stack(self, scn: Scenario) -> Stack:
        argv = [sys.executable, "-m", "bench.stack", *scn.stack_argv(), "--max-seconds", "3600"]
        child = await self.spawn("stack", argv)
        urls = await child.json_line(30)
        return Stack(child, urls["queue"], urls["executors"], self.http)

    async def start_worker(
        self,
        scn: Scenario,
        stack: Stack,
        *,
        timeout_s: float = 30.0,
        env: Mapping[str, str] | None = None,
    ) -> tuple[Child, str]:
        """Our worker on ``stack``, once healthy; ``env`` adds to its environment."""
        port = free_port()
        settings = {
            "EXECUTOR_CAPACITY": str(scn.capacity),
            "HOSTNAME": "bench-worker",
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "LOG_LEVEL": self.log_level,
            "LOG_FORMAT": "json",
            **self.extra_env,
            **(env or {}),
        }
        environ = worker_env(stack.queue, stack.executors, self.redis_url, settings)
        child = await self.spawn("ours", WORKER_ARGV, env=environ)
        url = f"http://127.0.0.1:{port}"
        await self._until_healthy(child, url, timeout_s)
        return child, url

    async def _until_healthy(self, child: Child, url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not child.alive:
                raise RuntimeError(f"worker exited at start; see {child.log}")
            try:
                async with self.http.get(f"{url}/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        await child.stop()
        raise RuntimeError(f"worker not healthy within {timeout_s:g} s; see {child.log}")

    async def worker_live(self, url: str) -> dict[str, int]:
        async with self.http.get(f"{url}/status") as resp:
            live: dict[str, int] = msgspec.json.decode(await resp.read())["live"]
        return live

    async def start_reference(
        self, router: str, scn: Scenario, stack: Stack, n: int, deadline_s: float
    ) -> Child:
        """``bench.baseline`` or ``bench.ceiling``, once it said it is ready."""
        # The baseline checks every executor's health; the ceiling is handed the healthy ones.
        executors = stack.executors
        if router != "baseline":
            executors = [executors[i] for i in scn.healthy()]
        child = await self.spawn(
            router,
            [
                sys.executable, "-m", f"bench.{router}",
                "--queue", stack.queue,
                "--executors", ",".join(executors),
                "--redis", self.redis_url,
                "--tasks", str(n),
                "--deadline-s", str(deadline_s),
                "--concurrency", str(scn.slots()),
                "--capacity", str(scn.capacity),
            ],
        )  # fmt: skip
        await child.json_line(30)
        return child

    async def start_py_spy(self, pid: int, out: Path) -> Child:
        """``py-spy record`` of ``pid`` into ``out`` (collapsed stacks); stop it with SIGINT."""
        return await self.spawn(
            "py-spy",
            [
                str(py_spy()), "record", "--pid", str(pid), "--rate", "250",
                "--function", "--format", "raw", "--output", str(out),
                "--nonblocking",
            ],
        )  # fmt: skip
