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

Each app has its own :class:`CollectorRegistry` (never the global default).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from queue_worker import __version__
from queue_worker.http.state import PUBLISHER, ROUTER, SETTINGS, STORE
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


class LiveCollector:
    """Gauges and counters read from the running app at scrape time.

    ``refresh()`` (async: Redis) runs just before each synchronous ``collect()``.
    """

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.redis_up = False
        self.length: int | None = None
        self.groups: list[dict[str, Any]] = []

    async def refresh(self) -> None:
        store = self.app.get(STORE)
        if store is None:
            return
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                self.length = await store.length()
                self.groups = await store.info_groups()
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


METRICS = web.AppKey("metrics", MetricsProjector)


def register(app: web.Application) -> None:
    """Add ``GET /metrics`` and put the app's :class:`MetricsProjector` under ``METRICS``.

    The status projector must feed ``app[METRICS].observe`` with every entry it folds.
    """
    registry = CollectorRegistry()
    app[METRICS] = MetricsProjector(registry, worker_id=app[SETTINGS].worker_id)
    live = LiveCollector(app)
    registry.register(live)
    expose = make_aiohttp_handler(registry)

    async def metrics(request: web.Request) -> web.StreamResponse:
        """Prometheus metrics (text exposition format, or OpenMetrics when asked)."""
        await live.refresh()
        return await expose(request)

    app.router.add_get("/metrics", metrics, allow_head=False)
