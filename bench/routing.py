"""The routing benchmark: strategies and ejection against simulated executors.

``python -m bench.routing [--quick] [--part a,b,c] [--json FILE] [--keep-logs]``

Three simulated executors with capacity 1 each (``bench.stack``, its own process),
one private ``redis-server``, and the worker (``python -m queue_worker run``, its
own process) configured by environment, as in ``bench.run``:

* **a** — 50 ms each, the queue filled up front: throughput against the
  executor-bound limit of 60 tasks/s, for ``least_loaded`` and ``round_robin``.
* **b** — executor-1 takes 250 ms, the others 50 ms; tasks are offered at a
  steady 20/s: p50/p95/p99 latency from ``POST /tasks`` to the
  ``evaluation:completed`` message, ``least_loaded`` against ``round_robin``
  (``POLL_INTERVAL_S=0.01``, see below).
* **c** — 50 ms each, tasks at a steady 20/s; executor-1 answers HTTP 500 from
  ``t_fail`` to ``t_recover``: dispatches to it while ejected (should be 0), failed
  attempts, terminal failures, and whether it takes tasks again after it recovered.

Not a timed test: the figures go to docs/ROUTING.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from bench.common import BENCH_CODE, log_dir, percentile
from bench.processes import Harness, Stack
from bench.scenarios import Scenario
from queue_worker.streams import events as ev
from queue_worker.streams.keys import Keys
from queue_worker.streams.store import EventStore

LIMIT_A = 60.0
# With tasks offered at 20/s the queue is often empty; at the default 1 s between empty
# polls, tasks would wait for the next poll and arrive in bursts, and the poll interval
# (not the routing) would set the latency. (b) and (c) poll every 10 ms.
POLL_INTERVAL_S = "0.01"


def scenario(name: str, *, slow: bool = False) -> Scenario:
    return Scenario(
        name,
        "routing benchmark",
        tasks=0,
        quick_tasks=0,
        latency_ms=50,
        capacity=1,
        slow_index=0 if slow else -1,
        slow_factor=5.0,
    )


def latency_figures(sent: dict[str, float], received: dict[str, float]) -> dict[str, Any]:
    ms = [(received[k] - t) * 1000 for k, t in sent.items() if k in received]
    return {
        "done": len(ms),
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
    }


class RoutingBench:
    def __init__(self, harness: Harness, quick: bool) -> None:
        self.harness = harness
        self.quick = quick

    async def _wait_done(self, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if len(self.harness.listener.received) >= n:
                return
            await asyncio.sleep(0.05)

    async def _offer(
        self, queue: str, n: int, rate_per_s: float, prefix: str, *, at: dict[float, Any]
    ) -> dict[str, float]:
        """POST ``n`` tasks at a steady rate; ``at`` maps seconds into the run to actions."""
        sent: dict[str, float] = {}
        pending = sorted(at.items())
        start = time.monotonic()
        for i in range(n):
            target = start + i / rate_per_s
            while pending and pending[0][0] <= target - start:
                await pending.pop(0)[1]()
            await asyncio.sleep(max(0.0, target - time.monotonic()))
            eval_id = f"{prefix}-{i:05d}"
            sent[eval_id] = time.time()
            body = {"eval_id": eval_id, "code": BENCH_CODE, "timeout": 30}
            async with self.harness.http.post(f"{queue}/tasks", json=body) as resp:
                assert resp.status == 200, await resp.text()
        for _, action in pending:
            await action()
        return sent

    async def _control(self, executor: str, **changes: Any) -> None:
        async with self.harness.http.post(f"{executor}/_control", json=changes) as resp:
            assert resp.status == 200, await resp.text()

    async def _run(
        self, scn: Scenario, env: dict[str, str], body: Any
    ) -> tuple[Any, list[ev.Entry], Any, list[str]]:
        """Start the stack and the worker (``env`` added), run ``body(stack)``, stop them."""
        h = self.harness
        stack = await h.start_stack(scn)
        try:
            await h.redis.flushall()
            h.listener.reset()
            worker, _ = await h.start_worker(scn, stack, env=env)
            try:
                result = await body(stack)
                stats = await stack.stats()
            finally:
                await worker.stop()
            entries = await EventStore(h.redis, Keys(), "bench").read_all()
        finally:
            await stack.stop()
        return result, entries, stats, stack.executors

    # --- (a) throughput with a full queue --------------------------------------------

    async def full_queue(self, strategy: str) -> dict[str, Any]:
        n = 180 if self.quick else 600

        async def body(stack: Stack) -> dict[str, Any]:
            await stack.fill(n, "a")
            await self._wait_done(n, 120)
            return {}

        _, _, stats, _ = await self._run(scenario("a"), {"ROUTING_STRATEGY": strategy}, body)
        received = self.harness.listener.received
        done = len(received)
        window = max(received.values()) - stats["first_pull"] if received else 0.0
        rate = done / window if window else 0.0
        return {
            "strategy": strategy,
            "tasks": n,
            "done": done,
            "tasks_per_s": round(rate, 1),
            "of_limit": round(rate / LIMIT_A, 3),
            "executed": stats["executed"],
        }

    # --- (b) latency with a slow executor ---------------------------------------------

    async def slow_one(self, strategy: str) -> dict[str, Any]:
        n = 100 if self.quick else 300

        async def body(stack: Stack) -> dict[str, float]:
            sent = await self._offer(stack.queue, n, 20.0, "b", at={})
            await self._wait_done(n, 60)
            return sent

        env = {"ROUTING_STRATEGY": strategy, "POLL_INTERVAL_S": POLL_INTERVAL_S}
        sent, _, stats, _ = await self._run(scenario("b", slow=True), env, body)
        figures = latency_figures(sent, self.harness.listener.received)
        return {"strategy": strategy, "tasks": n, **figures, "executed": stats["executed"]}

    # --- (c) an executor failing mid-run -------------------------------------------

    async def failing(self) -> dict[str, Any]:
        n, t_fail, t_recover = (200, 2.0, 6.0) if self.quick else (400, 4.0, 12.0)
        env = {
            "ROUTING_STRATEGY": "least_loaded",
            "POLL_INTERVAL_S": POLL_INTERVAL_S,
            "EJECT_AFTER_FAILURES": "3",
            "EJECT_BASE_S": "2",
            "EJECT_MAX_S": "8",
            "HEALTH_INTERVAL_S": "1",
            "RETRY_BASE_MS": "20",
        }
        marks: dict[str, float] = {}

        async def body(stack: Stack) -> dict[str, float]:
            async def fail() -> None:
                marks["fail"] = time.time()
                await self._control(stack.executors[0], execute="error500")

            async def recover() -> None:
                marks["recover"] = time.time()
                await self._control(stack.executors[0], execute="normal")

            at = {t_fail: fail, t_recover: recover}
            sent = await self._offer(stack.queue, n, 20.0, "c", at=at)
            await self._wait_done(n, 60)
            return sent

        sent, entries, stats, executors = await self._run(scenario("c"), env, body)
        bad = executors[0]
        fail_ms, recover_ms = marks["fail"] * 1000, marks["recover"] * 1000
        ejections = ejections_of(entries, bad)
        during = {k: t for k, t in sent.items() if fail_ms <= t * 1000 < recover_ms}
        before = {k: t for k, t in sent.items() if t * 1000 < fail_ms}
        received = self.harness.listener.received
        return {
            "tasks": n,
            "done": len(received),
            "fail_at_s": t_fail,
            "recover_at_s": t_recover,
            "ejections": [
                {
                    "at_s": round((a - fail_ms) / 1000, 2),
                    "ejection_s": s,
                    "rejoined_after_s": None if b is None else round((b - a) / 1000, 2),
                }
                for a, b, s in ejections
            ],
            **dispatch_figures(entries, bad, (fail_ms, recover_ms), ejections),
            "latency_before": latency_figures(before, received),
            "latency_while_failing": latency_figures(during, received),
            "executed": stats["executed"],
        }


Ejection = tuple[int, int | None, float]  # ejected at, rejoined at (stream ms), ejection_s


def ejections_of(entries: list[ev.Entry], executor: str) -> list[Ejection]:
    ejections: list[Ejection] = []
    for e in entries:
        if isinstance(e.event, ev.ExecutorEjected) and e.event.executor == executor:
            ejections.append((e.ts, None, e.event.ejection_s))
        elif isinstance(e.event, ev.ExecutorRejoined) and e.event.executor == executor:
            start, _, seconds = ejections[-1]
            ejections[-1] = (start, e.ts, seconds)
    return ejections


def dispatch_figures(
    entries: list[ev.Entry], bad: str, failing_ms: tuple[float, float], ejections: list[Ejection]
) -> dict[str, int]:
    """Dispatches to the executor ``bad`` while it failed, while ejected and after it
    recovered; failed attempts on it; terminal failures."""
    fail_ms, recover_ms = failing_ms

    def ejected_at(ts: int) -> bool:
        return any(a < ts and (b is None or ts < b) for a, b, _ in ejections)

    to_bad = [
        e for e in entries if isinstance(e.event, ev.TaskDispatched) and e.event.executor == bad
    ]
    retries = [
        e for e in entries if isinstance(e.event, ev.TaskRetryScheduled) and e.event.executor == bad
    ]
    return {
        "dispatched_to_failing_while_failing": sum(
            1 for e in to_bad if fail_ms <= e.ts < recover_ms
        ),
        "dispatched_to_failing_while_ejected": sum(1 for e in to_bad if ejected_at(e.ts)),
        "failed_attempts_on_it": len(retries),
        "terminal_failures": sum(1 for e in entries if isinstance(e.event, ev.TaskFailed)),
        "dispatched_to_it_after_recovery": sum(1 for e in to_bad if e.ts >= recover_ms),
    }


async def run_all(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    parts = args.part.split(",")
    async with Harness(workdir, log_level="WARNING") as harness:
        rb = RoutingBench(harness, args.quick)
        if "a" in parts:
            out["a"] = [await rb.full_queue(s) for s in ("least_loaded", "round_robin")]
        if "b" in parts:
            out["b"] = [await rb.slow_one(s) for s in ("least_loaded", "round_robin")]
        if "c" in parts:
            out["c"] = await rb.failing()
    return out


def report(out: dict[str, Any]) -> None:
    if "a" in out:
        print("\n(a) 3 executors x 50 ms x capacity 1, full queue (limit 60 tasks/s)")
        print(f"{'strategy':<14} {'tasks':>6} {'tasks/s':>8} {'of limit':>9}  executed")
        for r in out["a"]:
            print(
                f"{r['strategy']:<14} {r['done']:>6} {r['tasks_per_s']:>8.1f} "
                f"{r['of_limit']:>9.2f}  {r['executed']}"
            )
    if "b" in out:
        print("\n(b) executor-1 250 ms, others 50 ms, capacity 1, 20 tasks/s offered")
        print(f"{'strategy':<14} {'tasks':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}  executed")
        for r in out["b"]:
            print(
                f"{r['strategy']:<14} {r['done']:>6} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} "
                f"{r['p99_ms']:>8.1f}  {r['executed']}"
            )
        ll, rr = out["b"]
        print(f"p95 least_loaded / round_robin = {ll['p95_ms'] / rr['p95_ms']:.2f} (target <= 0.5)")
    if "c" in out:
        c = out["c"]
        print(
            f"\n(c) executor-1 answers 500 from {c['fail_at_s']:g} s to {c['recover_at_s']:g} s, "
            "20 tasks/s, least_loaded, EJECT_AFTER_FAILURES=3, EJECT_BASE_S=2"
        )
        for key in (
            "done",
            "ejections",
            "dispatched_to_failing_while_failing",
            "dispatched_to_failing_while_ejected",
            "failed_attempts_on_it",
            "terminal_failures",
            "dispatched_to_it_after_recovery",
            "latency_before",
            "latency_while_failing",
            "executed",
        ):
            print(f"  {key}: {c[key]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.routing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="fewer tasks (about 1 min)")
    parser.add_argument("--part", default="a,b,c", help="comma list of a, b, c")
    parser.add_argument("--json", help="write every figure to this JSON file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    args = parser.parse_args(argv)
    with log_dir("qw-routing-", keep=args.keep_logs) as workdir:
        out = asyncio.run(run_all(args, workdir))
        report(out)
        if args.json:
            Path(args.json).write_bytes(msgspec.json.format(msgspec.json.encode(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
