"""The performance benchmark: our worker against a serial baseline and a concurrent ceiling.

``python -m bench.run [--quick] [--scenario NAME[,NAME]] [--repeat K] [--profile] [--json FILE]``

(``--scenario trickle``: the latency scenario of ``bench.trickle``, run only when named.)

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
import sys
import time
from pathlib import Path

from bench.common import log_dir
from bench.measure import Runner
from bench.processes import Harness
from bench.replay import replay as measure_replay
from bench.report import print_report, replay_summary
from bench.results import Outcome, ReplayResult, Results, TrickleResult
from bench.scenarios import ON_DEMAND, ROUTERS, SCENARIOS
from bench.trickle import run_trickle


async def run_all(args: argparse.Namespace, names: list[str], workdir: Path) -> Outcome:
    results: Results = {}
    replay: ReplayResult | None = None
    trickle: TrickleResult | None = None
    started = time.monotonic()

    def progress(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", file=sys.stderr, flush=True)

    async with Harness(
        workdir, log_level=args.log_level, extra_env=_env(args.worker_env)
    ) as harness:
        runner = Runner(harness, quick=args.quick, repeat=args.repeat)
        soak = False  # whether the stream in Redis is the soak's, for the replay
        for name in names:
            scn = SCENARIOS[name]
            if name == "replay":
                replay = await measure_replay(harness, scn, quick=args.quick, soak_stream=soak)
                progress(replay_summary(replay))
                continue
            if name == "trickle":
                trickle = await run_trickle(
                    harness, scn, quick=args.quick, arrivals=args.arrivals, progress=progress
                )
                continue
            results[name] = {}
            for router in [x for x in scn.routers if x in args.routers.split(",")]:
                r = await runner.median_run(scn, router, scn.n(args.quick))
                results[name][router] = r
                late = " (timed out)" if r.timed_out else ""
                progress(f"{name}/{router}: {r.done} tasks, {r.tasks_per_s:.1f}/s{late}")
            soak = name == "soak"
        if args.profile:
            scn = SCENARIOS[args.profile_scenario]
            r = await runner.run(scn, "ours", args.profile_tasks, profile=Path(args.profile_out))
            progress(f"profile run of ours on {scn.name}: {r.tasks_per_s:.0f}/s")
    return Outcome(results, replay, time.monotonic() - started, workdir, trickle)


def _env(items: list[str]) -> dict[str, str]:
    """``--worker-env NAME=VALUE`` options as a mapping (the last of a name wins)."""
    env: dict[str, str] = {}
    for item in items:
        name, _, value = item.partition("=")
        env[name] = value
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="few tasks: the run takes < 2 min")
    parser.add_argument(
        "--scenario",
        default="all",
        help=f"comma list of {', '.join(SCENARIOS)} (default: all, which is every one "
        f"but {', '.join(ON_DEMAND)})",
    )
    parser.add_argument(
        "--arrivals",
        default="poisson",
        choices=("poisson", "even"),
        help="trickle: Poisson arrivals (fixed seed) or evenly spaced (default: poisson)",
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
    everything = [x for x in SCENARIOS if x not in ON_DEMAND]
    names = everything if args.scenario == "all" else args.scenario.split(",")
    unknown = [x for x in names if x not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown}; choose from {', '.join(SCENARIOS)}")
    with log_dir("qw-bench-", keep=args.keep_logs) as workdir:
        outcome = asyncio.run(run_all(args, names, workdir))
        print_report(args, outcome)
    return 0


if __name__ == "__main__":
    sys.exit(main())
