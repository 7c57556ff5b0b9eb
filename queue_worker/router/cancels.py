"""An operator's cancel of a task held here: what it records, and what it tells the executor.

A task cancelled before it was sent is never dispatched. A task whose ``POST /execute``
is under way is abandoned: the executor is asked to abort it (``POST
/execute/{eval_id}/cancel``), and the abandoned call keeps its executor slot until it is
answered; that late answer is recorded as ``task.answer_discarded``. Either way
``task.cancelled`` records the cancel, and the task ends as ``task.failed`` with reason
and error ``cancelled`` (:meth:`Cancels.cancelled`, run by
:class:`~queue_worker.router.attempts.Attempts`).
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import aiohttp
import structlog

from queue_worker.router.dispatch import Executed, Outcome
from queue_worker.router.executors import ExecutorPool
from queue_worker.router.inflight import InFlight
from queue_worker.router.selection import Selection
from queue_worker.router.terminals import EJECT_REASON_BYTES, Terminal, cap_text
from queue_worker.streams import events as ev
from queue_worker.streams.store import RECORDING_ERRORS, EventStore

log = structlog.get_logger(__name__)

CANCELLED = "cancelled"  # the reason and the error of a task an operator cancelled
CANCEL_TIMEOUT_S = 2.0  # how long the executor's POST /execute/{eval_id}/cancel may take


class Cancels:
    """Records the cancels of the tasks held here; holds the abandoned attempts' answers."""

    def __init__(
        self, store: EventStore, session: aiohttp.ClientSession, pool: ExecutorPool
    ) -> None:
        self.store = store
        self.session = session
        self.pool = pool
        self.late: set[asyncio.Task[None]] = set()  # waiting for cancelled attempts' answers

    async def cancelled(self, record: InFlight, log_: Any) -> Terminal:
        """Record the cancel (telling the executor that runs the task, if one does) and
        return the terminal event: ``task.failed``, reason and error ``cancelled``."""
        assert record.cancel is not None
        by, reason = record.cancel
        task, told = record.task, None
        stage, executor, attempt = record.stage, record.executor, record.attempt
        if record.abandoned is not None:
            selection, call, attempt = record.abandoned
            executor = selection.executor.url
            told = "answered" if call.done() else await self._tell_executor(executor, task)
            late = asyncio.create_task(
                self._discard_late(task.eval_id, selection, call, attempt, task.trace_id),
                name=f"late-{task.eval_id}",
            )
            self.late.add(late)
            late.add_done_callback(self.late.discard)
        elif stage == "dispatched":
            stage = "selected"  # chosen and recorded, never sent
        elif stage == "pulled":
            stage = "waiting"  # for a slot
        log_.warning("task_cancelled", by=by, stage=stage, executor_cancel=told)
        await self.store.append(
            ev.TaskCancelled(
                eval_id=task.eval_id,
                by=by,
                reason=reason,
                stage=stage,
                executor=executor,
                attempt=attempt,
                executor_cancel=told,
            )
        )
        last = ev.AttemptFailure(
            attempt=max(attempt, 1), executor=executor, reason=CANCELLED, error=CANCELLED
        )
        return ev.TaskFailed(
            eval_id=task.eval_id,
            executor=executor if record.abandoned is not None else None,
            attempt=max(attempt, 1),
            reason=CANCELLED,
            error=CANCELLED,
            attempts=[last],
        )

    async def _tell_executor(self, url: str, task: ev.Task) -> str:
        """``POST /execute/{eval_id}/cancel`` on the executor running ``task``: what it
        said (``accepted``; ``unsupported`` for 404/405; else refused or unreachable)."""
        target = f"{url}/execute/{quote(task.eval_id, safe='')}/cancel"
        try:
            async with self.session.post(
                target, timeout=aiohttp.ClientTimeout(total=CANCEL_TIMEOUT_S)
            ) as resp:
                if 200 <= resp.status < 300:
                    return "accepted"
                if resp.status in (404, 405):
                    return "unsupported"
                return f"refused: HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"unreachable: {type(exc).__name__}"

    async def _discard_late(
        self,
        eval_id: str,
        selection: Selection,
        call: asyncio.Future[Any],
        attempt: int,
        trace_id: str | None = None,
    ) -> None:
        """Wait for a cancelled attempt's answer (its slot held meanwhile), then record it
        as ``task.answer_discarded``."""
        try:
            outcome: Outcome = await call
        finally:
            await selection.release()
            await self.pool.notify()
        if isinstance(outcome, Executed):
            what, error = "completed", None
        else:
            what, error = outcome.reason, cap_text(outcome.error, EJECT_REASON_BYTES)[0]
        log.info("late_answer_discarded", eval_id=eval_id, outcome=what)
        try:
            await self.store.append(
                ev.TaskAnswerDiscarded(
                    eval_id=eval_id,
                    executor=selection.executor.url,
                    attempt=attempt,
                    outcome=what,
                    error=error,
                    duration_ms=round(outcome.duration_ms, 1),
                    trace_id=trace_id,  # the task is no longer held: its record is gone
                )
            )
        except RECORDING_ERRORS as exc:
            log.error("late_answer_not_recorded", eval_id=eval_id, error=str(exc))
