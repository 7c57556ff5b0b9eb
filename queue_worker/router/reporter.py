"""The reporter projector: terminal events become reports to the Queue Service.

At-least-once: a batch is reported (concurrently), then ``task.reported``
is appended for each, then the batch is acknowledged. A crash in between
reports again; the queue's ``404`` on ``/complete`` and ``not_found`` on
``/fail`` make that idempotent (``task.reported`` with ``already``).

Each outcome goes to the queue the task came from: the ``queue`` its terminal
event carries (copied from ``task.pulled``), else the default queue given here
(``QUEUE_SERVICE_URL``).

A result too large for the stream is read back whole from Redis for its report;
at most ``FULL_RESULT_REPORTS`` such reports run at once, so a batch of large
results does not hold them all in memory together.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from queue_worker.router.queue_client import QueueClient, QueueClients, ReportRefused
from queue_worker.streams import events as ev
from queue_worker.streams.projector import Batch, GroupProjector
from queue_worker.streams.store import EventStore
from queue_worker.streams.tracecontext import span_id, trace_headers

log = structlog.get_logger(__name__)

TRANSIENT_STATUSES = frozenset({0, 401, 403, 408, 429})
FULL_RESULT_REPORTS = 4


class Reporter(GroupProjector):
    name = "reporter"
    handles = ev.OUTCOME_TYPES
    outcomes_only = True  # reads the outcome stream

    def __init__(
        self,
        store: EventStore,
        group: str,
        consumer: str,
        queue: QueueClient,
        *,
        backoff_max_s: float = 30.0,
        on_nogroup: Callable[[], Awaitable[str]] | None = None,
        **kwargs: int,
    ) -> None:
        # kwargs: block_ms, batch, claim_idle_ms, max_deliveries (see GroupProjector)
        super().__init__(store, group, consumer, on_nogroup=on_nogroup, **kwargs)
        self.queues = QueueClients(queue)
        self.backoff_max_s = backoff_max_s
        self.reported = 0
        self.report_errors = 0
        self._full_results = asyncio.Semaphore(FULL_RESULT_REPORTS)

    async def _report_once(self, entry_id: str, event: ev.Event) -> ev.TaskReported | None:
        # The report's span is derived from the outcome's entry; its traceparent names it.
        trace_id = getattr(event, "trace_id", None)
        headers = trace_headers(trace_id, span_id(event.eval_id_or_empty, entry_id, "report"))
        match event:
            case ev.TaskCompleted():
                queue = self.queues.get(event.queue)
                if event.truncated:  # the whole output, kept aside, a few at a time
                    async with self._full_results:
                        output = await self.store.full_result(event) or event.result
                        status, already = await queue.complete(event.eval_id, output, headers)
                else:
                    status, already = await queue.complete(event.eval_id, event.result, headers)
                return ev.TaskReported(
                    eval_id=event.eval_id, outcome="completed", http_status=status,
                    already=already, trace_id=trace_id,
                )  # fmt: skip
            case ev.TaskFailed():
                queue = self.queues.get(event.queue)
                status, already = await queue.fail(event.eval_id, event.error, headers)
                return ev.TaskReported(
                    eval_id=event.eval_id, outcome="failed", http_status=status,
                    already=already, trace_id=trace_id,
                )  # fmt: skip
            case ev.TaskRejected(eval_id=str(eval_id)):
                error = f"invalid task payload: {event.reason}"
                status, already = await self.queues.get(event.queue).fail(eval_id, error)
                return ev.TaskReported(
                    eval_id=eval_id, outcome="failed", http_status=status, already=already
                )
        return None

    async def _report(self, entry_id: str, event: ev.Event) -> ev.TaskReported | None:
        """Report, retrying in place while the failure may pass (no answer, 5xx,
        401/403/408/429); any other refusal raises, so the entry stays pending and
        is dead-lettered after ``max_deliveries``."""
        delay = 0.2
        while True:
            try:
                return await self._report_once(entry_id, event)
            except ReportRefused as exc:
                if exc.http_status not in TRANSIENT_STATUSES and exc.http_status < 500:
                    raise
                self.report_errors += 1
                log.warning(
                    "report_failed",
                    eval_id=event.eval_id_or_empty,
                    error=str(exc),
                    retry_in_s=round(delay, 2),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max_s)

    async def handle(self, batch: Batch) -> None:
        reports = await asyncio.gather(
            *(self._report(entry_id, entry.event) for entry_id, entry in batch if entry is not None)
        )
        done = [r for r in reports if r is not None]
        if done:
            await self.store.append(*done)
            self.reported += len(done)
        await self.ack([entry_id for entry_id, _ in batch])
