"""The attempts of one task, from its first dispatch to its terminal event.

Each attempt: choose an executor (unless the pull already did), record the
choice and the dispatch, wait while this worker is fenced, ``POST /execute``,
feed the answer to the executor's health and latency, then either finish
(``task.completed`` / ``task.failed``, the failures built in
:mod:`queue_worker.router.terminals`) or, for a retryable failure, record
``task.retry_scheduled`` and try another executor after a full-jitter backoff,
up to ``MAX_ATTEMPTS``. An executor that throttles (429/503: the task was not run)
is cooled down and the task routed again with the same attempt number, up to
``MAX_THROTTLES`` times. A retry the fleet's retry budget cannot afford is not
scheduled: the task fails as ``retry_budget_exhausted``. A task with a deadline
(``Task.deadline``) is not dispatched after it: waiting for a slot and retry
backoffs end there, and the task fails as ``deadline_exceeded``. The terminal event
goes to the stream (a result too large for it is kept beside it) and the task's
record is released.

An operator's cancel (:meth:`Attempts.cancel`, from ``task.cancel_requested``)
stops the task wherever it is: waiting for a slot or a backoff, it is never
dispatched; dispatched, the worker stops waiting for the answer and asks the
executor to abort (``POST /execute/{eval_id}/cancel``). ``task.cancelled`` records
it and the task ends as ``task.failed`` with reason and error ``cancelled``. The
abandoned ``POST /execute`` keeps its executor slot until it is answered; that
late answer is recorded as ``task.answer_discarded`` and never reported (both in
:mod:`queue_worker.router.cancels`).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import msgspec
import structlog

from queue_worker.config import Settings
from queue_worker.router.cancels import Cancels
from queue_worker.router.dispatch import Executed, ExecutionFailed, Outcome, execute
from queue_worker.router.executor_state import ExecutorState
from queue_worker.router.executors import ExecutorPool
from queue_worker.router.inflight import InFlight, InFlightRegistry
from queue_worker.router.selection import Selection, Selector
from queue_worker.router.terminals import (
    EJECT_REASON_BYTES,
    Terminal,
    cap_result,
    cap_text,
    failed,
    no_executor,
    over_budget,
    past_deadline,
)
from queue_worker.streams import events as ev
from queue_worker.streams.budget import RetryBudget, Verdict
from queue_worker.streams.claims import WorkerFenced
from queue_worker.streams.connection import REDIS_ERRORS
from queue_worker.streams.redaction import digest
from queue_worker.streams.store import RECORDING_ERRORS, EventStore
from queue_worker.streams.views import StatusView

log = structlog.get_logger(__name__)

RESULT_TTL_S = 7 * 24 * 3600
MAX_THROTTLES = 50  # 429/503 answers one task may get before it fails as executor_throttled


def retry_delay_ms(attempt: int, base_ms: int, max_ms: int, rng: random.Random) -> float:
    """Exponential backoff with full jitter before attempt ``attempt + 1``."""
    return round(rng.uniform(0, min(max_ms, base_ms * 2 ** (attempt - 1))), 1)


def deadline_left_s(task: ev.Task) -> float | None:
    """Seconds until ``task``'s deadline (negative once it passed); ``None``: it has none."""
    return None if task.deadline is None else task.deadline - time.time()


class Attempts:
    """Runs each held task to its terminal event, one asyncio task per evaluation."""

    def __init__(
        self,
        settings: Settings,
        store: EventStore,
        session: aiohttp.ClientSession,
        pool: ExecutorPool,
        selector: Selector,
        inflight: InFlightRegistry,
        *,
        rng: random.Random,
        may_act: Callable[[], Awaitable[None]],
        view: StatusView | None = None,
        budget: RetryBudget | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.session = session
        self.pool = pool
        self.selector = selector
        self.inflight = inflight
        self.rng = rng
        self.may_act = may_act  # returns once this worker may dispatch (not fenced)
        self.view = view
        self.budget = budget
        self.tasks: set[asyncio.Task[None]] = set()
        self.running: dict[str, asyncio.Task[None]] = {}  # eval_id -> its task, once started
        self.cancels = Cancels(store, session, pool)
        # Queues listed without weights are priority classes: the first one's tasks go
        # first among waiting tasks of equal priority.
        urls = () if settings.queue_weights else settings.queue_urls()
        self._queue_rank = {url: i for i, url in enumerate(urls)}

    def start(
        self, record: InFlight, first_attempt: int = 1, first: Selection | None = None
    ) -> None:
        """Run ``record``'s task from ``first_attempt`` on; ``first``: that attempt's
        executor, already chosen and recorded (with the pull)."""
        task = asyncio.create_task(
            self.run(record, first_attempt, first), name=f"route-{record.task.eval_id}"
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self, record: InFlight, first_attempt: int, first: Selection | None) -> None:
        """Attempts until terminal; the terminal event recorded; the record released."""
        eval_id = record.task.eval_id
        log_ = log.bind(eval_id=eval_id)
        me = asyncio.current_task()
        if me is not None:
            self.running[eval_id] = me
        try:
            try:
                terminal = await self._attempts(record, first_attempt, first, log_)
            except asyncio.CancelledError:
                if record.cancel is None or me is None:
                    raise  # a shutdown, not an operator's cancel
                me.uncancel()
                terminal = await self.cancels.cancelled(record, log_)
            record.finishing = True
            await self._record(msgspec.structs.replace(terminal, queue=record.queue_url))
        except WorkerFenced as exc:
            log_.warning("task_left_to_peer", error=str(exc))  # a peer took this worker over
        except RECORDING_ERRORS as exc:
            log_.error("task_outcome_not_recorded", error=str(exc))
        finally:
            if self.running.get(eval_id) is me:
                del self.running[eval_id]
            # Released once the outcome is recorded: by then a task pulled ahead has taken
            # the slot, and the next pull does not compete with its dispatch.
            self.inflight.release(eval_id)
            await self.pool.notify()

    def cancel(self, eval_id: str, by: str, reason: str) -> bool:
        """Cancel the task ``eval_id`` runs here (an operator asked: ``by``, ``reason``);
        whether it was (not when it is not held here, not started yet, or finishing)."""
        record, task = self.inflight.get(eval_id), self.running.get(eval_id)
        if record is None or task is None or record.cancel is not None or record.finishing:
            return False
        record.cancel = (by, reason)
        task.cancel()
        return True

    async def _attempts(
        self, record: InFlight, attempt: int, first: Selection | None, log_: Any
    ) -> Terminal:
        failures: list[ev.AttemptFailure] = []
        avoid: frozenset[str] = frozenset()
        throttles = 0
        task = record.task
        while True:
            left = deadline_left_s(task)
            until = None if left is None else time.monotonic() + left
            selection = first or await self.selector.choose(
                task, avoid, until=until, rank=self._queue_rank.get(record.queue_url, 0)
            )
            if (left := deadline_left_s(task)) is not None and left <= 0:
                if selection is not None:  # chosen just too late: not sent
                    await selection.release()
                log_.warning("deadline_exceeded", attempt=attempt, late_s=round(-left, 3))
                return past_deadline(task, attempt, -left, failures)
            if selection is None:
                log_.warning("no_healthy_executor", attempt=attempt)
                return no_executor(task, attempt, failures)
            outcome = await self._dispatch(record, selection, attempt, recorded=first is not None)
            first = None
            chosen = selection.executor
            if isinstance(outcome, Executed):
                log_.info("task_completed", executor=chosen.url, ms=round(outcome.duration_ms, 1))
                return ev.TaskCompleted(
                    eval_id=record.task.eval_id,
                    executor=chosen.url,
                    attempt=attempt,
                    result=outcome.result,
                    duration_ms=outcome.duration_ms,
                )
            if outcome.throttled and throttles < MAX_THROTTLES:
                throttles += 1  # not run: routed again (the executor cools down meanwhile)
                record.stage = "throttled"
                continue
            error, _ = cap_text(outcome.error, self.settings.max_output_bytes)
            failures.append(
                ev.AttemptFailure(
                    attempt=attempt, executor=chosen.url, reason=outcome.reason, error=error
                )
            )
            if not outcome.retryable or attempt >= self.settings.max_attempts:
                # The error text may hold the executor's error body: its size and hash only.
                log_.warning(
                    "task_failed", executor=chosen.url, reason=outcome.reason, error=digest(error)
                )
                return failed(record.task, attempt, chosen, outcome, failures)
            if (left := deadline_left_s(task)) is not None and left <= 0:
                log_.warning("deadline_exceeded", attempt=attempt + 1, late_s=round(-left, 3))
                return past_deadline(task, attempt + 1, -left, failures)
            verdict = await self._afford_retry(log_)
            if verdict is not None and not verdict.admitted:
                assert self.budget is not None
                return over_budget(task, attempt, chosen, outcome, failures, verdict, self.budget)
            await self._retry(record, chosen, outcome, error, attempt, log_)
            avoid |= {chosen.url}
            attempt += 1

    async def _dispatch(
        self, record: InFlight, selection: Selection, attempt: int, *, recorded: bool
    ) -> Outcome:
        """One attempt on ``selection``: recorded (unless the pull did), sent, observed."""
        settings, task, chosen = self.settings, record.task, selection.executor
        timeout_s = task.timeout or settings.default_task_timeout_s
        handed_over = False  # to a cancel, which holds the slot until the executor answers
        try:
            if not recorded:
                strategy = self.selector.balancer.name
                ids = await self.store.append(
                    *selection.recorded(task, attempt, strategy, timeout_s)
                )
                record.dispatch_id = ids[-1]  # task.dispatched: the attempt's span
            record.stage, record.executor, record.attempt = "dispatched", chosen.url, attempt
            # Fenced (the heartbeat is late): the POST waits, so no task is sent while a
            # peer may be taking this worker over.
            await self.may_act()
            chosen.routed += 1
            call = asyncio.ensure_future(
                execute(
                    self.session,
                    chosen.url,
                    task,
                    timeout_s,
                    settings.dispatch_margin_s,
                    attempt=attempt,
                    max_response_bytes=settings.max_response_bytes,
                    dispatch_id=record.dispatch_id,
                )
            )
            try:
                # Shielded: a cancel stops waiting here while the executor still runs it.
                outcome = await asyncio.shield(call)
            except asyncio.CancelledError:
                if record.cancel is not None:
                    record.abandoned, handed_over = (selection, call, attempt), True
                else:
                    call.cancel()
                raise
            if isinstance(outcome, ExecutionFailed) and outcome.throttled:
                # Cooled down while the slot is still held: no waiting task picks it meanwhile.
                await self.pool.throttle(
                    chosen, task.eval_id, outcome.http_status, outcome.retry_after_s
                )
        finally:
            if not handed_over:
                await selection.release()
        await self.pool.notify()  # a task pulled ahead may take the slot at once
        await asyncio.sleep(0)  # and goes first: its dispatch is on the critical path
        await self._observe(chosen, outcome)
        return outcome

    async def _observe(self, chosen: ExecutorState, outcome: Outcome) -> None:
        """Feed the outcome to the executor's latency average, health and ejection count."""
        pool = self.pool
        if isinstance(outcome, Executed):
            pool.dispatch_succeeded(chosen, outcome.duration_ms)
            return
        if outcome.throttled:  # "not now" is not a failure of the executor
            return
        chosen.failures += 1
        if outcome.reason not in ("executor_unreachable", "executor_http_error"):
            chosen.observe_latency(outcome.duration_ms)  # it answered, or took too long
        if outcome.unreachable:
            await pool.record_health(chosen, False, outcome.error, None, at_once=True)
        detail, _ = cap_text(outcome.error, EJECT_REASON_BYTES)
        await pool.dispatch_failed(chosen, f"{outcome.reason}: {detail}", outcome.retryable)

    async def _afford_retry(self, log_: Any) -> Verdict | None:
        """The retry budget's verdict on one more retry (``None``: no budget, or Redis
        could not say; a retry is then not refused)."""
        if self.budget is None:
            return None
        try:
            verdict = await self.budget.admit()
        except REDIS_ERRORS as exc:
            log_.warning("retry_budget_unknown", error=str(exc))
            return None
        if not verdict.admitted:
            log_.warning(
                "retry_budget_exhausted",
                retries=verdict.retries,
                dispatches=verdict.dispatches,
                allowed=verdict.allowed,
            )
        return verdict

    async def _retry(
        self,
        record: InFlight,
        chosen: ExecutorState,
        outcome: ExecutionFailed,
        error: str,
        attempt: int,
        log_: Any,
    ) -> None:
        """Record the retry and wait its full-jitter backoff (no later than the deadline)."""
        settings = self.settings
        delay_ms = retry_delay_ms(attempt, settings.retry_base_ms, settings.retry_max_ms, self.rng)
        if (left := deadline_left_s(record.task)) is not None:
            delay_ms = round(max(min(delay_ms, left * 1000), 0.0), 1)
        log_.warning(
            "task_retry_scheduled",
            executor=chosen.url,
            reason=outcome.reason,
            attempt=attempt + 1,
            delay_ms=delay_ms,
        )
        await self.store.append(
            ev.TaskRetryScheduled(
                eval_id=record.task.eval_id,
                executor=chosen.url,
                attempt=attempt + 1,
                delay_ms=delay_ms,
                reason=outcome.reason,
                error=error,
            )
        )
        record.stage, record.attempt = "retrying", attempt + 1
        await asyncio.sleep(delay_ms / 1000)

    async def _record(self, terminal: Terminal) -> None:
        """Append the outcome; a result too large for the stream is kept in full beside it.
        The outcome is kept in memory until the queue acknowledged it (a stream reset that
        lost it records it again)."""
        if terminal.result is not None:
            capped, truncated = cap_result(terminal.result, self.settings.max_output_bytes)
            if truncated:
                key = self.store.keys.result(terminal.eval_id)
                encoded = msgspec.json.encode(terminal.result)
                await self.store.redis.set(key, encoded, ex=RESULT_TTL_S)
                terminal = msgspec.structs.replace(terminal, result=capped, truncated=True)
        [entry_id] = await self.store.append(terminal)
        self.inflight.recorded(entry_id, terminal)
        if self.view is not None:
            self.inflight.acknowledged(self.view)
