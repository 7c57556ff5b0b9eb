"""Pulling: asking the queues for tasks, and recording what each pull brought.

A pull is opened by ``pull.started`` and closed by what the queue handed out:
``task.pulled`` (recorded with the executor choice and the dispatch when one
can be made at once: one append), ``task.rejected`` (not a task), or
``task.duplicate_handout`` (a task already in flight in the fleet); the next
pull's ``pull.started`` goes in the same append. Empty polls keep the pull open.

Queues are polled highest priority first (or by smooth weighted turns); an
unreachable queue, or one answering something that is not a task, is polled
again after a backoff (step, 2 x step, ... up to the maximum), the others
meanwhile. The same bad answer handed out again is counted, not recorded again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import structlog

from queue_worker.config import Settings
from queue_worker.router.inflight import InFlight, InFlightRegistry
from queue_worker.router.queue_client import (
    InvalidTask,
    QueueClient,
    QueueClients,
    QueueUnavailable,
    parse_handout,
)
from queue_worker.router.selection import Selection, Selector
from queue_worker.streams import events as ev
from queue_worker.streams.claims import DuplicateHandout
from queue_worker.streams.store import EventStore

log = structlog.get_logger(__name__)

QUARANTINE_TTL_S = 7 * 24 * 3600
FIRST_IDLE_S = 0.005  # the wait after the first empty poll; it doubles with each one after


def idle_s(empty_polls: int, poll_interval_s: float) -> float:
    """The wait after ``empty_polls`` empty answers in a row: 5 ms, 10 ms, 20 ms ... up to
    ``POLL_INTERVAL_S``, so a task submitted after a busy spell is found at once while an
    idle worker still polls at most once per ``POLL_INTERVAL_S``."""
    doublings = min(empty_polls - 1, 30)
    return min(FIRST_IDLE_S * (1 << doublings), poll_interval_s)


def queue_backoff_s(consecutive_errors: int, step_s: float, max_s: float) -> float:
    """The seed's backoff: step, 2*step, 3*step ... capped at ``max_s``."""
    return round(min(step_s * consecutive_errors, max_s), 3)


@dataclass(slots=True)
class QueueSource:
    """One queue the router pulls from, with its own backoff and idle time."""

    url: str
    client: QueueClient
    weight: float = 1.0
    errors: int = 0  # consecutive failed polls
    retry_at: float = 0.0  # monotonic: polled again from then on (after errors)
    idle_until: float = 0.0  # monotonic: it was empty; polled again from then on
    current: float = 0.0  # smooth weighted round robin state
    pulled: int = 0
    bad_answers: int = 0  # consecutive answers that were not a task
    empty: int = 0  # consecutive empty answers (the next poll waits longer)

    def ready_at(self) -> float:
        return max(self.retry_at, self.idle_until)


class Puller:
    """Polls the queues and records each pull's outcome; hands pulled tasks on."""

    def __init__(
        self,
        settings: Settings,
        store: EventStore,
        clients: QueueClients,
        inflight: InFlightRegistry,
        selector: Selector,
        start: Callable[[InFlight, Selection | None], None],
    ) -> None:
        self.settings = settings
        self.store = store
        self.inflight = inflight
        self.selector = selector
        self.start = start  # runs a pulled task's attempts (its first choice, if made)
        weights = settings.queue_weights or (1.0,) * len(settings.queue_urls())
        self.queues = [
            QueueSource(url, clients.get(url), w)
            for url, w in zip(settings.queue_urls(), weights, strict=True)
        ]
        self.polls = 0
        self.empty_polls = 0
        self.queue_errors = 0
        self.quarantined = 0  # answers rejected before, handed out again: not recorded again
        self.wakeups = 0  # submissions announced on WAKE_CHANNEL
        self.long_polls = 0  # polls that asked the queue to wait (?wait_s=)
        self.open_pull: str | None = None
        self._woken = asyncio.Event()

    def _poll_order(self, ready: list[QueueSource]) -> list[QueueSource]:
        """Highest priority first; with weights, a smooth weighted turn picks the first."""
        if not self.settings.queue_weights or len(ready) == 1:
            return ready
        total = sum(q.weight for q in ready)
        for q in ready:
            q.current += q.weight
        first = max(ready, key=lambda q: q.current)
        first.current -= total
        return [first, *(q for q in ready if q is not first)]

    async def pull_once(self) -> float:
        """Poll the ready queues in order until one hands out a task (or an invalid one);
        returns the seconds to pause before the next try."""
        now = time.monotonic()
        ready = [q for q in self.queues if q.ready_at() <= now]
        if not ready:
            return max(min(q.ready_at() for q in self.queues) - now, 0.001)
        if self.open_pull is None:
            self.open_pull = uuid.uuid4().hex[:16]
            await self.store.append(ev.PullStarted(pull_id=self.open_pull))
        pull_id = self.open_pull
        # A queue found empty last time may hold the poll open (long polling), when it is
        # the only one to ask: another queue would wait behind it.
        wait_s = self.settings.queue_wait_s if len(ready) == 1 and ready[0].empty else 0.0
        for q in self._poll_order(ready):
            self.polls += 1
            self.long_polls += wait_s > 0
            try:
                body = await q.client.next_task(self.settings.queue_lease_s or None, wait_s)
            except QueueUnavailable as exc:
                await self._unreachable(q, exc)
                continue
            if q.errors:
                log.info("queue_recovered", queue=q.url, after_errors=q.errors)
                await self.store.append(ev.QueueRecovered(after_errors=q.errors, queue=q.url))
                q.errors = 0
            if await self._take(body, pull_id, q):
                q.empty = 0
                return 0.0
            self.empty_polls += 1
            q.empty += 1
            q.idle_until = time.monotonic() + idle_s(q.empty, self.settings.poll_interval_s)
        return 0.0

    def wake(self) -> None:
        """A submission was announced: poll every queue at once (and soon again if the
        task is not there yet: it reaches the queue just after its announcement)."""
        self.wakeups += 1
        for q in self.queues:
            q.idle_until, q.empty = 0.0, 0
        self._woken.set()

    async def pause(self, seconds: float) -> None:
        """Wait ``seconds`` before the next poll, or less when a submission is announced."""
        if not self._woken.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), seconds)
        self._woken.clear()

    def _back_off(self, q: QueueSource, times: int) -> float:
        settings = self.settings
        backoff = queue_backoff_s(
            times, settings.queue_backoff_step_s, settings.queue_backoff_max_s
        )
        q.retry_at = time.monotonic() + backoff
        return backoff

    async def _unreachable(self, q: QueueSource, exc: QueueUnavailable) -> None:
        q.errors += 1
        self.queue_errors += 1
        backoff = self._back_off(q, q.errors)
        log.warning(
            "queue_unreachable", queue=q.url, errors=q.errors, backoff_s=backoff, error=str(exc)
        )
        await self.store.append(
            ev.QueueUnreachable(
                consecutive_errors=q.errors, backoff_s=backoff, reason=str(exc), queue=q.url
            )
        )

    async def _take(self, body: bytes, pull_id: str, q: QueueSource) -> bool:
        """Record what the queue answered and start its task; ``False`` when it was empty."""
        try:
            found = parse_handout(body, max_code_bytes=self.settings.max_code_bytes)
        except InvalidTask as bad:
            await self._reject(body, bad, pull_id, q)
            return True
        q.bad_answers = 0
        if found is None:
            return False
        task, trace_ignored = found
        if trace_ignored is not None:
            log.warning("traceparent_ignored", eval_id=task.eval_id, reason=trace_ignored)
        task = self._with_deadline(task)
        mine = self.inflight.get(task.eval_id)
        if mine is not None:  # handed out again while it runs here (its lease ran out)
            holder = f"{self.store.worker_id} {self.store.generation}"
            await self._duplicate(task, pull_id, q, holder)
            if task.lease_s is not None:
                mine.lease_s = task.lease_s  # the new lease is the one the queue holds now
            return True
        record = self.inflight.reserve(task, q.url, q.client, lease_s=task.lease_s)
        # Usually an executor can be chosen right away (fresh health, a free slot): then
        # the pull, the choice and the dispatch are recorded in one append. Not for a task
        # whose deadline passed already: it is failed, not dispatched.
        late = task.deadline is not None and task.deadline <= time.time()
        selection = None if late else await self.selector.choose(task, wait=False)
        try:
            ids = await self._close_pull(self._pulled(task, pull_id, q, selection, trace_ignored))
        except BaseException as exc:
            if selection is not None:
                await selection.release()
            self.inflight.release(task.eval_id)
            if isinstance(exc, DuplicateHandout):  # in flight at a live peer: not run here
                await self._duplicate(task, pull_id, q, exc.holder)
                return True
            raise
        if selection is not None:
            record.stage, record.executor, record.attempt = "dispatched", selection.executor.url, 1
            record.dispatch_id = ids[2]  # task.pulled, executor.selected, task.dispatched
        q.pulled += 1
        self.start(record, selection)
        return True

    def _with_deadline(self, task: ev.Task) -> ev.Task:
        """``task`` with the deadline this worker applies: its own, or ``TASK_DEADLINE_S``
        from now, whichever is earlier (recorded in ``task.pulled``, so a recovery keeps it)."""
        if not self.settings.task_deadline_s:
            return task
        ours = round(time.time() + self.settings.task_deadline_s, 3)
        if task.deadline is not None and task.deadline <= ours:
            return task
        return msgspec.structs.replace(task, deadline=ours)

    def _pulled(
        self,
        task: ev.Task,
        pull_id: str,
        q: QueueSource,
        selection: Selection | None,
        trace_ignored: str | None = None,
    ) -> list[ev.Event]:
        """``task.pulled``, with the choice and the dispatch when one was made."""
        pulled = ev.TaskPulled(
            eval_id=task.eval_id,
            pull_id=pull_id,
            task=task,
            code_bytes=len(task.code.encode()),
            lease_s=task.lease_s,
            queue=q.url,
            trace_id=task.trace_id,
            trace_ignored=trace_ignored,
        )
        if selection is None:
            return [pulled]
        timeout_s = task.timeout or self.settings.default_task_timeout_s
        return [pulled, *selection.recorded(task, 1, self.selector.balancer.name, timeout_s)]

    async def _duplicate(self, task: ev.Task, pull_id: str, q: QueueSource, holder: str) -> None:
        log.warning("task_duplicate_handout", eval_id=task.eval_id, holder=holder, queue=q.url)
        handout = ev.TaskDuplicateHandout(
            eval_id=task.eval_id, pull_id=pull_id, holder=holder, lease_s=task.lease_s, queue=q.url
        )
        await self._close_pull([handout])

    async def _reject(self, body: bytes, bad: InvalidTask, pull_id: str, q: QueueSource) -> None:
        """An answer that is not a task: recorded (and failed at the queue when it names a
        usable eval_id) the first time; the same answer handed out again (at each lease
        expiry, for one whose id cannot be reported) is counted, not recorded again. The
        queue is then polled again after a backoff, like an unreachable one."""
        q.bad_answers += 1
        backoff = self._back_off(q, q.bad_answers)
        digest = hashlib.sha256(body).hexdigest()[:32]
        first = await self.store.redis.set(
            self.store.keys.quarantine(digest), q.url, nx=True, ex=QUARANTINE_TTL_S
        )
        fields = {
            "reason": bad.reason,
            "eval_id": bad.eval_id,
            "queue": q.url,
            "backoff_s": backoff,
        }
        if not first:
            self.quarantined += 1
            log.info("task_quarantined", **fields)
            return
        log.warning("task_rejected", **fields)
        rejected = ev.TaskRejected(
            pull_id=pull_id, eval_id=bad.eval_id, reason=bad.reason, excerpt=bad.excerpt,
            queue=q.url,
        )  # fmt: skip
        await self._close_pull([rejected])

    async def _close_pull(self, outcome: list[ev.Event]) -> list[str]:
        """Append a pull's outcome together with the ``pull.started`` of the next pull: one
        round trip less before the next ``GET /tasks/next``. The entries' ids."""
        self.open_pull = uuid.uuid4().hex[:16]
        try:
            return await self.store.append(*outcome, ev.PullStarted(pull_id=self.open_pull))
        except BaseException:
            self.open_pull = None  # the next poll records its own pull.started
            raise
