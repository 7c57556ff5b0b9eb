"""One supervisor for every long-running loop of the process.

A loop (the pull loop, each executor's health checker, the projectors, the
heartbeat, lease renewal, retention, discovery, takeover) that raises an
unexpected error is restarted after a backoff, and the crash is recorded
(``loop.crashed``). A loop that keeps failing (more than ``max_restarts``
crashes within ``window_s``) is not restarted: the supervisor gives up, and
its owner stops pulling, turns liveness red and makes the process exit, so
that the orchestrator starts a fresh one. No loop dies silently while the
rest of the process looks alive.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import structlog

from queue_worker.streams.events import LoopCrashed

log = structlog.get_logger(__name__)

LoopFactory = Callable[[], Coroutine[Any, Any, None]]
RECORD_TIMEOUT_S = 2.0
ERROR_CHARS = 500


@dataclass
class Supervisor:
    """Starts named loops, restarts them when they crash, and gives up on a loop
    that crashes too often (``on_give_up`` is then called once)."""

    record: Callable[[LoopCrashed], Awaitable[object]] | None = None
    on_give_up: Callable[[str, str], None] | None = None
    max_restarts: int = 5
    window_s: float = 60.0
    backoff_base_s: float = 0.1
    backoff_max_s: float = 5.0
    loops: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    crashes: dict[str, int] = field(default_factory=dict)  # by loop, since start
    failed: dict[str, str] = field(default_factory=dict)  # loops given up on -> last error

    def start(self, name: str, factory: LoopFactory) -> asyncio.Task[None]:
        """Run ``factory()`` as the loop ``name`` (a running loop of that name is replaced)."""
        old = self.loops.pop(name, None)
        if old is not None:
            old.cancel()
        task = asyncio.create_task(self._supervise(name, factory), name=name)
        self.loops[name] = task
        task.add_done_callback(lambda t: self._forget(name, t))
        return task

    def _forget(self, name: str, task: asyncio.Task[None]) -> None:
        if self.loops.get(name) is task:
            del self.loops[name]

    async def stop(self, name: str) -> None:
        """Cancel the loop ``name`` and wait for it."""
        task = self.loops.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def stop_all(self) -> None:
        for name in list(self.loops):
            await self.stop(name)

    @property
    def gave_up(self) -> bool:
        return bool(self.failed)

    async def _supervise(self, name: str, factory: LoopFactory) -> None:
        recent: deque[float] = deque()
        restarts = 0
        delay_s = self.backoff_base_s
        while True:
            try:
                await factory()
                return  # a loop that returns has finished its work
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"[:ERROR_CHARS]
                now = time.monotonic()
                recent.append(now)
                while recent and now - recent[0] > self.window_s:
                    recent.popleft()
                self.crashes[name] = self.crashes.get(name, 0) + 1
                give_up = len(recent) > self.max_restarts
                log.error(
                    "loop_crashed",
                    loop=name,
                    error=error,
                    restarts=restarts,
                    gave_up=give_up,
                    exc_info=exc,
                )
                await self._record(LoopCrashed(loop=name, error=error, restarts=restarts,
                                               gave_up=give_up))  # fmt: skip
                if give_up:
                    self.failed[name] = error
                    if self.on_give_up is not None:
                        self.on_give_up(name, error)
                    return
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, self.backoff_max_s)
                restarts += 1

    async def _record(self, event: LoopCrashed) -> None:
        """Append the crash, if Redis takes it soon: the loop's restart must not wait on
        the store (the crash may be Redis's)."""
        if self.record is None:
            return
        try:
            async with asyncio.timeout(RECORD_TIMEOUT_S):
                await self.record(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the crash is in the log either way
            log.warning("loop_crash_not_recorded", loop=event.loop, error=str(exc))
