"""The tasks this worker holds: one record per ``eval_id`` from its pull to its outcome.

A record is reserved when a task is pulled (or recovered) and released once its
outcome is recorded; it holds what the other parts need to know about the task
while it runs: the queue it came from (reports and lease renewals go there), its
lease, and where it is (its stage, executor and attempt), which is what a stream
reset re-records. The registry also keeps the outcomes recorded lately until the
queue acknowledged them, so that a reset that lost them can record them again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from queue_worker.router.queue_client import QueueClient
from queue_worker.streams import events as ev
from queue_worker.streams.views import StatusView

# Outcomes kept for a reset until the queue acknowledged them; beyond this many bytes
# the oldest are forgotten (a reset then loses them, as it would without this).
OUTCOMES_MAX_BYTES = 64 << 20


@dataclass(slots=True)
class InFlight:
    """One task this worker holds."""

    task: ev.Task
    queue_url: str  # where it came from (the report and the lease go there)
    client: QueueClient
    lease_s: float | None = None  # the queue's lease while it holds one
    stage: str = "pulled"  # pulled, waiting, dispatched, throttled, retrying, recovered
    executor: str | None = None
    attempt: int = 0
    cancel: tuple[str, str] | None = None  # (by, reason) once an operator cancelled it
    finishing: bool = False  # its outcome is being recorded: too late to cancel
    # An attempt cut off by a cancel while the executor ran it: (selection, the POST
    # /execute still going, its attempt number), for the cancel to tell and wait for.
    abandoned: tuple[Any, asyncio.Future[Any], int] | None = None
    # The stream id of the latest task.dispatched: the attempt's span is derived from it
    # (the traceparent sent on POST /execute names that span).
    dispatch_id: str | None = None

    def restored(self) -> ev.TaskRestored:
        """The entry that re-records this task after a stream reset."""
        return ev.TaskRestored(
            eval_id=self.task.eval_id,
            task=self.task,
            stage=self.stage,
            executor=self.executor,
            attempt=self.attempt,
            lease_s=self.lease_s,
            queue=self.queue_url,
            trace_id=self.task.trace_id,
        )


Terminal = ev.TaskCompleted | ev.TaskFailed


def _size(event: Terminal) -> int:
    result = event.result or {}
    text = [result.get("output"), result.get("error"), getattr(event, "error", None)]
    return 256 + sum(len(t) for t in text if isinstance(t, str))


class InFlightRegistry:
    """``eval_id`` -> :class:`InFlight`, and the outcomes not yet acknowledged."""

    def __init__(self) -> None:
        self._tasks: dict[str, InFlight] = {}
        self._outcomes: dict[str, tuple[str, Terminal, int]] = {}  # oldest first
        self._outcome_bytes = 0
        self.outcomes_forgotten = 0

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, eval_id: object) -> bool:
        return eval_id in self._tasks

    def __iter__(self) -> Iterator[InFlight]:
        return iter(list(self._tasks.values()))

    def trace_id(self, eval_id: str) -> str | None:
        """The trace of a task held here (``None``: not held, or untraced)."""
        record = self._tasks.get(eval_id)
        return None if record is None else record.task.trace_id

    def get(self, eval_id: str) -> InFlight | None:
        return self._tasks.get(eval_id)

    def reserve(
        self,
        task: ev.Task,
        queue_url: str,
        client: QueueClient,
        *,
        lease_s: float | None = None,
        attempt: int = 0,
        stage: str = "pulled",
    ) -> InFlight:
        """Hold ``task``; raises ``KeyError`` when it is held already."""
        if task.eval_id in self._tasks:
            raise KeyError(task.eval_id)
        record = InFlight(task, queue_url, client, lease_s, stage=stage, attempt=attempt)
        self._tasks[task.eval_id] = record
        return record

    def release(self, eval_id: str) -> None:
        self._tasks.pop(eval_id, None)

    def leased(self) -> list[InFlight]:
        return [t for t in self._tasks.values() if t.lease_s is not None]

    # --- outcomes until acknowledged ---------------------------------------------------

    def recorded(self, entry_id: str, outcome: Terminal) -> None:
        """``outcome`` is in the stream as ``entry_id``; keep it until it is acknowledged."""
        size = _size(outcome)
        old = self._outcomes.pop(outcome.eval_id, None)
        if old is not None:
            self._outcome_bytes -= old[2]
        self._outcomes[outcome.eval_id] = (entry_id, outcome, size)
        self._outcome_bytes += size
        while self._outcome_bytes > OUTCOMES_MAX_BYTES and self._outcomes:
            self._forget(next(iter(self._outcomes)))
            self.outcomes_forgotten += 1

    def acknowledged(self, view: StatusView) -> None:
        """Forget the oldest outcomes the queue acknowledged (``StatusView.acknowledged``)."""
        while self._outcomes:
            eval_id, (entry_id, _, _) = next(iter(self._outcomes.items()))
            if not view.acknowledged(eval_id, entry_id):
                return
            self._forget(eval_id)

    def _forget(self, eval_id: str) -> None:
        _, _, size = self._outcomes.pop(eval_id)
        self._outcome_bytes -= size

    def kept_outcomes(self) -> list[tuple[str, Terminal]]:
        """The outcomes not known as acknowledged, with their entry ids, oldest first."""
        return [(entry_id, outcome) for entry_id, outcome, _ in self._outcomes.values()]
