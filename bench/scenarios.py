"""The scenarios of ``bench.run``: what each runs, its sizes and time budgets, its limit.

A scenario sets the simulated executors (``bench.stack``: count, latency, capacity, a
slow one, one whose ``GET /health`` hangs), how many tasks a run routes (full and
``--quick``), which routers it runs and how long each may take. ``limit()`` is the
executor-bound rate that ``util`` and the executor-bound target are measured against.

``trickle`` is a latency scenario (``bench.trickle``): tasks arrive one at a time at a
set rate and its cells are our worker's settings, not the three routers. It is run
only when named (``--scenario trickle``), not by ``all``.
"""

from __future__ import annotations

from dataclasses import dataclass

ROUTERS = ("ours", "baseline", "ceiling")


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
    count_polls: bool = False  # the queue counts GET /tasks/next
    routers: tuple[str, ...] = ROUTERS
    budget_s: float = 300.0  # ours and ceiling
    quick_budget_s: float = 45.0
    baseline_s: float = 20.0  # the baseline is time-boxed
    quick_baseline_s: float = 4.0

    def n(self, quick: bool) -> int:
        return self.quick_tasks if quick else self.tasks

    def budget(self, quick: bool) -> float:
        """How long ours and the ceiling may take."""
        return self.quick_budget_s if quick else self.budget_s

    def deadline_s(self, router: str, quick: bool) -> float:
        """How long a reference router routes before it stops by itself."""
        if router == "baseline":
            return self.quick_baseline_s if quick else self.baseline_s
        return self.budget(quick)

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

    def stack_argv(self) -> list[str]:
        """The ``bench.stack`` options that serve this scenario's executors."""
        return ["--count-polls"] * self.count_polls + [
            "--executors", str(self.executors),
            "--latency-ms", str(self.latency_ms),
            "--capacity", str(self.capacity),
            "--slow-index", str(self.slow_index),
            "--slow-factor", str(self.slow_factor),
            "--hang-health-index", str(self.hang_health_index),
        ]  # fmt: skip


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
            "trickle",
            "open-loop arrivals at 20/s and 5/s on 3 x 50 ms + 1 x 250 ms executors, "
            "capacity 1: latency to evaluation:completed, per strategy, wake-up on and off",
            tasks=0,  # set by the arrival rate and the cell's length (bench.trickle)
            quick_tasks=0,
            latency_ms=50,
            capacity=1,
            executors=4,
            slow_index=3,
            count_polls=True,
            routers=(),
        ),
        Scenario(
            "replay",
            "start-up fold of the soak's stream, or a synthetic one of about 1M entries",
            tasks=170_000,  # about 1M entries (six a task)
            quick_tasks=6_000,
            routers=(),
        ),
    )
}

ON_DEMAND = ("trickle",)  # run only when named, not by ``--scenario all``
