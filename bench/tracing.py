"""What exporting spans costs: the instant scenario with tracing off and on.

    .venv/bin/python -m bench.tracing            # 2 rounds of 3,000 tasks each way (~1 min)
    .venv/bin/python -m bench.tracing --tasks 10000 --rounds 3

Runs the ``instant`` scenario (3 executors x capacity 8, no latency: router-bound)
with our worker as its own process, alternately with tracing off and with
``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing at an OTLP/HTTP receiver in this process
(``queue_worker.devstack.otlp``, which decodes every export). Each run has a stream of
its own (``STREAM_PREFIX``), so no run replays another's. A run with tracing on ends
when the receiver got every task's root span, so the export's work is inside it. It
prints the worker's CPU per task (user + system, from ``/proc``) and Redis's for each
run, the median of each mode and their ratio. The machine is shared: compare medians of rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass

from bench.common import log_dir
from bench.processes import CpuMeter, Harness, Stack
from bench.scenarios import SCENARIOS
from queue_worker.devstack.otlp import OTLP_RECEIVER, OtlpReceiver, create_otlp_app
from queue_worker.devstack.serve import Server


@dataclass
class Run:
    traced: bool
    tasks: int
    seconds: float
    cpu_s: float
    redis_cpu_s: float
    spans: int

    @property
    def cpu_ms_per_task(self) -> float:
        return 1000 * self.cpu_s / self.tasks

    @property
    def redis_ms_per_task(self) -> float:
        return 1000 * self.redis_cpu_s / self.tasks


async def _run(
    h: Harness, stack: Stack, receiver: OtlpReceiver, url: str, n: int, traced: bool, seq: int
) -> Run:
    scn = SCENARIOS["instant"]
    env = {"STREAM_PREFIX": f"bench-tracing-{seq}"}
    if traced:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = url
    child, _ = await h.start_worker(scn, stack, env=env)
    try:
        before = await stack.progress()
        spans0 = len(receiver.spans)
        roots0 = sum(s.name == "evaluation" for s in receiver.spans)
        meter = CpuMeter(child.pid, {"redis": h.redis_pid})
        started = time.perf_counter()
        await stack.fill(n, f"t{seq}")
        deadline = started + 600
        while time.perf_counter() < deadline:
            done = (await stack.progress())["reported"] - before["reported"] >= n
            if traced:
                roots = sum(s.name == "evaluation" for s in receiver.spans) - roots0
                done = done and roots >= n
            if done:
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError(f"run {seq} did not finish within 600 s")
        seconds = time.perf_counter() - started
        reading = meter.stop()
    finally:
        await child.stop()
    assert reading.router_s is not None
    redis_s = reading.others_s["redis"]
    return Run(traced, n, seconds, reading.router_s, redis_s, len(receiver.spans) - spans0)


async def main_async(args: argparse.Namespace) -> int:
    server = Server(create_otlp_app())
    await server.start()
    receiver = server.app[OTLP_RECEIVER]
    runs: list[Run] = []
    with log_dir("bench-tracing-", keep=args.keep_logs) as workdir:
        async with Harness(workdir, log_level="WARNING", listen=False) as h:
            stack = await h.start_stack(SCENARIOS["instant"])
            try:
                seq = 0
                for _ in range(args.rounds):
                    for traced in (False, True):
                        seq += 1
                        run = await _run(h, stack, receiver, server.url, args.tasks, traced, seq)
                        runs.append(run)
                        print(
                            f"tracing {'on ' if traced else 'off'}: {run.tasks} tasks in "
                            f"{run.seconds:.1f} s ({run.tasks / run.seconds:.0f}/s), "
                            f"{run.cpu_ms_per_task:.3f} ms CPU per task "
                            f"(Redis {run.redis_ms_per_task:.3f} ms), {run.spans} spans",
                            flush=True,
                        )
            finally:
                await stack.stop()
    await server.stop()
    off = statistics.median(r.cpu_ms_per_task for r in runs if not r.traced)
    on = statistics.median(r.cpu_ms_per_task for r in runs if r.traced)
    spans = statistics.median(r.spans / r.tasks for r in runs if r.traced)
    redis_off = statistics.median(r.redis_ms_per_task for r in runs if not r.traced)
    redis_on = statistics.median(r.redis_ms_per_task for r in runs if r.traced)
    print(
        f"\nmedian CPU per task: off {off:.3f} ms, on {on:.3f} ms, "
        f"ratio {on / off:.2f} (+{on - off:.3f} ms; {spans:.1f} spans per task); "
        f"Redis: off {redis_off:.3f} ms, on {redis_on:.3f} ms (+{redis_on - redis_off:.3f} ms)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=3000, help="tasks per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each mode")
    parser.add_argument("--keep-logs", action="store_true")
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
