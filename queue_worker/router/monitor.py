"""The health monitor: every executor checked in a loop of its own.

Each member's loop runs under the supervisor (so a hanging check stalls no other,
and a crashing one is restarted), checks it every ``HEALTH_INTERVAL_S``, and as
soon as an ejection runs out. An executor added at runtime is checked at once; a
removed one's loop is stopped. What a check means is the pool's
(:meth:`~queue_worker.router.executors.ExecutorPool.check`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable

import structlog

from queue_worker.router.executor_state import ExecutorState
from queue_worker.streams.store import RECORDING_ERRORS
from queue_worker.supervisor import Supervisor

log = structlog.get_logger(__name__)


class HealthMonitor:
    """The executors' check loops; ``interval_s`` is ``None`` until :meth:`start`."""

    def __init__(self, check: Callable[[ExecutorState], Awaitable[object]]) -> None:
        self.check = check
        self.interval_s: float | None = None
        self._checkers: set[str] = set()  # their loops' names
        self._supervisor: Supervisor | None = None

    def start(
        self, supervisor: Supervisor, interval_s: float, executors: Iterable[ExecutorState]
    ) -> None:
        """Check each of ``executors``, each in a loop of its own under ``supervisor`` (so a
        hanging check stalls no other, and a crashing one is restarted)."""
        self._supervisor, self.interval_s = supervisor, interval_s
        for x in executors:
            if f"health:{x.url}" not in self._checkers:
                self.watch(x)

    async def stop(self) -> None:
        self.interval_s = None
        for name in list(self._checkers):
            await self.unwatch(name.removeprefix("health:"))

    def watch(self, x: ExecutorState, *, first_now: bool = False) -> None:
        assert self.interval_s is not None and self._supervisor is not None
        name = f"health:{x.url}"
        interval_s = self.interval_s
        self._checkers.add(name)
        self._supervisor.start(name, lambda: self._check_forever(x, interval_s, first_now))

    async def unwatch(self, url: str) -> None:
        name = f"health:{url}"
        if name in self._checkers and self._supervisor is not None:
            self._checkers.discard(name)
            await self._supervisor.stop(name)

    async def _check_forever(self, x: ExecutorState, interval_s: float, first_now: bool) -> None:
        """Check ``x`` every ``interval_s``, and as soon as an ejection runs out."""
        delay = 0.0 if first_now else interval_s
        while True:
            await asyncio.sleep(delay)
            try:
                await self.check(x)
            except RECORDING_ERRORS as exc:  # Redis down: the next check tries again
                log.warning("health_not_recorded", executor=x.url, error=str(exc))
            delay = interval_s
            if x.ejected:
                delay = min(interval_s, max(x.ejected_until - time.monotonic(), 0.0) + 0.001)
