"""The router: the write side. It pulls, chooses, dispatches and appends.

It never publishes, reports or touches a view itself: every decision and
every answer from the queue or an executor becomes an event in the stream,
appended before the next step that depends on it.
"""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import redis.asyncio as aioredis
import structlog

from queue_worker import __version__
from queue_worker.config import Settings
from queue_worker.router.balancer import make_balancer
from queue_worker.router.dispatch import Executed, ExecutionFailed, execute
from queue_worker.router.executors import ExecutorPool, ExecutorState
from queue_worker.router.queue_client import (
    InvalidTask,
    QueueClient,
    QueueUnavailable,
    parse_task,
)
from queue_worker.streams import events as ev
from queue_worker.streams.store import EventStore

log = structlog.get_logger(__name__)

NO_HEALTHY_EXECUTOR = "no_healthy_executor"


def queue_backoff_s(consecutive_errors: int, step_s: float, max_s: float) -> float:
    """The seed's backoff: step, 2*step, 3*step ... capped at ``max_s``."""
    return round(min(step_s * consecutive_errors, max_s), 3)


class Router:
    """Pulls tasks while there is free healthy capacity and routes each one."""

    def __init__(
        self,
        settings: Settings,
        store: EventStore,
        session: aiohttp.ClientSession,
        *,
        queue: QueueClient | None = None,
        pool: ExecutorPool | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.session = session
        self.queue = queue or QueueClient(
            session,
            settings.queue_service_url,
            api_key=settings.queue_api_key,
            timeout_s=settings.queue_timeout_s,
        )
        self.pool = pool or ExecutorPool(
            store,
            session,
            settings.executor_endpoints(),
            settings.executor_capacity,
            health_timeout_s=settings.health_timeout_s,
            health_stale_s=settings.health_stale_s,
        )
        self.balancer = make_balancer(settings.routing_strategy)
        self.reserved = 0  # tasks pulled and not yet terminal
        self.polls = 0
        self.empty_polls = 0
        self.queue_errors = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._open_pull: str | None = None

    @property
    def in_flight(self) -> int:
        return self.reserved

    # --- lifecycle -----------------------------------------------------------

    async def run(self) -> None:
        """Announce, check the executors once, then pull until cancelled."""
        await self.store.append(
            ev.WorkerStarted(
                version=__version__,
                executors=list(self.pool.urls),
                strategy=self.balancer.name,
                capacity=self.settings.executor_capacity,
            )
        )
        await self.pool.check_all()
        monitor = asyncio.create_task(
            self.pool.monitor(self.settings.health_interval_s), name="health-monitor"
        )
        try:
            await self._pull_loop()
        finally:
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)

    async def drain(self, grace_s: float) -> None:
        """Wait up to ``grace_s`` for in-flight tasks, then cancel what is left."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=grace_s)
        left = list(self._tasks)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        try:
            await self.store.append(ev.WorkerStopped(reason="shutdown", in_flight=len(left)))
        except (aioredis.RedisError, OSError) as exc:
            log.error("worker_stopped_not_recorded", error=str(exc))

    # --- pulling -------------------------------------------------------------

    async def _wait_for_capacity(self) -> None:
        async with self.pool.changed:
            await self.pool.changed.wait_for(lambda: self.reserved < self.pool.healthy_capacity())

    async def _pull_loop(self) -> None:
        errors = 0
        while True:
            await self._wait_for_capacity()
            try:
                if self._open_pull is None:
                    self._open_pull = uuid.uuid4().hex[:16]
                    await self.store.append(ev.PullStarted(pull_id=self._open_pull))
                pull_id = self._open_pull
                self.polls += 1
                try:
                    body = await self.queue.next_task()
                except QueueUnavailable as exc:
                    errors += 1
                    self.queue_errors += 1
                    backoff = queue_backoff_s(
                        errors,
                        self.settings.queue_backoff_step_s,
                        self.settings.queue_backoff_max_s,
                    )
                    log.warning(
                        "queue_unreachable", errors=errors, backoff_s=backoff, error=str(exc)
                    )
                    await self.store.append(
                        ev.QueueUnreachable(
                            consecutive_errors=errors, backoff_s=backoff, reason=str(exc)
                        )
                    )
                    await asyncio.sleep(backoff)
                    continue
                if errors:
                    log.info("queue_recovered", after_errors=errors)
                    await self.store.append(ev.QueueRecovered(after_errors=errors))
                    errors = 0
                await self._take(body, pull_id)
            except (aioredis.RedisError, OSError) as exc:
                # No state change may happen without its event: stop and retry.
                log.error("event_store_unavailable", error=str(exc))
                await asyncio.sleep(1.0)

    async def _take(self, body: bytes, pull_id: str) -> None:
        try:
            task = parse_task(body)
        except InvalidTask as bad:
            self._open_pull = None
            log.warning("task_rejected", reason=bad.reason, eval_id=bad.eval_id)
            await self.store.append(
                ev.TaskRejected(
                    pull_id=pull_id, eval_id=bad.eval_id, reason=bad.reason, excerpt=bad.excerpt
                )
            )
            return
        if task is None:
            self.empty_polls += 1
            await asyncio.sleep(self.settings.poll_interval_s)
            return
        self._open_pull = None
        self.reserved += 1
        try:
            await self.store.append(
                ev.TaskPulled(
                    eval_id=task.eval_id,
                    pull_id=pull_id,
                    task=task,
                    code_bytes=len(task.code.encode()),
                )
            )
        except BaseException:
            self.reserved -= 1
            raise
        worker = asyncio.create_task(self._route(task), name=f"route-{task.eval_id}")
        self._tasks.add(worker)
        worker.add_done_callback(self._tasks.discard)

    # --- routing -------------------------------------------------------------

    async def _select(self) -> ExecutorState | None:
        """Reserve a slot on a healthy executor, or ``None`` when none is healthy."""
        pool = self.pool
        while True:
            if not pool.any_healthy():
                return None
            index = self.balancer.choose(pool.executors)
            if index is None:
                async with pool.changed:
                    await pool.changed.wait_for(
                        lambda: (
                            not pool.any_healthy()
                            or any(x.healthy and x.in_flight < x.capacity for x in pool.executors)
                        )
                    )
                continue
            chosen = pool.executors[index]
            chosen.in_flight += 1
            if pool.is_stale(chosen) and not await pool.check(chosen):
                chosen.in_flight -= 1
                await pool.notify()
                continue
            return chosen

    async def _route(self, task: ev.Task) -> None:
        attempt = 1
        timeout_s = task.timeout or self.settings.default_task_timeout_s
        log_ = log.bind(eval_id=task.eval_id)
        try:
            candidates = [x.candidate() for x in self.pool.executors]
            chosen = await self._select()
            if chosen is None:
                log_.warning("no_healthy_executor")
                await self.store.append(
                    ev.TaskFailed(
                        eval_id=task.eval_id,
                        attempt=attempt,
                        reason=NO_HEALTHY_EXECUTOR,
                        error="no healthy executor available",
                    )
                )
                return
            try:
                await self.store.append(
                    ev.ExecutorSelected(
                        eval_id=task.eval_id,
                        executor=chosen.url,
                        strategy=self.balancer.name,
                        attempt=attempt,
                        candidates=candidates,
                    ),
                    ev.TaskDispatched(
                        eval_id=task.eval_id,
                        executor=chosen.url,
                        attempt=attempt,
                        timeout_s=timeout_s,
                    ),
                )
                chosen.routed += 1
                outcome = await execute(
                    self.session, chosen.url, task, timeout_s, self.settings.dispatch_margin_s
                )
            finally:
                chosen.in_flight -= 1
            if isinstance(outcome, Executed):
                log_.info("task_completed", executor=chosen.url, ms=round(outcome.duration_ms, 1))
                terminal: ev.Event = ev.TaskCompleted(
                    eval_id=task.eval_id,
                    executor=chosen.url,
                    attempt=attempt,
                    result=outcome.result,
                    duration_ms=outcome.duration_ms,
                )
            else:
                assert isinstance(outcome, ExecutionFailed)
                chosen.failures += 1
                log_.warning(
                    "task_failed", executor=chosen.url, reason=outcome.reason, error=outcome.error
                )
                if outcome.unreachable:
                    await self.pool.record_health(chosen, False, outcome.error, None)
                terminal = ev.TaskFailed(
                    eval_id=task.eval_id,
                    executor=chosen.url,
                    attempt=attempt,
                    reason=outcome.reason,
                    error=outcome.error,
                    result=outcome.result,
                    duration_ms=outcome.duration_ms,
                )
            await self.store.append(terminal)
        except (aioredis.RedisError, OSError) as exc:
            log_.error("task_outcome_not_recorded", error=str(exc))
        finally:
            self.reserved -= 1
            await self.pool.notify()
