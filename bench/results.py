"""What ``bench.run`` measures: one router's run of a scenario, the replay, the whole run.

Every field goes to ``--json`` as it is (``dataclasses.asdict``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
    checkpoint_startup_seconds: float | None = None  # from a checkpoint of the whole stream
    checkpoint_folded: int | None = None  # entries folded after that checkpoint
    breakdown_s: dict[str, float] = field(default_factory=dict)
    breakdown_events_per_s: float | None = None
    stream_bytes: int | None = None
    source: str = ""


@dataclass
class TrickleCell:
    """One cell of the trickle scenario: a strategy, the wake-up on or off, a rate.

    Latencies in ms, per task: ``e2e`` from the announcement (the ``PUBLISH`` of
    ``evaluation:queued``, just before ``POST /tasks``) to the bench receiving
    ``evaluation:completed``; ``executor`` the executor's own time (its handler, timed in
    the executor); ``added`` = e2e - executor; ``execute_rt`` the ``duration_ms`` of
    ``task.completed`` (the worker's ``POST /execute`` round trip)."""

    strategy: str
    wake: bool
    rate: float
    seconds: float
    sent: int = 0
    send_errors: int = 0  # arrivals whose PUBLISH or POST /tasks failed (not in ``sent``)
    completed: int = 0
    failed: int = 0
    e2e_ms: dict[str, float | None] = field(default_factory=dict)  # p50, p95, p99, max
    added_ms: dict[str, float | None] = field(default_factory=dict)
    executor_ms: dict[str, float | None] = field(default_factory=dict)
    added_vs_execute_rt_ms: dict[str, float | None] = field(default_factory=dict)
    post_ms: dict[str, float | None] = field(default_factory=dict)  # POST /tasks answered
    # added split in three (p50, p95, p99, max): the PUBLISH → the queue hands the task
    # out; → the executor receives it (a wait for a free slot is here); the executor
    # answers → the bench receives evaluation:completed
    split_ms: dict[str, dict[str, float | None]] = field(default_factory=dict)
    # added, over the tasks announced while an executor slot was free (no queueing for one)
    added_free_ms: dict[str, float | None] = field(default_factory=dict)
    announced_all_busy: int = 0  # tasks announced while every slot was busy
    slow_share: float | None = None  # tasks run by the 250 ms executor / completed
    per_executor: dict[str, int] = field(default_factory=dict)
    polls: int = 0  # GET /tasks/next seen by the queue during the cell
    worker_cpu_ms_per_task: float | None = None  # the worker's CPU over the cell / tasks
    machine_busy_pct: float | None = None  # the whole machine's, other users' included
    wakeups: int | None = None  # the worker's live.wakeups during the cell
    long_polls: int | None = None
    error: str | None = None


@dataclass
class TrickleIdle:
    """An idle worker (default settings, no task) over ``seconds`` after ``settle_s``."""

    seconds: float
    settle_s: float
    poll_interval_s: float
    queue_polls: int = 0  # GET /tasks/next seen by the queue
    worker_polls: int | None = None  # the worker's live.polls
    long_polls: int | None = None


@dataclass
class TrickleResult:
    cells: list[TrickleCell] = field(default_factory=list)
    idle: TrickleIdle | None = None
    arrivals: str = "poisson"
    poll_interval_s: float = 1.0
    slow_executor: str = ""


Results = dict[str, dict[str, RunResult]]  # scenario → router → its run


@dataclass
class Outcome:
    results: Results
    replay: ReplayResult | None
    seconds: float
    workdir: Path
    trickle: TrickleResult | None = None
