"""The performance benchmark: our worker against a serial baseline and a concurrent ceiling.

``python -m bench.run [--quick] [--scenario NAME[,NAME]] [--repeat K] [--profile] [--json FILE]``

One private ``redis-server`` serves the whole run. For every scenario and
every router a fresh ``bench.stack`` process serves the reference queue and
simulated executors (instrumented), the queue is filled with N tasks, and the
router runs in its own process until every task is reported to the queue and
published on Redis, or until its time budget:

* ``ours``     — ``python -m queue_worker run`` configured by environment;
* ``baseline`` — ``bench.baseline``: serial, a health check before each route;
* ``ceiling``  — ``bench.ceiling``: as many pull→execute→report→publish loops
  as the worker may have tasks in flight; no health checks, no event log.

The bench process itself only subscribes to ``evaluation:*`` (projector lag)
and samples ``/proc`` of the router (CPU, RSS). See docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import redis.asyncio as aioredis

from bench.common import BENCH_CODE, log_dir, machine_cpu, p50_p99_ms, proc_cpu_s, proc_memory_kb
from bench.profile import load as load_profile
from bench.profile import report as profile_report
from queue_worker.devstack.redis import RedisServer
from queue_worker.devstack.serve import free_port
from queue_worker.streams import events as ev
from queue_worker.streams.keys import COMPLETED_CHANNEL, FAILED_CHANNEL, Keys
from queue_worker.streams.store import EventStore, parse_entries
from queue_worker.streams.views import StatusView, fold

ROOT = Path(__file__).resolve().parent.parent
ROUTERS = ("ours", "baseline", "ceiling")
STREAM_KEY = Keys().events


@dataclass(frozen=True)
class Scenario:
    name: str
    about: str
    tasks: int
    quick_tasks: int
    latency_ms: float = 0.0
    capacity: int = 8
    executors: int = 3
    slow_index: int = -1
    slow_factor: float = 5.0
    hang_health_index: int = -1
    routers: tuple[str, ...] = ROUTERS
    budget_s: float = 300.0  # ours and ceiling
    quick_budget_s: float = 45.0
    baseline_s: float = 20.0  # the baseline is time-boxed
    quick_baseline_s: float = 4.0

    def n(self, quick: bool) -> int:
        return self.quick_tasks if quick else self.tasks

    def healthy(self) -> list[int]:
        return [i for i in range(self.executors) if i != self.hang_health_index]

    def latency_of(self, i: int) -> float:
        return self.latency_ms * (self.slow_factor if i == self.slow_index else 1.0)

    def limit(self) -> float | None:
        """Executor-bound tasks/s: sum over healthy executors of capacity / latency."""
        if self.latency_ms <= 0:
            return None
        return sum(self.capacity / (self.latency_of(i) / 1000) for i in self.healthy())

    def slots(self) -> int:
        return self.capacity * len(self.healthy())


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "instant",
            "latency 0, 3 executors x capacity 8: router-bound",
            tasks=10_000,
            quick_tasks=2_000,
            budget_s=240,
        ),
        Scenario(
            "executor-bound",
            "latency 50 ms, 3 executors x capacity 1: limit 60 tasks/s",
            tasks=1_200,
            quick_tasks=180,
            latency_ms=50,
            capacity=1,
            budget_s=120,
        ),
        Scenario(
            "slow-one",
            "latency 50 ms, executor-3 5x slower (250 ms), capacity 1: limit 44 tasks/s",
            tasks=900,
            quick_tasks=150,
            latency_ms=50,
            capacity=1,
            slow_index=2,
            budget_s=120,
        ),
        Scenario(
            "hang-health",
            "latency 50 ms, capacity 1, executor-3's GET /health hangs: limit 40 tasks/s",
            tasks=800,
            quick_tasks=120,
            latency_ms=50,
            capacity=1,
            hang_health_index=2,
            budget_s=120,
        ),
        Scenario(
            "soak",
            "as instant, long: RSS flatness, sustained rate, lag",
            tasks=100_000,
            quick_tasks=4_000,
            routers=("ours",),
            budget_s=900,
            quick_budget_s=60,
        ),
        Scenario(
            "replay",
            "start-up fold of the soak's stream (or a synthetic one of the same size)",
            tasks=100_000,
            quick_tasks=6_000,
            routers=(),
        ),
    )
}


@dataclass
class RunResult:
    router: str
    tasks: int
    done: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    tasks_per_s: float = 0.0
    steady_tasks_per_s: float | None = None
    timed_out: bool = False
    error: str | None = None
    ready_s: float | None = None
    cpu_s: float | None = None
    cpu_ms_per_task: float | None = None
    others_cpu_ms_per_task: dict[str, float] = field(default_factory=dict)
    machine_busy_pct: float | None = None
    rss_peak_kb: int | None = None
    rss_samples: list[tuple[float, int]] = field(default_factory=list)
    rss_drift_pct: float | None = None
    overhead_ms: dict[str, Any] = field(default_factory=dict)
    idle_gap_ms: dict[str, Any] = field(default_factory=dict)
    utilisation: float | None = None
    lag_ms: tuple[float | None, float | None] = (None, None)
    stream_overhead_ms: dict[str, float | None] = field(default_factory=dict)
    redis_calls: dict[str, int] = field(default_factory=dict)
    redis_reads: int | None = None
    append_round_trips: int | None = None
    events_appended: int | None = None
    rt_per_task: float | None = None
    cmds_per_task: float | None = None
    stack: dict[str, Any] = field(default_factory=dict)
    child: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReplayResult:
    events: int = 0
    startup_events_per_s: float | None = None
    startup_seconds: float | None = None
    startup_rss_kb: int | None = None
    breakdown_s: dict[str, float] = field(default_factory=dict)
    breakdown_events_per_s: float | None = None
    stream_bytes: int | None = None
    source: str = ""


class _Message(msgspec.Struct):
    eval_id: str


_message = msgspec.json.Decoder(_Message)


class _Duration(msgspec.Struct):
    duration_ms: float = 0.0


_duration = msgspec.json.Decoder(_Duration)


class Listener:
    """Subscribes to ``evaluation:*`` and records when each eval_id's message arrives."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.received: dict[str, float] = {}
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def reset(self) -> None:
        self.received = {}

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


BENCH_COMMANDS = ("info", "config", "flushall", "subscribe", "client", "hello", "xrange")


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.workdir = workdir
        self.redis_server = RedisServer(directory=str(workdir))
        self.redis: aioredis.Redis
        self.http: aiohttp.ClientSession
        self.listener: Listener
        self.soak_stream = False
        self._seq = 0

    async def __aenter__(self) -> Bench:
        await asyncio.to_thread(self.redis_server.start)
        self.redis = aioredis.Redis.from_url(self.redis_server.url)
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        self.listener = Listener(aioredis.Redis.from_url(self.redis_server.url))
        await self.listener.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.listener.stop()
        await self.listener.redis.aclose()
        await self.http.close()
        await self.redis.aclose()
        await asyncio.to_thread(self.redis_server.close)

    # --- processes -----------------------------------------------------------

    async def spawn(
        self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None
    ) -> Child:
        self._seq += 1
        log = self.workdir / f"{self._seq:03d}-{name}.log"
        err = _open_log(log)
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
            os.close(err)
        return Child(name, proc, log)

    async def start_stack(self, scn: Scenario) -> tuple[Child, str, list[str]]:
        child = await self.spawn(
            "stack",
            [
                sys.executable, "-m", "bench.stack",
                "--executors", str(scn.executors),
                "--latency-ms", str(scn.latency_ms),
                "--capacity", str(scn.capacity),
                "--slow-index", str(scn.slow_index),
                "--slow-factor", str(scn.slow_factor),
                "--hang-health-index", str(scn.hang_health_index),
                "--max-seconds", "3600",
            ],
        )  # fmt: skip
        urls = await child.json_line(30)
        return child, urls["queue"], urls["executors"]

    def worker_env(
        self, scn: Scenario, queue: str, executors: list[str], port: int
    ) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("QW_", "EXECUTOR_"))}
        env.update(
            QUEUE_SERVICE_URL=queue,
            REDIS_URL=self.redis_server.url,
            EXECUTOR_URLS=",".join(executors),
            EXECUTOR_CAPACITY=str(scn.capacity),
            HOSTNAME="bench-worker",
            HOST="127.0.0.1",
            PORT=str(port),
            LOG_LEVEL=self.args.log_level,
            LOG_FORMAT="json",
        )
        for item in self.args.worker_env:
            name, _, value = item.partition("=")
            env[name] = value
        return env

    async def start_worker(
        self, scn: Scenario, queue: str, executors: list[str], *, timeout_s: float = 30.0
    ) -> tuple[Child, str]:
        port = free_port()
        child = await self.spawn(
            "ours",
            [sys.executable, "-m", "queue_worker", "run"],
            env=self.worker_env(scn, queue, executors, port),
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not child.alive:
                raise RuntimeError(f"worker exited at start; see {child.log}")
            try:
                async with self.http.get(f"{url}/health") as resp:
                    if resp.status == 200:
                        return child, url
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        await child.stop()
        raise RuntimeError(f"worker not healthy within {timeout_s:g} s; see {child.log}")

    async def worker_live(self, url: str) -> dict[str, int]:
        async with self.http.get(f"{url}/status") as resp:
            live: dict[str, int] = msgspec.json.decode(await resp.read())["live"]
        return live

    # --- one router on one scenario ------------------------------------------

    async def run(
        self, scn: Scenario, router: str, n: int, *, profile: Path | None = None
    ) -> RunResult:
        result = RunResult(router=router, tasks=n)
        await self.redis.flushall()
        self.listener.reset()
        stack, queue, executors = await self.start_stack(scn)
        child: Child | None = None
        spy: Child | None = None
        try:
            healthy = [executors[i] for i in scn.healthy()]
            worker_url = ""
            started = time.monotonic()
            if router == "ours":
                child, worker_url = await self.start_worker(scn, queue, executors)
                live0 = await self.worker_live(worker_url)
            else:
                budget = scn.baseline_s if router == "baseline" else self.budget(scn)
                if router == "baseline" and self.quick:
                    budget = scn.quick_baseline_s
                child = await self.spawn(
                    router,
                    [
                        sys.executable, "-m", f"bench.{router}",
                        "--queue", queue,
                        "--executors", ",".join(executors if router == "baseline" else healthy),
                        "--redis", self.redis_server.url,
                        "--tasks", str(n),
                        "--deadline-s", str(budget),
                        "--concurrency", str(scn.slots()),
                        "--capacity", str(scn.capacity),
                    ],
                )  # fmt: skip
                await child.json_line(30)
            result.ready_s = time.monotonic() - started
            await self.redis.config_resetstat()
            if profile is not None:
                spy = await self.spawn(
                    "py-spy",
                    [
                        str(py_spy()), "record", "--pid", str(child.pid), "--rate", "250",
                        "--function", "--format", "raw", "--output", str(profile),
                        "--nonblocking",
                    ],
                )  # fmt: skip
                await asyncio.sleep(1.0)  # let py-spy attach before the load starts
            assert self.redis_server.process is not None
            others = {"stack": stack.pid, "redis": self.redis_server.process.pid}
            others0 = {k: proc_cpu_s(pid) for k, pid in others.items()}
            machine0 = machine_cpu()
            cpu0 = proc_cpu_s(child.pid)
            async with self.http.post(
                f"{queue}/_bench/fill",
                data=msgspec.json.encode({"count": n, "prefix": router, "code": BENCH_CODE}),
            ) as resp:
                resp.raise_for_status()
            if router != "ours":
                assert child.proc.stdin is not None
                child.proc.stdin.write(b"go\n")
                await child.proc.stdin.drain()
            await self.wait(scn, result, child, queue, n)
            cpu1 = proc_cpu_s(child.pid)
            result.cpu_s = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
            machine1 = machine_cpu()
            others_cpu = {
                k: (proc_cpu_s(pid) or 0.0) - (others0[k] or 0.0) for k, pid in others.items()
            }
            wall = machine1[1] - machine0[1]
            if wall > 0:
                result.machine_busy_pct = 100 * (machine1[0] - machine0[0]) / wall
            result.rss_peak_kb = proc_memory_kb(child.pid).get("VmHWM")
            calls = await self.command_calls()
            stats = await self.redis.info("stats")
            result.redis_reads = int(stats["total_reads_processed"]) - 2  # our two INFO calls
            if router == "ours":
                live1 = await self.worker_live(worker_url)
                result.append_round_trips = (
                    live1["append_round_trips"] - live0["append_round_trips"]
                )
                result.events_appended = live1["events_appended"] - live0["events_appended"]
            if spy is not None:
                await spy.stop(30, signal.SIGINT)
            await child.stop(40)
            if router != "ours":
                with contextlib.suppress(RuntimeError, TimeoutError, msgspec.DecodeError):
                    result.child = await child.json_line(5)
                    result.cpu_s = result.child.get("cpu_s")
                    result.rss_peak_kb = result.child.get("maxrss_kb")
            async with self.http.get(f"{queue}/_bench/stats") as resp:
                result.stack = msgspec.json.decode(await resp.read())
            self.summarise(scn, result, calls)
            if result.done:
                result.others_cpu_ms_per_task = {
                    k: 1000 * v / result.done for k, v in others_cpu.items()
                }
            if router == "ours":
                await self.analyse_stream(result)
        finally:
            for c in (spy, child):
                if c is not None:
                    await c.stop(40)
            await stack.stop()
        return result

    def budget(self, scn: Scenario) -> float:
        return scn.quick_budget_s if self.quick else scn.budget_s

    async def wait(
        self, scn: Scenario, result: RunResult, child: Child, queue: str, n: int
    ) -> None:
        deadline = time.monotonic() + self.budget(scn) + 10
        progress = {"reported": 0}
        next_sample = 0.0
        while True:
            async with self.http.get(f"{queue}/_bench/progress") as resp:
                progress = msgspec.json.decode(await resp.read())
            done = progress["reported"] >= n and len(self.listener.received) >= n
            now = time.monotonic()
            if result.router == "ours" and now >= next_sample:
                rss = proc_memory_kb(child.pid).get("VmRSS")
                if rss is not None:
                    result.rss_samples.append((progress["reported"] / n, rss))
                next_sample = now + 0.5
            if done:
                return
            if not child.alive:
                # The references exit when they are done or out of time; give the last
                # PUBLISHes a moment to arrive.
                await asyncio.sleep(0.3)
                if result.router == "ours":
                    result.error = f"worker exited with {child.proc.returncode}; see {child.log}"
                return
            if now > deadline:
                result.timed_out = True
                return
            await asyncio.sleep(0.1)

    async def command_calls(self) -> dict[str, int]:
        info = await self.redis.info("commandstats")
        calls: dict[str, int] = {}
        for key, value in info.items():
            name = key.removeprefix("cmdstat_")
            if name.split("|")[0] not in BENCH_COMMANDS:
                calls[name] = int(value["calls"])
        return calls

    def summarise(self, scn: Scenario, r: RunResult, calls: dict[str, int]) -> None:
        st = r.stack
        r.done = int(st["reported"])
        r.outcomes = st["outcomes"]
        received = self.listener.received
        if r.done and st["first_pull"] is not None:
            published = [received[x] for x in received if x.startswith(f"{r.router}-")]
            last = max([st["last_report"], *published])
            r.seconds = last - st["first_pull"]
            r.tasks_per_s = r.done / r.seconds if r.seconds > 0 else 0.0
            times = st["reported_times"]
            if len(times) >= 20:  # the middle 80 %: without ramp-up and drain
                lo, hi = times[len(times) // 10], times[len(times) * 9 // 10]
                if hi > lo:
                    r.steady_tasks_per_s = (len(times) * 8 // 10) / (hi - lo)
        if r.cpu_s is not None and r.done:
            r.cpu_ms_per_task = 1000 * r.cpu_s / r.done
        r.overhead_ms = st["overhead_ms"]
        r.idle_gap_ms = st["idle_gap_ms"]
        if r.seconds > 0:  # mean busy slots / healthy slots (Little's law)
            r.utilisation = sum(st["busy_s"].values()) / (scn.slots() * r.seconds)
        r.redis_calls = calls
        if r.done:
            r.cmds_per_task = sum(calls.values()) / r.done
            r.rt_per_task = (r.redis_reads or 0) / r.done
        if len(r.rss_samples) >= 4:
            base = next((kb for frac, kb in r.rss_samples if frac >= 0.2), None)
            end = r.rss_samples[-1][1]
            if base:
                r.rss_drift_pct = 100 * (end - base) / base
        st.pop("reported_times", None)

    async def analyse_stream(self, r: RunResult) -> None:
        """Projector lag and the worker's own overhead, from the stream's entry ids (ms)."""
        pulled: dict[str, int] = {}
        dispatched: dict[str, int] = {}
        finished: dict[str, tuple[int, float]] = {}
        lower = "-"
        while True:
            raws = await self.redis.xrange(STREAM_KEY, lower, "+", count=5000)
            for entry_id, fields in raws:
                kind = fields.get(b"type")
                if kind not in (
                    b"task.pulled",
                    b"task.dispatched",
                    b"task.completed",
                    b"task.failed",
                ):
                    continue
                ms = int(entry_id.split(b"-")[0])
                eval_id = fields[b"eval_id"].decode()
                if kind == b"task.pulled":
                    pulled[eval_id] = ms
                elif kind == b"task.dispatched":
                    dispatched[eval_id] = ms
                else:
                    finished[eval_id] = (ms, _duration.decode(fields[b"data"]).duration_ms)
            if len(raws) < 5000:
                break
            lower = "(" + raws[-1][0].decode()
        received = self.listener.received
        lags = [received[k] - ms / 1000 for k, (ms, _) in finished.items() if k in received]
        r.lag_ms = p50_p99_ms(lags)
        pre = [(dispatched[k] - pulled[k]) / 1000 for k in dispatched if k in pulled]
        post = [
            (ms - dispatched[k] - dur) / 1000
            for k, (ms, dur) in finished.items()
            if k in dispatched
        ]
        pre50, pre99 = p50_p99_ms(pre)
        post50, post99 = p50_p99_ms(post)
        r.stream_overhead_ms = {
            "pulled_to_dispatched_p50": pre50,
            "pulled_to_dispatched_p99": pre99,
            "answer_to_completed_p50": post50,
            "answer_to_completed_p99": post99,
        }

    async def repeat(self, scn: Scenario, router: str, n: int) -> RunResult:
        """Run ``--repeat`` times and keep the run with the median rate."""
        runs = [await self.run(scn, router, n) for _ in range(self.args.repeat)]
        runs.sort(key=lambda r: r.tasks_per_s)
        chosen = runs[len(runs) // 2]
        if len(runs) > 1:
            chosen.child["all_rates"] = [round(r.tasks_per_s, 1) for r in runs]
        return chosen

    # --- replay ----------------------------------------------------------------

    async def synthesise_stream(self, tasks: int) -> None:
        await self.redis.flushall()
        store = EventStore(self.redis, Keys(), "bench-synthetic")
        urls = [f"http://127.0.0.1:{9000 + i}" for i in range(3)]
        batch: list[ev.Event] = [
            ev.WorkerStarted(version="bench", executors=urls, strategy="round_robin", capacity=8)
        ]
        for i in range(tasks):
            eval_id, pull_id, url = f"replay-{i:07d}", f"{i:016x}", urls[i % 3]
            task = ev.Task(eval_id=eval_id, code=BENCH_CODE, timeout=30.0)
            candidates = [
                ev.Candidate(executor=u, healthy=True, in_flight=i % 8, capacity=8) for u in urls
            ]
            result = {
                "eval_id": eval_id,
                "status": "completed",
                "output": f"simulated output for {eval_id}\n",
                "error": None,
                "exit_code": 0,
                "executor_id": f"executor-{i % 3 + 1}",
            }
            batch += [
                ev.PullStarted(pull_id=pull_id),
                ev.TaskPulled(
                    eval_id=eval_id, pull_id=pull_id, task=task, code_bytes=len(BENCH_CODE)
                ),
                ev.ExecutorSelected(
                    eval_id=eval_id,
                    executor=url,
                    strategy="round_robin",
                    attempt=1,
                    candidates=candidates,
                ),
                ev.TaskDispatched(eval_id=eval_id, executor=url, attempt=1, timeout_s=30.0),
                ev.TaskCompleted(
                    eval_id=eval_id, executor=url, attempt=1, result=result, duration_ms=1.5
                ),
                ev.TaskReported(eval_id=eval_id, outcome="completed", http_status=200),
            ]
            if len(batch) >= 3000:
                await store.append(*batch)
                batch = []
        if batch:
            await store.append(*batch)

    async def replay(self, scn: Scenario) -> ReplayResult:
        out = ReplayResult()
        if self.soak_stream and await self.redis.xlen(STREAM_KEY) > 0:
            out.source = "the soak's stream"
        else:
            await self.synthesise_stream(scn.n(self.quick))
            out.source = f"synthetic stream of {scn.n(self.quick)} tasks"
        out.events = int(await self.redis.xlen(STREAM_KEY))
        out.stream_bytes = await self.redis.memory_usage(STREAM_KEY, samples=0)
        # (a) start-up: a real worker process folds the stream before it serves.
        stack, queue, executors = await self.start_stack(SCENARIOS["instant"])
        try:
            child, _ = await self.start_worker(
                SCENARIOS["instant"], queue, executors, timeout_s=300
            )
            out.startup_rss_kb = proc_memory_kb(child.pid).get("VmHWM")
            await child.stop(40)
            for line in child.log.read_bytes().splitlines():
                if b"status_replayed" in line:
                    doc = msgspec.json.decode(line)
                    out.startup_seconds = float(doc["seconds"])
                    if out.startup_seconds > 0:
                        out.startup_events_per_s = int(doc["events"]) / out.startup_seconds
                    break
        finally:
            await stack.stop()
        # (b) here: what TailProjector.replay does (XRANGE batches of 1000, parse_entries,
        # views.fold), timed per step.
        view, t_read, t_decode, t_fold, count, lower = StatusView(), 0.0, 0.0, 0.0, 0, "-"
        while True:
            t = time.perf_counter()
            raws = await self.redis.xrange(STREAM_KEY, lower, "+", count=1000)
            t_read += time.perf_counter() - t
            t = time.perf_counter()
            entries = parse_entries(raws)
            t_decode += time.perf_counter() - t
            t = time.perf_counter()
            fold(entries, view)
            t_fold += time.perf_counter() - t
            count += len(entries)
            if len(raws) < 1000:
                break
            lower = "(" + raws[-1][0].decode()
        out.breakdown_s = {"xrange": t_read, "decode": t_decode, "fold": t_fold}
        total = t_read + t_decode + t_fold
        out.breakdown_events_per_s = count / total if total else None
        return out


def _open_log(path: Path) -> int:
    """A file descriptor for a child's stderr (the child keeps its own copy)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


def py_spy() -> Path:
    local = Path(sys.executable).parent / "py-spy"
    found = local if local.exists() else shutil.which("py-spy")
    if not found:
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    return Path(found)


# --- the table ------------------------------------------------------------------


def _f(value: float | None, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}{suffix}"


def _rate(value: float | None) -> str:
    if value is None:
        return "—"
    return _f(value, 0 if value >= 100 else 1)


def _pair(a: float | None, b: float | None, digits: int = 1) -> str:
    if a is None and b is None:
        return "—"
    return f"{_f(a, digits)} / {_f(b, digits)}"


COLUMNS = (
    "scenario",
    "N",
    "ours/s",
    "base/s",
    "ceil/s",
    "ours/base",
    "ours/ceil",
    "limit/s",
    "util",
    "ovh p50/p99 ms",
    "lag p50/p99 ms",
    "RSS MB",
    "RT/task",
    "cmds/task",
    "CPU ms/task",
)


def table_rows(
    results: dict[str, dict[str, RunResult]], replay: ReplayResult | None
) -> list[list[str]]:
    rows = []
    for name, runs in results.items():
        scn = SCENARIOS[name]
        ours, base, ceil = runs.get("ours"), runs.get("baseline"), runs.get("ceiling")
        o = ours.tasks_per_s if ours else None
        b = base.tasks_per_s if base else None
        c = ceil.tasks_per_s if ceil else None
        mark = "*" if ours and (ours.timed_out or ours.error) else ""
        rss = None
        if ours and ours.rss_peak_kb:
            rss = _f(ours.rss_peak_kb / 1024, 0)
            if name == "soak" and ours.rss_drift_pct is not None:
                rss += f" ({ours.rss_drift_pct:+.0f}%)"
        rows.append(
            [
                name,
                str(ours.done if ours else (base.done if base else 0)),
                _rate(o) + mark,
                _rate(b),
                _rate(c),
                _f(o / b, 1, "x") if o and b else "—",
                _f(o / c, 2) if o and c else "—",
                _rate(scn.limit()),
                _f(100 * ours.utilisation, 0, "%")
                if ours and ours.utilisation is not None
                else "—",
                _pair(ours.overhead_ms.get("p50"), ours.overhead_ms.get("p99")) if ours else "—",
                _pair(*ours.lag_ms) if ours else "—",
                rss or "—",
                _f(ours.rt_per_task, 2) if ours else "—",
                _f(ours.cmds_per_task, 1) if ours else "—",
                _f(ours.cpu_ms_per_task, 2) if ours else "—",
            ]
        )
    if replay is not None:
        rows.append(
            [
                "replay",
                f"{replay.events} ev",
                _f(replay.startup_events_per_s, 0) + " ev",
                "—",
                "—",
                "—",
                "—",
                "—",
                "—",
                "—",
                "—",
                _f(replay.startup_rss_kb / 1024, 0) if replay.startup_rss_kb else "—",
                "—",
                "—",
                "—",
            ]
        )
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(COLUMNS)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(COLUMNS, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| "
        + " | ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        + " |"
        for r in rows
    ]
    return "\n".join([line, rule, *body])


def targets(results: dict[str, dict[str, RunResult]], replay: ReplayResult | None) -> list[str]:
    out: list[str] = []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("MET" if ok else "NOT MET")

    inst = results.get("instant", {})
    o, b, c = (inst.get(k) for k in ROUTERS)
    if o and c and b and c.tasks_per_s and b.tasks_per_s:
        rc, rb = o.tasks_per_s / c.tasks_per_s, o.tasks_per_s / b.tasks_per_s
        out.append(
            f"instant: ours/ceiling {rc:.2f} (>= 0.8) {verdict(rc >= 0.8)}; "
            f"ours/baseline {rb:.1f}x (>= 5x) {verdict(rb >= 5)}"
        )
    eb = results.get("executor-bound", {}).get("ours")
    limit = SCENARIOS["executor-bound"].limit()
    if eb and limit:
        share = eb.tasks_per_s / limit
        out.append(
            f"executor-bound: {eb.tasks_per_s:.1f}/s = {share:.2f} of {limit:.0f}/s "
            f"(>= 0.95) {verdict(share >= 0.95)}"
        )
    for name in ("instant", "soak"):
        r = results.get(name, {}).get("ours")
        if r and r.lag_ms[1] is not None:
            fast = r.tasks_per_s >= 500
            ok = (r.lag_ms[1] <= 50) if fast else None
            note = (
                ""
                if fast
                else f" (only {r.tasks_per_s:.0f} tasks/s: the >= 500/s condition is not reached)"
            )
            out.append(
                f"projector lag p99 {name}: {r.lag_ms[1]:.1f} ms at {r.tasks_per_s:.0f} tasks/s "
                f"(<= 50 ms at >= 500/s) {verdict(ok)}{note}"
            )
    if replay is not None and replay.startup_events_per_s is not None:
        ok = replay.startup_events_per_s >= 50_000
        out.append(
            f"replay at start-up: {replay.startup_events_per_s:,.0f} events/s "
            f"(>= 50,000) {verdict(ok)}"
        )
    soak = results.get("soak", {}).get("ours")
    if soak and soak.rss_drift_pct is not None:
        out.append(
            f"soak RSS from 20 % to 100 % of the tasks: {soak.rss_drift_pct:+.1f} % "
            f"(within +-10 %) {verdict(abs(soak.rss_drift_pct) <= 10)}"
        )
    return out


def details(results: dict[str, dict[str, RunResult]], replay: ReplayResult | None) -> list[str]:
    lines = []
    for name, runs in results.items():
        for router, r in runs.items():
            o = r.overhead_ms
            bits = [
                f"{name}/{router}: {r.done}/{r.tasks} in {r.seconds:.2f}s",
                f"steady {_rate(r.steady_tasks_per_s)}/s",
                f"outcomes {r.outcomes}",
                f"overhead pre {_pair(o.get('pre_p50'), o.get('pre_p99'), 2)}"
                f" post {_pair(o.get('post_p50'), o.get('post_p99'), 2)} ms",
                "executor idle between tasks "
                f"{_pair(r.idle_gap_ms.get('p50'), r.idle_gap_ms.get('p99'), 2)} ms",
                f"cpu ms/task: router {_f(r.cpu_ms_per_task, 2)}, "
                + ", ".join(f"{k} {v:.2f}" for k, v in r.others_cpu_ms_per_task.items())
                + f"; machine busy {_f(r.machine_busy_pct, 0)}%",
                f"peak RSS {_f((r.rss_peak_kb or 0) / 1024, 0)} MB",
            ]
            if r.stream_overhead_ms:
                s = r.stream_overhead_ms
                bits.append(
                    "stream pulled→dispatched "
                    f"{_pair(s['pulled_to_dispatched_p50'], s['pulled_to_dispatched_p99'])} ms, "
                    "answer→completed "
                    f"{_pair(s['answer_to_completed_p50'], s['answer_to_completed_p99'])} ms"
                )
            if r.redis_calls:
                top = ", ".join(
                    f"{k} {v / max(r.done, 1):.2f}"
                    for k, v in sorted(r.redis_calls.items(), key=lambda kv: -kv[1])[:8]
                )
                bits.append(f"redis calls/task: {top}")
            if r.append_round_trips is not None and r.events_appended:
                bits.append(
                    f"{r.events_appended / max(r.done, 1):.2f} events/task in "
                    f"{r.append_round_trips / max(r.done, 1):.2f} append RT/task"
                )
            rejected = sum(x.get("rejected_busy", 0) for x in r.stack.get("executor_stats", []))
            duplicates = r.stack.get("duplicate_reports")
            if rejected or duplicates:
                bits.append(f"executor 503s {rejected}, duplicate reports {duplicates}")
            if r.child:
                bits.append(f"child {r.child}")
            if r.timed_out:
                bits.append("TIMED OUT")
            if r.error:
                bits.append(r.error)
            lines.append("; ".join(bits))
    if replay is not None:
        b = replay.breakdown_s
        lines.append(
            f"replay ({replay.source}, {replay.events} events): start-up "
            f"{_f(replay.startup_seconds, 2)} s = {_f(replay.startup_events_per_s)} ev/s; "
            "in the bench process "
            + ", ".join(f"{k} {v:.2f} s" for k, v in b.items())
            + f" = {_f(replay.breakdown_events_per_s)} ev/s; stream in Redis "
            + f"{_f((replay.stream_bytes or 0) / 2**20, 1)} MB "
            + f"({_f((replay.stream_bytes or 0) / max(replay.events, 1), 0)} B/event)"
        )
    return lines


@dataclass
class Outcome:
    results: dict[str, dict[str, RunResult]]
    replay: ReplayResult | None
    seconds: float
    workdir: Path


async def run_all(args: argparse.Namespace, names: list[str], workdir: Path) -> Outcome:
    results: dict[str, dict[str, RunResult]] = {}
    replay: ReplayResult | None = None
    started = time.monotonic()

    def progress(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", file=sys.stderr, flush=True)

    async with Bench(args, workdir) as bench:
        for name in names:
            scn = SCENARIOS[name]
            if name == "replay":
                replay = await bench.replay(scn)
                progress(f"replay: {replay.events} events, {_f(replay.startup_events_per_s)} ev/s")
                continue
            results[name] = {}
            bench.soak_stream = False
            for router in [x for x in scn.routers if x in args.routers.split(",")]:
                r = await bench.repeat(scn, router, scn.n(args.quick))
                results[name][router] = r
                late = " (timed out)" if r.timed_out else ""
                progress(f"{name}/{router}: {r.done} tasks, {r.tasks_per_s:.1f}/s{late}")
            bench.soak_stream = name == "soak"
        if args.profile:
            scn = SCENARIOS[args.profile_scenario]
            r = await bench.run(scn, "ours", args.profile_tasks, profile=Path(args.profile_out))
            progress(f"profile run of ours on {scn.name}: {r.tasks_per_s:.0f}/s")
    return Outcome(results, replay, time.monotonic() - started, workdir)


def print_report(args: argparse.Namespace, outcome: Outcome) -> None:
    results, replay = outcome.results, outcome.replay
    mode = "quick" if args.quick else "full"
    print(
        f"\nqueue-worker benchmark ({mode}, {outcome.seconds:.0f} s, "
        f"{os.cpu_count()} CPUs, worker LOG_LEVEL={args.log_level})\n"
    )
    print(format_table(table_rows(results, replay)))
    print("\n* = did not finish within its time budget (partial rate)")
    print("\ntargets:")
    for line in targets(results, replay):
        print("  " + line)
    if args.verbose:
        print("\ndetails:")
        for line in details(results, replay):
            print("  " + line)
    if args.profile:
        summary = profile_report(load_profile(args.profile_out), 20)
        Path(args.profile_out + ".summary.txt").write_text(summary + "\n")
        print(f"\nprofile of ours on {args.profile_scenario} ({args.profile_out}):\n{summary}")
    if args.json:
        doc = {
            "mode": mode,
            "seconds": outcome.seconds,
            "results": {k: {r: asdict(x) for r, x in v.items()} for k, v in results.items()},
            "replay": asdict(replay) if replay else None,
            "loadavg": os.getloadavg(),
        }
        Path(args.json).write_bytes(msgspec.json.format(msgspec.json.encode(doc)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="few tasks: the run takes < 2 min")
    parser.add_argument(
        "--scenario", default="all", help=f"comma list of {', '.join(SCENARIOS)} (default: all)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per router; keep the median")
    parser.add_argument("--log-level", default="INFO", help="worker LOG_LEVEL (default: INFO)")
    parser.add_argument(
        "--routers",
        default=",".join(ROUTERS),
        help="comma list of routers to run (default: all three)",
    )
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for our worker (what-if runs, e.g. PYTHONPATH=overlay)",
    )
    parser.add_argument("--profile", action="store_true", help="one more run of ours under py-spy")
    parser.add_argument(
        "--profile-scenario", default="instant", choices=sorted(SCENARIOS), help="(instant)"
    )
    parser.add_argument("--profile-tasks", type=int, default=10_000)
    parser.add_argument("--profile-out", default="/tmp/qw-bench-profile.txt")
    parser.add_argument("--json", help="write every figure to this JSON file")
    parser.add_argument("-v", "--verbose", action="store_true", help="print per-run details")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    names = list(SCENARIOS) if args.scenario == "all" else args.scenario.split(",")
    unknown = [x for x in names if x not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown}; choose from {', '.join(SCENARIOS)}")
    with log_dir("qw-bench-", keep=args.keep_logs) as workdir:
        outcome = asyncio.run(run_all(args, names, workdir))
        print_report(args, outcome)
    return 0


if __name__ == "__main__":
    sys.exit(main())
