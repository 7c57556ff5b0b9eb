"""``GET /metrics``: Prometheus metrics, as a projection of the stream plus live gauges.

* :class:`MetricsProjector` folds stream entries (``observe(entry)``) into
  counters and histograms: tasks by outcome and executor, routing failures
  by reason, events appended by type, task duration, routing overhead. It
  counts only this worker's entries, and it is fed by the status projector
  from the start of the stream, so its counters survive a restart like the
  ``/status`` counters do.
* :class:`LiveCollector` reads what only the process knows at scrape time:
  queue polls, pub/sub publishes, executor health and load, the stream's
  length and each consumer group's lag and pending count.

Each app has its own :class:`CollectorRegistry` (never the global default). The route is
declared in ``ROUTES``, which registers it and is its part of the OpenAPI document.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from queue_worker import __version__
from queue_worker.http.ops import BACKLOG, QueueBacklog
from queue_worker.http.state import (
    LIVENESS,
    PUBLISHER,
    ROUTER,
    SESSION,
    SETTINGS,
    SPANS,
    STORE,
    SUPERVISOR,
)
from queue_worker.openapi.operations import Handler, Response, RouteTable
from queue_worker.streams import events as ev
from queue_worker.streams.events import Entry

NS = "queue_worker"
# Verdicts of the executor itself; every other ``task.failed`` reason is a routing failure.
EXECUTION_VERDICTS = frozenset({"execution_failed", "execution_timeout"})
DURATION_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
REDIS_TIMEOUT_S = 2.0


class MetricsProjector:
    """Counters and histograms folded from the entries written by ``worker_id`` (all if None)."""

    def __init__(self, registry: CollectorRegistry, worker_id: str | None = None) -> None:
        self.worker_id = worker_id
        self.tasks = Counter(
            f"{NS}_tasks",
            "Tasks that reached an outcome (completed, failed, rejected), by executor.",
            ["outcome", "executor"],
            registry=registry,
        )
        self.routing_failures = Counter(
            f"{NS}_routing_failures",
            "Failed attempts (retried or final) not due to the executor's verdict, by reason.",
            ["reason"],
            registry=registry,
        )
        self.throttles = Counter(
            f"{NS}_executor_throttles",
            "Answers of 429/503 to /execute (executor.throttled), by executor.",
            ["executor"],
            registry=registry,
        )
        self.events = Counter(
            f"{NS}_events_appended",
            "Entries this worker appended to the event stream, by type.",
            ["type"],
            registry=registry,
        )
        self.task_duration = Histogram(
            f"{NS}_task_duration_seconds",
            "Time an executor took on a task (duration_ms of task.completed/task.failed).",
            ["outcome", "executor"],
            buckets=DURATION_BUCKETS_S,
            registry=registry,
        )
        self.routing_overhead = Histogram(
            f"{NS}_routing_overhead_seconds",
            "Time from task.pulled to the first task.dispatched of the same evaluation.",
            buckets=OVERHEAD_BUCKETS_S,
            registry=registry,
        )
        self._pulled_ts: dict[str, int] = {}

    def observe(self, entry: Entry) -> None:
        if self.worker_id is not None and entry.worker_id != self.worker_id:
            return
        e = entry.event
        self.events.labels(e.type).inc()
        match e:
            case ev.TaskPulled():
                self._pulled_ts[e.eval_id] = entry.ts
            case ev.TaskDispatched():
                pulled = self._pulled_ts.pop(e.eval_id, None)
                if pulled is not None:
                    self.routing_overhead.observe(max(entry.ts - pulled, 0) / 1000)
            case ev.TaskCompleted():
                self._pulled_ts.pop(e.eval_id, None)
                self.tasks.labels("completed", e.executor).inc()
                self.task_duration.labels("completed", e.executor).observe(e.duration_ms / 1000)
            case ev.TaskFailed():
                self._pulled_ts.pop(e.eval_id, None)
                executor = e.executor or "none"
                self.tasks.labels("failed", executor).inc()
                if e.reason not in EXECUTION_VERDICTS:
                    self.routing_failures.labels(e.reason).inc()
                if e.executor is not None:
                    self.task_duration.labels("failed", executor).observe(e.duration_ms / 1000)
            case ev.TaskRetryScheduled():
                if e.reason not in EXECUTION_VERDICTS:
                    self.routing_failures.labels(e.reason).inc()
            case ev.TaskRejected():
                self.tasks.labels("rejected", "none").inc()
            case ev.ExecutorThrottled():
                self.throttles.labels(e.executor).inc()


class LiveCollector:
    """Gauges and counters read from the running app at scrape time.

    ``refresh()`` (async: Redis) runs just before each synchronous ``collect()``.
    """

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.redis_up = False
        self.length: int | None = None
        self.groups: list[dict[str, Any]] = []
        self.backlog: QueueBacklog | None = None

    async def refresh(self) -> None:
        backlog = self.app.get(BACKLOG)
        if backlog is not None and SESSION in self.app:
            self.backlog = await backlog.get()  # cached; never raises
        store = self.app.get(STORE)
        if store is None:
            return
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                self.length = await store.length()
                # The publisher's and the reporter's groups read the outcome stream; a
                # group of the same name left on the main stream (being retired) is not shown.
                groups = await store.info_groups(store.keys.outcomes)
                names = {g.get("name") for g in groups}
                groups += [g for g in await store.info_groups() if g.get("name") not in names]
                self.groups = groups
            self.redis_up = True
        except (aioredis.RedisError, OSError):
            self.redis_up, self.length, self.groups = False, None, []

    def collect(self) -> Iterable[Metric]:
        app = self.app
        settings = app[SETTINGS]
        info = GaugeMetricFamily(
            f"{NS}_info", "This worker's id and version.", labels=["worker_id", "version"]
        )
        info.add_metric([settings.worker_id, __version__], 1)
        yield info
        yield GaugeMetricFamily(f"{NS}_redis_up", "Redis answered the last scrape.", self.redis_up)
        router = app.get(ROUTER)
        if router is not None:
            polls = CounterMetricFamily(
                f"{NS}_queue_polls", "Polls of GET /tasks/next by result.", labels=["result"]
            )
            ok = router.polls - router.empty_polls - router.queue_errors
            for result, n in (
                ("ok", ok),
                ("empty", router.empty_polls),
                ("error", router.queue_errors),
            ):
                polls.add_metric([result], n)
            yield polls
            yield CounterMetricFamily(
                f"{NS}_wakeups",
                "Submissions announced on WAKE_CHANNEL (each made the worker poll at once).",
                router.wakeups,
            )
            healthy = GaugeMetricFamily(
                f"{NS}_executor_healthy",
                "1 when the executor's last check passed.",
                labels=["executor"],
            )
            in_flight = GaugeMetricFamily(
                f"{NS}_executor_in_flight",
                "Tasks running on the executor now.",
                labels=["executor"],
            )
            for x in router.pool.executors:
                healthy.add_metric([x.url], 1 if x.healthy else 0)
                in_flight.add_metric([x.url], x.in_flight)
            yield healthy
            yield in_flight
        publisher = app.get(PUBLISHER)
        if publisher is not None:
            yield CounterMetricFamily(
                f"{NS}_pubsub_published", "Messages PUBLISHed on evaluation:*.", publisher.published
            )
        store = app.get(STORE)
        if store is not None:  # what the append script could not write beside the entries
            for name, text, value in (
                ("outcome_ids_diverged", "Outcome copies that took an id of their own (the "
                 "outcome stream was ahead).", store.outcome_ids_diverged),
                ("outcome_copies_missing", "Outcomes the outcome stream took no id for (in "
                 "the main stream only: neither published nor reported).",
                 store.outcome_copies_missing),
                ("index_writes_refused", "Task index or retry budget writes Redis refused (a "
                 "key of another type): entries missing from the task views.",
                 store.index_writes_refused),
            ):  # fmt: skip
                yield CounterMetricFamily(f"{NS}_{name}", text, value)
        spans = app.get(SPANS)
        if spans is not None:  # tracing is on
            yield CounterMetricFamily(
                f"{NS}_spans_exported", "Spans this worker exported (OTLP).", spans.spans_exported
            )
            yield CounterMetricFamily(
                f"{NS}_span_exports_failed",
                "Exports of spans that failed (the batch is tried again).",
                spans.export_errors,
            )
        yield from self._health(app)
        if self.backlog is not None:
            backlog = GaugeMetricFamily(
                f"{NS}_queue_backlog",
                "Tasks waiting in each queue (its GET /stats `queued`), asked at most once per "
                "2 s; a queue that cannot tell is left out.",
                labels=["queue"],
            )
            for queue in self.backlog.queues:
                if queue.queued is not None:
                    backlog.add_metric([queue.url], queue.queued)
            yield backlog
        if self.length is not None:
            yield GaugeMetricFamily(
                f"{NS}_stream_length", "Entries in the stream (XLEN).", self.length
            )
        lag = GaugeMetricFamily(
            f"{NS}_projector_lag", "Entries not yet delivered to the group.", labels=["projector"]
        )
        pending = GaugeMetricFamily(
            f"{NS}_projector_pending", "Entries delivered, not acknowledged.", labels=["projector"]
        )
        for group in self.groups:
            if group.get("lag") is not None:
                lag.add_metric([str(group["name"])], float(group["lag"]))
            pending.add_metric([str(group["name"])], float(group.get("pending") or 0))
        yield lag
        yield pending

    def _health(self, app: web.Application) -> Iterable[Metric]:
        """Crashes of the background loops, and what stops the worker from pulling."""
        supervisor, store, liveness = app.get(SUPERVISOR), app.get(STORE), app.get(LIVENESS)
        if supervisor is not None:
            crashes = CounterMetricFamily(
                f"{NS}_loop_crashes",
                "Crashes of each background loop since the process started (each restarted, "
                "unless given up).",
                labels=["loop"],
            )
            for loop, n in sorted(supervisor.crashes.items()):
                crashes.add_metric([loop], n)
            yield crashes
            yield GaugeMetricFamily(
                f"{NS}_loops_given_up", "Loops that kept failing (the worker is stopping).",
                len(supervisor.failed),
            )  # fmt: skip
        if store is not None:
            yield GaugeMetricFamily(
                f"{NS}_redis_writable", "1 while Redis takes this worker's writes.",
                1 if store.writable and store.reachable else 0,
            )  # fmt: skip
            yield GaugeMetricFamily(
                f"{NS}_events_held", "Events waiting for Redis to take them.", store.held
            )
        if liveness is not None:
            yield GaugeMetricFamily(
                f"{NS}_fenced", "1 while the liveness key is late: no dispatch, no pull.",
                0 if liveness.ok else 1,
            )  # fmt: skip


@dataclass(frozen=True)
class Exposition:
    """What ``GET /metrics`` reads: the live gauges to refresh, then the app's registry."""

    live: LiveCollector
    expose: Handler


METRICS = web.AppKey("metrics", MetricsProjector)
EXPOSITION = web.AppKey("metrics_exposition", Exposition)
ROUTES = RouteTable(tag="monitoring")


@ROUTES.get(
    "/metrics",
    operation_id="getMetrics",
    summary="Prometheus metrics",
    description="Counters and histograms folded from the event stream (tasks by outcome and "
    "executor, routing failures, events by type, task duration, routing overhead) and live "
    "gauges (executor health and in-flight, queue polls, publishes, stream length, projector "
    "lag), in the Prometheus text format. Needs a token unless `METRICS_PUBLIC=true`.",
    access="metrics",
    responses={
        200: Response("The metrics.", "text/plain", example="queue_worker_stream_length 42.0\n")
    },
)
async def metrics(request: web.Request) -> web.StreamResponse:
    """The text exposition format, or OpenMetrics when asked."""
    exposition = request.app[EXPOSITION]
    await exposition.live.refresh()
    return await exposition.expose(request)


def register(app: web.Application) -> None:
    """Add ``GET /metrics`` and put the app's :class:`MetricsProjector` under ``METRICS``.

    The status projector must feed ``app[METRICS].observe`` with every entry it folds.
    """
    registry = CollectorRegistry()
    app[METRICS] = MetricsProjector(registry, worker_id=app[SETTINGS].worker_id)
    live = LiveCollector(app)
    registry.register(live)
    app[EXPOSITION] = Exposition(live, make_aiohttp_handler(registry))
    ROUTES.register(app)
