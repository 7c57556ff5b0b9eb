"""The router: the write side. It pulls, chooses, dispatches and appends.

It never publishes, reports or touches a view itself: every decision and every
answer from the queue or an executor becomes an event in the stream, appended
before the next step that depends on it. :class:`Router` wires the parts and
owns start and stop:

* ``pulling.py``    — polling the queues, recording each pull's outcome;
* ``selection.py``  — choosing an executor, with or without waiting for a slot;
* ``attempts.py``   — the attempts of one task up to its terminal event;
* ``inflight.py``   — the tasks held, one record per ``eval_id``;
* ``leases.py``     — renewing the queue's leases of those tasks;
* ``recovery.py``   — recovery, takeover of dead peers, restoring after a reset;
* ``liveness.py``   — generation, heartbeat, fence (what takeover relies on);
* ``executors.py``  — the executor pool and its health.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import aiohttp
import structlog

from queue_worker import __version__
from queue_worker.config import Settings
from queue_worker.router import control, wake
from queue_worker.router.attempts import Attempts
from queue_worker.router.balancer import make_balancer
from queue_worker.router.discovery import DiscoveryError, Resolver, StaticDiscovery, discovery_for
from queue_worker.router.executors import ExecutorPool
from queue_worker.router.fleet import SharedRate, SharedSlots
from queue_worker.router.formats import FormatGuard
from queue_worker.router.inflight import InFlightRegistry
from queue_worker.router.leases import keep_leases
from queue_worker.router.liveness import Liveness
from queue_worker.router.pulling import Puller
from queue_worker.router.queue_client import QueueClient, QueueClients
from queue_worker.router.recovery import Recovery
from queue_worker.router.selection import SLOT_POLL_S, Selector
from queue_worker.streams import events as ev
from queue_worker.streams.budget import RetryBudget
from queue_worker.streams.connection import RedisTls
from queue_worker.streams.keys import STREAM_FORMAT
from queue_worker.streams.store import RECORDING_ERRORS, EventStore
from queue_worker.streams.views import StatusView
from queue_worker.supervisor import LoopFactory, Supervisor

log = structlog.get_logger(__name__)

GATE_POLL_S = 0.2  # how often a pull loop that may not pull looks again
STOP_RECORD_TIMEOUT_S = 5.0


def executor_pool(settings: Settings, store: EventStore, session: aiohttp.ClientSession,
                  urls: tuple[str, ...]) -> ExecutorPool:  # fmt: skip
    """The pool of ``urls`` with the settings' capacities, thresholds and ejection."""
    return ExecutorPool(
        store,
        session,
        urls,
        settings.executor_capacity,
        health_timeout_s=settings.health_timeout_s,
        health_stale_s=settings.health_stale_s,
        capacities=dict(settings.executor_capacities),
        healthy_threshold=settings.healthy_threshold,
        unhealthy_threshold=settings.unhealthy_threshold,
        eject_after_failures=settings.eject_after_failures,
        eject_base_s=settings.eject_base_s,
        eject_max_s=settings.eject_max_s,
        learn_capacity=settings.learn_capacity,
        max_ejection_percent=settings.max_ejection_percent,
        panic_threshold=settings.panic_threshold,
        slow_start_s=settings.slow_start_s,
    )


def retry_budget(settings: Settings, store: EventStore) -> RetryBudget | None:
    """The fleet's retry budget, unless ``RETRY_BUDGET_PERCENT`` is 100 (no budget)."""
    if settings.retry_budget_percent >= 100:
        return None
    return RetryBudget(
        store.redis, store.keys, settings.retry_budget_percent, settings.retry_budget_min
    )


class Router:
    """Pulls tasks while there is free healthy capacity and routes each one."""

    def __init__(
        self,
        settings: Settings,
        store: EventStore,
        session: aiohttp.ClientSession,
        *,
        view: StatusView | None = None,
        rng: random.Random | None = None,
        resolver: Resolver | None = None,
        supervisor: Supervisor | None = None,
        liveness: Liveness | None = None,
        folded: Callable[[str, float], Awaitable[None]] | None = None,
        replayed: asyncio.Event | None = None,
        formats: FormatGuard | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.view = view
        self.replayed = replayed
        # Whether a worker of another stream format is alive (``formats.py``).
        self.formats = formats
        self.supervisor = supervisor or Supervisor()
        self.liveness = liveness
        self.discovery = discovery_for(settings, resolver)
        static = isinstance(self.discovery, StaticDiscovery)
        self.pool = executor_pool(
            settings, store, session, settings.executor_endpoints() if static else ()
        )
        rng = rng or random.Random()
        self.balancer = make_balancer(
            settings.routing_strategy, rng, dict(settings.executor_weights)
        )
        slots = SharedSlots(store.redis, store.keys) if settings.shared_capacity else None
        rate = settings.executor_rate_limit
        paced = SharedRate(store.redis, store.keys, rate) if rate > 0 else None
        self.selector = Selector(
            self.pool,
            self.balancer,
            slots=slots,
            rate=paced,
            worker_id=settings.worker_id,
            default_timeout_s=settings.default_task_timeout_s,
            dispatch_margin_s=settings.dispatch_margin_s,
            rng=rng,
            aging_s=settings.priority_aging_s,
        )
        self.inflight = InFlightRegistry()  # the tasks held: pulled and not yet terminal
        store.trace_of = self.inflight.trace_id  # every event of a held task names its trace
        clients = QueueClients(QueueClient.from_settings(session, settings), settings.queue_urls())
        self.attempts = Attempts(
            settings, store, session, self.pool, self.selector, self.inflight,
            rng=rng, may_act=self._wait_may_act, view=view, budget=retry_budget(settings, store),
        )  # fmt: skip
        self.puller = Puller(
            settings, store, clients, self.inflight, self.selector,
            start=lambda record, first: self.attempts.start(record, 1, first),
        )  # fmt: skip
        self.recovery = Recovery(
            settings, store, clients, self.inflight, self.pool,
            start=lambda record, attempt: self.attempts.start(record, attempt),
            liveness=liveness, slots=slots, folded=folded,
        )  # fmt: skip
        self.halted: str | None = None  # why pulling stopped for good (a loop gave up)
        self._helpers: list[str] = []  # names of the supervised loops this router started
        self._stopping = False
        self._started = False
        self._in_pull = False  # between asking the queue and recording its answer

    # --- what /status and /metrics read ------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self.inflight)

    @property
    def waiting(self) -> int:
        return self.selector.waiting

    @property
    def polls(self) -> int:
        return self.puller.polls

    @property
    def empty_polls(self) -> int:
        return self.puller.empty_polls

    @property
    def queue_errors(self) -> int:
        return self.puller.queue_errors

    @property
    def quarantined(self) -> int:
        return self.puller.quarantined

    @property
    def wakeups(self) -> int:
        return self.puller.wakeups

    # --- may it act? -------------------------------------------------------------------

    @property
    def may_act(self) -> bool:
        """Whether this worker may dispatch, renew leases and pull (not fenced)."""
        return self.liveness is None or self.liveness.ok

    async def _wait_may_act(self) -> None:
        if self.liveness is not None and not self.liveness.ok:
            await self.liveness.wait_ok()

    def halt(self, reason: str) -> None:
        """Stop pulling for good (a loop gave up; the process is about to exit)."""
        if self.halted is None:
            self.halted = reason
            log.error("pulling_halted", reason=reason)

    def pull_blocked(self) -> str | None:
        """Why no task may be pulled now (``None``: it may): a task is pulled only while
        its events can be recorded and this worker is not fenced."""
        if self.halted is not None:
            return f"halted: {self.halted}"
        if not self.store.available:
            return f"events cannot be recorded ({self.store.write_error or 'Redis unreachable'})"
        if not self.may_act:
            return "fenced: the liveness key is not being refreshed"
        if (pause := control.pause_of(self.view, self.settings.worker_id)) is not None:
            return f"paused by {pause.by}: {pause.reason}"
        if self.formats is not None and (problem := self.formats.problem()) is not None:
            return problem  # a worker of another stream format started since
        return None

    # --- lifecycle -----------------------------------------------------------

    async def run(self) -> None:
        """Announce, recover, check the executors (once), then pull until cancelled; not
        before the stream is folded and no worker of another stream format is alive.

        It runs as the supervised loop ``pull``: after a crash it is started again and
        goes straight back to pulling."""
        if not self._started:
            if self.replayed is not None:  # recovery and the pull gate read the folded view
                await self.replayed.wait()
            if self.formats is not None:  # beside an earlier version, no outcome may be made
                await self.formats.clear.wait()
            await self._start()
            self._started = True
        await self._pull_loop()

    def _helper(self, name: str, factory: LoopFactory) -> None:
        self._helpers.append(name)
        self.supervisor.start(name, factory)

    async def _start(self) -> None:
        if not isinstance(self.discovery, StaticDiscovery):
            try:
                self.pool.set_members(await self.discovery.resolve())
            except DiscoveryError as exc:  # start empty; the discovery loop tries again
                log.warning("discovery_failed", provider=self.discovery.name, error=str(exc))
        await self.store.append(
            ev.WorkerStarted(
                version=__version__,
                executors=[x.url for x in self.pool.executors],
                strategy=self.balancer.name,
                capacity=self.settings.executor_capacity,
                discovery=self.discovery.name,
                queues=[q.url for q in self.puller.queues],
                stream_format=STREAM_FORMAT,
            )
        )
        self.pool.monitor.start(
            self.supervisor, self.settings.health_interval_s, self.pool.executors
        )
        default_lease_s = self.settings.queue_lease_s or 60.0
        self._helper(
            "leases",
            lambda: keep_leases(
                self.inflight,
                self.store,
                may_act=lambda: self.may_act,
                default_lease_s=default_lease_s,
            ),
        )
        interval_s = self.discovery.interval_s
        if interval_s is not None:
            self._helper("discovery", lambda: self._discover(interval_s))
        channel, redis_url = self.settings.wake_channel, self.settings.redis_url
        if channel:
            s = self.settings
            tls = RedisTls(s.redis_ca_file, s.redis_cert_file, s.redis_key_file)
            self._helper("wake", lambda: wake.listen(redis_url, channel, self.puller.wake, tls))
        view = self.view
        if view is not None:
            self._helper("takeover", lambda: self.recovery.take_over_dead_peers(view))
        control.apply_drains(view, self.pool)
        control.apply_cooldowns(view, self.pool)
        self._helper("control", self._obey)
        await self.pool.check_all()
        if view is not None:
            await self.recovery.recover(view)

    async def restore(
        self, reason: str, stream_last_id: str | None, published: Callable[[str], bool]
    ) -> None:
        """Redis lost data: re-record what this worker holds (see ``recovery.py``)."""
        await self.recovery.restore(reason, stream_last_id, published, self.view)

    async def stop(self, running: asyncio.Task[None] | None, grace_s: float) -> None:
        """Graceful stop: stop pulling (never in the middle of a pull), let in-flight
        tasks finish for up to ``grace_s``, then append ``worker.stopped``.

        A poll under way (a long poll may be held by the queue) is waited for meanwhile,
        not before: the grace of the tasks in flight runs from the stop. A task still
        running then, or handed out by that last poll, is cancelled without a terminal
        event: the next start recovers it.
        """
        self._stopping = self.recovery.paused = True
        await self.pool.notify()
        pull = asyncio.create_task(self._end_pull(running))
        tasks = self.attempts.tasks
        if tasks and grace_s > 0:
            await asyncio.wait(tasks, timeout=grace_s)
        left = await self._cancel_tasks()
        cut_pull = await pull
        left += await self._cancel_tasks()  # the last poll's task, if it brought one
        for name in self._helpers:
            await self.supervisor.stop(name)
        await self.pool.monitor.stop()
        if not self.store.fenced:  # taken over: the stream takes nothing more from us
            await self._record_stop(left, cut_pull)

    async def _end_pull(self, running: asyncio.Task[None] | None) -> bool:
        """Stop the pull loop, letting a poll under way record its answer (unless it cannot:
        Redis down); whether a poll was cut off before its answer was recorded."""
        if running is None:
            return False
        if self._in_pull:
            settings = self.settings
            longest_s = settings.queue_timeout_s + settings.queue_wait_s + 1
            await asyncio.wait({running}, timeout=longest_s)
        cut_pull = self._in_pull
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        return cut_pull

    async def _cancel_tasks(self) -> int:
        left = list(self.attempts.tasks)
        late = list(self.attempts.cancels.late)  # cancelled tasks' answers: no longer awaited
        for task in left + late:
            task.cancel()
        await asyncio.gather(*left, *late, return_exceptions=True)
        return len(left)

    async def _record_stop(self, left: int, cut_pull: bool) -> None:
        # A pull that got no task is closed, so the next start need not suspect it; one
        # cut off while its answer was coming stays open (recovery flags it).
        closing: list[ev.Event] = []
        open_pull = self.puller.open_pull
        if open_pull is not None and not cut_pull:
            closing.append(ev.PullClosed(pull_id=open_pull, reason="shutdown"))
        reason = "shutdown" if self.halted is None else f"halted: {self.halted}"
        try:
            async with asyncio.timeout(STOP_RECORD_TIMEOUT_S):  # Redis may be down
                await self.store.append(*closing, ev.WorkerStopped(reason=reason, in_flight=left))
            self.puller.open_pull = None
        except (*RECORDING_ERRORS, TimeoutError) as exc:
            log.error("worker_stopped_not_recorded", error=str(exc))

    async def _obey(self) -> None:
        """Follow the drains and the executors' cool-downs folded from the stream (pauses
        are read by the pull gate), and cancel the tasks held here that an operator
        cancelled."""
        while True:
            if control.apply_drains(self.view, self.pool):
                await self.pool.notify()
            control.apply_cooldowns(self.view, self.pool)
            for eval_id, by, reason in control.cancels_for(self.view, self.inflight):
                if self.attempts.cancel(eval_id, by, reason):
                    log.warning("cancel_requested", eval_id=eval_id, by=by)
            await asyncio.sleep(control.CONTROL_POLL_S)

    async def _discover(self, interval_s: float) -> None:
        """Resolve the executors again every ``interval_s``; apply what changed."""
        provider = self.discovery
        while True:
            await asyncio.sleep(interval_s)
            try:
                urls = await provider.resolve()
                await self.pool.sync(urls, provider.name)
            except DiscoveryError as exc:
                log.warning("discovery_failed", provider=provider.name, error=str(exc))
            except RECORDING_ERRORS as exc:
                log.error("membership_not_recorded", error=str(exc))

    # --- pulling -------------------------------------------------------------

    def _has_capacity(self) -> bool:
        """Whether to pull: free healthy capacity, or ``PULL_AHEAD`` tasks beyond it so a
        slot that frees finds one waiting (never while no executor is healthy)."""
        capacity = self.pool.healthy_capacity()
        return capacity > 0 and len(self.inflight) < capacity + self.settings.pull_ahead

    async def _pull_loop(self) -> None:
        while not self._stopping:
            async with self.pool.changed:
                await self.pool.changed.wait_for(lambda: self._stopping or self._has_capacity())
            if self._stopping:
                return
            if self.pull_blocked() is not None:
                await asyncio.sleep(GATE_POLL_S)
                continue
            try:
                room = await self.selector.fleet_has_room(
                    len(self.inflight), self.settings.pull_ahead
                )
            except RECORDING_ERRORS as exc:
                log.error("fleet_slots_unreadable", error=str(exc))
                room = False
            if not room:
                await asyncio.sleep(SLOT_POLL_S)
                continue
            self._in_pull = True
            try:
                pause_s = await self.puller.pull_once()
            except RECORDING_ERRORS as exc:
                # No state change may happen without its event: wait for the store.
                log.error("event_store_unavailable", error=str(exc))
                pause_s = 1.0
            finally:
                self._in_pull = False
            if pause_s:
                await self.puller.pause(pause_s)
