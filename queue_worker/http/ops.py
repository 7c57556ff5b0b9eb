"""What the dashboard shows beside ``/status``: the queue's backlog and the throughput.

* ``GET /queue/backlog``: each queue's own counts (``GET /stats`` of every queue of
  ``QUEUE_SERVICE_URLS``, else ``QUEUE_SERVICE_URL``: ``queued`` is the backlog), asked
  on demand and kept ``BACKLOG_TTL_S``, so that any number of pages and scrapes cost
  each queue one call per that time. The answer is read capped and only its
  whole-number fields are kept
  (:meth:`~queue_worker.router.queue_client.QueueClient.counts`); a queue that cannot
  be reached or answers nonsense is shown as such, never raised. ``/metrics`` exports each
  backlog as ``queue_worker_queue_backlog{queue}`` (for autoscaling).
* ``GET /throughput``: tasks completed and failed per second over the last five minutes,
  and the task duration p50/p95 per executor (``duration_ms`` of its latest
  ``task.completed``), folded from the stream by the status view, so a reload of the page
  (or another replica) shows the same history.

The routes are declared in ``ROUTES``, which registers them and is their part of the
OpenAPI document.
"""

from __future__ import annotations

import asyncio
import math
import time

import msgspec
from aiohttp import web

from queue_worker.http.handlers import json_response
from queue_worker.http.state import SESSION, SETTINGS, STATUS
from queue_worker.openapi.operations import RouteTable, json_body
from queue_worker.router.queue_client import QueueClient, QueueUnavailable
from queue_worker.streams.views import FINISHED_WINDOW_MS

BACKLOG_TTL_S = 2.0
BACKLOG_TIMEOUT_S = 2.0
ROUTES = RouteTable(tag="monitoring")


class QueueCounts(msgspec.Struct, frozen=True, kw_only=True):
    """One queue's counts as last asked (``checked_ms``), or why they are unknown."""

    url: str
    reachable: bool
    queued: int | None  # tasks waiting in the queue: its backlog
    running: int | None  # tasks the queue has handed out and not had reported
    checked_ms: int  # when the queue was asked (unix ms)
    error: str | None = None  # why the counts are unknown


class QueueBacklog(msgspec.Struct, frozen=True, kw_only=True):
    """Every queue this worker pulls from (``QUEUE_SERVICE_URLS``, else
    ``QUEUE_SERVICE_URL``), and their backlogs summed."""

    queued: int | None  # the sum of the queues' known backlogs (None: none known)
    queues: list[QueueCounts]


class SecondCounts(msgspec.Struct, frozen=True, kw_only=True):
    second: int  # unix time in seconds
    completed: int
    failed: int


class ExecutorDurations(msgspec.Struct, frozen=True, kw_only=True):
    executor: str
    samples: int  # the latest task.completed durations these come from
    p50_ms: float
    p95_ms: float


class Throughput(msgspec.Struct, frozen=True, kw_only=True):
    window_s: int
    per_second: list[SecondCounts]  # oldest first; seconds without an outcome are left out
    durations: list[ExecutorDurations]


BACKLOG_EXAMPLE = QueueBacklog(
    queued=120,
    queues=[
        QueueCounts(
            url="http://queue:8081", reachable=True, queued=120, running=8,
            checked_ms=1764590000120,
        )
    ],
)  # fmt: skip
THROUGHPUT_EXAMPLE = Throughput(
    window_s=FINISHED_WINDOW_MS // 1000,
    per_second=[SecondCounts(second=1764590000, completed=14, failed=1)],
    durations=[
        ExecutorDurations(executor="http://executor-1:8083", samples=256, p50_ms=41.5, p95_ms=180)
    ],
)


class BacklogCache:
    """The queue's counts, asked at most once per ``BACKLOG_TTL_S`` (one call at a time)."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.last: QueueBacklog | None = None
        self._at = -math.inf
        self._lock = asyncio.Lock()

    async def get(self) -> QueueBacklog:
        async with self._lock:
            if self.last is not None and time.monotonic() - self._at < BACKLOG_TTL_S:
                return self.last
            settings = self.app[SETTINGS]
            default = QueueClient.from_settings(self.app[SESSION], settings)
            urls = settings.queue_service_urls or (settings.queue_service_url,)
            asks = (_ask(default.with_base_url(url.rstrip("/")), url) for url in urls)
            queues = list(await asyncio.gather(*asks))
            known = [q.queued for q in queues if q.queued is not None]
            self.last = QueueBacklog(queued=sum(known) if known else None, queues=queues)
            self._at = time.monotonic()
            return self.last


async def _ask(client: QueueClient, url: str) -> QueueCounts:
    """One queue's counts; never raises."""
    now_ms = time.time_ns() // 1_000_000
    try:
        async with asyncio.timeout(BACKLOG_TIMEOUT_S):
            counts = await client.counts()
    except (QueueUnavailable, TimeoutError) as exc:
        error = (str(exc) or type(exc).__name__)[:300]
        return QueueCounts(
            url=url, reachable=False, queued=None, running=None, checked_ms=now_ms, error=error
        )
    queued, running = counts.get("queued"), counts.get("running")
    return QueueCounts(
        url=url, reachable=True, queued=queued, running=running, checked_ms=now_ms,
        error=None if queued is not None else "the queue's /stats has no queued count",
    )  # fmt: skip


BACKLOG = web.AppKey("queue_backlog", BacklogCache)


@ROUTES.get(
    "/queue/backlog",
    operation_id="getQueueBacklog",
    summary="The queue's backlog",
    description="Each queue's own counts (its `GET /stats`; every queue of "
    "`QUEUE_SERVICE_URLS`, else `QUEUE_SERVICE_URL`): `queued` is its backlog, `running` the "
    "tasks it handed out; the top `queued` is their sum. Asked on demand, at most once per "
    f"{BACKLOG_TTL_S:g} s (`checked_ms` says when); a queue that cannot be reached is shown "
    "with `reachable: false`, one that answers anything but a JSON object of counts with "
    "`queued: null`, each with the reason. `/metrics` exports each backlog as "
    "`queue_worker_queue_backlog{queue}`.",
    access="read",
    responses={200: json_body("The queue's counts.", BACKLOG_EXAMPLE)},
)
async def queue_backlog(request: web.Request) -> web.Response:
    return json_response(await request.app[BACKLOG].get())


def percentile(sorted_values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of a sorted, non-empty list."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


@ROUTES.get(
    "/throughput",
    operation_id="getThroughput",
    summary="Tasks finished per second, and task durations per executor",
    description="Tasks completed and failed per second over the last "
    f"{FINISHED_WINDOW_MS // 60_000} minutes of the stream (every worker's; a second is the "
    "time of the outcome's entry), and per executor the p50 and p95 of `duration_ms` of its "
    "latest `task.completed` (the time the executor took; `samples` says over how many). "
    "Folded from the stream, so it survives a reload of the page and a restart.",
    access="read",
    responses={200: json_body("The history.", THROUGHPUT_EXAMPLE)},
)
async def throughput(request: web.Request) -> web.Response:
    view = request.app[STATUS].view
    newest = max(view.finished_per_s, default=0)
    first = newest - FINISHED_WINDOW_MS // 1000
    per_second = [
        SecondCounts(second=second, completed=counts[0], failed=counts[1])
        for second, counts in sorted(view.finished_per_s.items())
        if second > first
    ]
    durations = []
    for executor, kept in sorted(view.durations_ms.items()):
        if kept:
            ordered = sorted(kept)
            durations.append(
                ExecutorDurations(
                    executor=executor,
                    samples=len(ordered),
                    p50_ms=round(percentile(ordered, 0.5), 3),
                    p95_ms=round(percentile(ordered, 0.95), 3),
                )
            )
    return json_response(
        Throughput(window_s=FINISHED_WINDOW_MS // 1000, per_second=per_second, durations=durations)
    )


def register(app: web.Application) -> None:
    """Add ``/queue/backlog`` and ``/throughput`` to ``app`` (the backlog under ``BACKLOG``)."""
    app[BACKLOG] = BacklogCache(app)
    ROUTES.register(app)
