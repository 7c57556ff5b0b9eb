"""One router's run of one scenario, measured.

Each run: ``FLUSHALL``; start a fresh ``bench.stack`` and the router; wait until it is
ready; ``CONFIG RESETSTAT``; fill the queue with N tasks; let the router go; wait until
every task is reported to the queue and published on Redis, or until the time budget.
Meanwhile the bench sends no Redis command: it samples ``/proc`` (CPU, RSS) and asks the
stack how far the run is. Afterwards it reads Redis's command statistics, the stack's
view of the run, and (ours) the event stream for projector lag and overhead.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path

import msgspec

from bench.common import p50_p99_ms, proc_memory_kb, stream_pages
from bench.processes import Child, CpuMeter, Harness, Stack
from bench.results import RunResult
from bench.scenarios import Scenario
from queue_worker.streams.keys import Keys

STREAM_KEY = Keys().events
BENCH_COMMANDS = ("info", "config", "flushall", "subscribe", "client", "hello", "xrange")
_TASK_KINDS = (b"task.pulled", b"task.dispatched", b"task.completed", b"task.failed")


class _Duration(msgspec.Struct):
    duration_ms: float = 0.0


_duration = msgspec.json.Decoder(_Duration)


class Runner:
    """Runs a router on a scenario, ``repeat`` times if asked, and measures each run."""

    def __init__(self, harness: Harness, *, quick: bool, repeat: int = 1) -> None:
        self.harness = harness
        self.quick = quick
        self.repeat = repeat

    async def median_run(self, scn: Scenario, router: str, n: int) -> RunResult:
        """Run ``repeat`` times and keep the run with the median rate."""
        runs = [await self.run(scn, router, n) for _ in range(self.repeat)]
        runs.sort(key=lambda r: r.tasks_per_s)
        chosen = runs[len(runs) // 2]
        if len(runs) > 1:
            chosen.child["all_rates"] = [round(r.tasks_per_s, 1) for r in runs]
        return chosen

    async def run(
        self, scn: Scenario, router: str, n: int, *, profile: Path | None = None
    ) -> RunResult:
        h = self.harness
        result = RunResult(router=router, tasks=n)
        await h.redis.flushall()
        h.listener.reset()
        stack = await h.start_stack(scn)
        children: list[Child] = []  # the router, then py-spy
        try:
            started = time.monotonic()
            child, worker_url = await self._start_router(scn, router, stack, n)
            children.append(child)
            live0 = await h.worker_live(worker_url) if router == "ours" else {}
            result.ready_s = time.monotonic() - started
            await h.redis.config_resetstat()
            if profile is not None:
                children.append(await h.start_py_spy(child.pid, profile))
                await asyncio.sleep(1.0)  # let py-spy attach before the load starts
            others_cpu_s = await self._load(scn, result, stack, child, n)
            if router == "ours":
                live1 = await h.worker_live(worker_url)
                result.append_round_trips = (
                    live1["append_round_trips"] - live0["append_round_trips"]
                )
                result.events_appended = live1["events_appended"] - live0["events_appended"]
            await self._stop_router(result, *children)
            result.stack = await stack.stats()
            summarise(scn, result, self.harness.listener.received, others_cpu_s)
            if router == "ours":
                await self.analyse_stream(result)
        finally:
            for c in reversed(children):
                await c.stop(40)
            await stack.stop()
        return result

    async def _start_router(
        self, scn: Scenario, router: str, stack: Stack, n: int
    ) -> tuple[Child, str]:
        """The router, ready; and ours's URL ("" for the references)."""
        if router == "ours":
            return await self.harness.start_worker(scn, stack)
        deadline_s = scn.deadline_s(router, self.quick)
        return await self.harness.start_reference(router, scn, stack, n, deadline_s), ""

    async def _load(
        self, scn: Scenario, result: RunResult, stack: Stack, child: Child, n: int
    ) -> dict[str, float]:
        """Fill the queue, let the router go and wait for it; its CPU, peak RSS and Redis
        commands. Returns the CPU seconds of the stack and Redis over the run."""
        h = self.harness
        meter = CpuMeter(child.pid, {"stack": stack.child.pid, "redis": h.redis_pid})
        await stack.fill(n, result.router)
        if result.router != "ours":
            await child.go()
        await self._wait(scn, result, child, stack, n)
        cpu = meter.stop()
        result.cpu_s, result.machine_busy_pct = cpu.router_s, cpu.machine_busy_pct
        result.rss_peak_kb = proc_memory_kb(child.pid).get("VmHWM")
        result.redis_calls = await self._command_calls()
        stats = await h.redis.info("stats")
        result.redis_reads = int(stats["total_reads_processed"]) - 2  # our two INFO calls
        return cpu.others_s

    async def _wait(
        self, scn: Scenario, result: RunResult, child: Child, stack: Stack, n: int
    ) -> None:
        received = self.harness.listener.received
        deadline = time.monotonic() + scn.budget(self.quick) + 10
        next_sample = 0.0
        while True:
            progress = await stack.progress()
            done = progress["reported"] >= n and len(received) >= n
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

    async def _command_calls(self) -> dict[str, int]:
        info = await self.harness.redis.info("commandstats")
        calls: dict[str, int] = {}
        for key, value in info.items():
            name = key.removeprefix("cmdstat_")
            if name.split("|")[0] not in BENCH_COMMANDS:
                calls[name] = int(value["calls"])
        return calls

    async def _stop_router(self, result: RunResult, child: Child, spy: Child | None = None) -> None:
        """Stop py-spy and the router; a reference's summary is its last line."""
        if spy is not None:
            await spy.stop(30, signal.SIGINT)
        await child.stop(40)
        if result.router != "ours":
            with contextlib.suppress(RuntimeError, TimeoutError, msgspec.DecodeError):
                result.child = await child.json_line(5)
                result.cpu_s = result.child.get("cpu_s")
                result.rss_peak_kb = result.child.get("maxrss_kb")

    async def analyse_stream(self, r: RunResult) -> None:
        """Projector lag and the worker's own overhead, from the stream's entry ids (ms)."""
        pulled: dict[str, int] = {}
        dispatched: dict[str, int] = {}
        finished: dict[str, tuple[int, float]] = {}
        async for raws in stream_pages(self.harness.redis, STREAM_KEY, 5000):
            for entry_id, fields in raws:
                kind = fields.get(b"type")
                if kind not in _TASK_KINDS:
                    continue
                ms = int(entry_id.split(b"-")[0])
                eval_id = fields[b"eval_id"].decode()
                if kind == b"task.pulled":
                    pulled[eval_id] = ms
                elif kind == b"task.dispatched":
                    dispatched[eval_id] = ms
                else:
                    finished[eval_id] = (ms, _duration.decode(fields[b"data"]).duration_ms)
        received = self.harness.listener.received
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


def summarise(
    scn: Scenario, r: RunResult, received: dict[str, float], others_cpu_s: dict[str, float]
) -> None:
    """The run's figures from the stack's view of it (``r.stack``), the messages received
    and the CPU and RSS readings."""
    st = r.stack
    r.done = int(st["reported"])
    r.outcomes = st["outcomes"]
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
    if r.done:
        r.cmds_per_task = sum(r.redis_calls.values()) / r.done
        r.rt_per_task = (r.redis_reads or 0) / r.done
        r.others_cpu_ms_per_task = {k: 1000 * v / r.done for k, v in others_cpu_s.items()}
    if len(r.rss_samples) >= 4:
        base = next((kb for frac, kb in r.rss_samples if frac >= 0.2), None)
        end = r.rss_samples[-1][1]
        if base:
            r.rss_drift_pct = 100 * (end - base) / base
    st.pop("reported_times", None)
