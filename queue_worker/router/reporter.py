"""The reporter projector: terminal events become reports to the Queue Service.

At-least-once: a batch is reported (concurrently), then ``task.reported``
is appended for each, then the batch is acknowledged. A crash in between
reports again; the queue's ``404`` on ``/complete`` and ``not_found`` on
``/fail`` make that idempotent (``task.reported`` with ``already``).

Each outcome goes to the queue the task came from: the ``queue`` its terminal
event carries (copied from ``task.pulled``), else the default queue given here
(``QUEUE_SERVICE_URL``).
"""

from __future__ import annotations

import asyncio

import structlog

from queue_worker.router.queue_client import QueueClient, ReportRefused
from queue_worker.streams import events as ev
from queue_worker.streams.projector import Batch, GroupProjector
from queue_worker.streams.store import EventStore

log = structlog.get_logger(__name__)

TRANSIENT_STATUSES = frozenset({0, 401, 403, 408, 429})


class Reporter(GroupProjector):
    name = "reporter"
    handles = frozenset({b"task.completed", b"task.failed", b"task.rejected"})

    def __init__(
        self,
        store: EventStore,
        group: str,
        consumer: str,
        queue: QueueClient,
        *,
        backoff_max_s: float = 30.0,
        **kwargs: int,
    ) -> None:
        # kwargs: block_ms, batch, claim_idle_ms, max_deliveries (see GroupProjector)
        super().__init__(store, group, consumer, **kwargs)
        self.queue = queue
        self._queues: dict[str, QueueClient] = {queue.base_url: queue}
        self.backoff_max_s = backoff_max_s
        self.reported = 0
        self.report_errors = 0

    def queue_for(self, url: str | None) -> QueueClient:
        """The client of the queue at ``url`` (``None``: the default queue)."""
        if url is None:
            return self.queue
        client = self._queues.get(url.rstrip("/"))
        if client is None:
            client = self._queues[url.rstrip("/")] = self.queue.with_base_url(url)
        return client

    async def _report_once(self, event: ev.Event) -> ev.TaskReported | None:
        match event:
            case ev.TaskCompleted():
                output = await self.store.full_result(event) or event.result
                queue = self.queue_for(event.queue)
                status, already = await queue.complete(event.eval_id, output)
                return ev.TaskReported(
                    eval_id=event.eval_id, outcome="completed", http_status=status, already=already
                )
            case ev.TaskFailed():
                queue = self.queue_for(event.queue)
                status, already = await queue.fail(event.eval_id, event.error)
                return ev.TaskReported(
                    eval_id=event.eval_id, outcome="failed", http_status=status, already=already
                )
            case ev.TaskRejected(eval_id=str(eval_id)):
                error = f"invalid task payload: {event.reason}"
                status, already = await self.queue_for(event.queue).fail(eval_id, error)
                return ev.TaskReported(
                    eval_id=eval_id, outcome="failed", http_status=status, already=already
                )
        return None

    async def _report(self, event: ev.Event) -> ev.TaskReported | None:
        """Report, retrying in place while the failure may pass (no answer, 5xx,
        401/403/408/429); any other refusal raises, so the entry stays pending and
        is dead-lettered after ``max_deliveries``."""
        delay = 0.2
        while True:
            try:
                return await self._report_once(event)
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
            *(self._report(entry.event) for _, entry in batch if entry is not None)
        )
        done = [r for r in reports if r is not None]
        if done:
            await self.store.append(*done)
            self.reported += len(done)
        await self.ack([entry_id for entry_id, _ in batch])
