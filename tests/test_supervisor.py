"""The supervisor on its own: restarts with backoff, records crashes, gives up on a loop
that keeps failing (plain asyncio; the process-level behaviour is in test_hardening)."""

from __future__ import annotations

import asyncio

from queue_worker.streams.events import LoopCrashed
from queue_worker.supervisor import Supervisor


def supervisor(recorded: list[LoopCrashed], gave_up: list[tuple[str, str]]) -> Supervisor:
    async def record(event: LoopCrashed) -> None:
        recorded.append(event)

    return Supervisor(
        record=record,
        on_give_up=lambda name, error: gave_up.append((name, error)),
        max_restarts=3,
        window_s=60.0,
        backoff_base_s=0.001,
        backoff_max_s=0.01,
    )


async def test_a_crashed_loop_is_restarted_and_each_crash_recorded() -> None:
    recorded: list[LoopCrashed] = []
    gave_up: list[tuple[str, str]] = []
    sup = supervisor(recorded, gave_up)
    runs = 0
    steady = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise RuntimeError(f"boom {runs}")
        steady.set()
        await asyncio.Event().wait()

    sup.start("flaky", flaky)
    await asyncio.wait_for(steady.wait(), 5)
    assert runs == 3
    assert [(e.loop, e.error, e.restarts, e.gave_up) for e in recorded] == [
        ("flaky", "RuntimeError: boom 1", 0, False),
        ("flaky", "RuntimeError: boom 2", 1, False),
    ]
    assert sup.crashes == {"flaky": 2} and not sup.failed and not gave_up
    assert not sup.loops["flaky"].done()
    await sup.stop_all()
    assert sup.loops == {}


async def test_a_loop_that_keeps_failing_is_given_up_once() -> None:
    recorded: list[LoopCrashed] = []
    gave_up: list[tuple[str, str]] = []
    sup = supervisor(recorded, gave_up)

    async def broken() -> None:
        raise ValueError("always")

    task = sup.start("broken", broken)
    await asyncio.wait_for(task, 5)
    assert len(recorded) == 4  # max_restarts (3) restarts, then the crash that gives up
    assert [e.gave_up for e in recorded] == [False, False, False, True]
    assert gave_up == [("broken", "ValueError: always")]
    assert sup.failed == {"broken": "ValueError: always"} and sup.gave_up


async def test_a_crash_that_cannot_be_recorded_still_restarts_the_loop() -> None:
    gave_up: list[tuple[str, str]] = []

    async def record(event: LoopCrashed) -> None:
        raise ConnectionError("Redis is down too")

    sup = Supervisor(record=record, on_give_up=lambda n, e: gave_up.append((n, e)),
                     backoff_base_s=0.001)  # fmt: skip
    started = asyncio.Event()
    runs = 0

    async def once_broken() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise KeyError("x")
        started.set()
        await asyncio.Event().wait()

    sup.start("once", once_broken)
    await asyncio.wait_for(started.wait(), 5)
    assert runs == 2 and sup.crashes == {"once": 1} and not gave_up
    await sup.stop_all()


async def test_a_loop_that_returns_is_not_restarted() -> None:
    sup = Supervisor()
    runs = 0

    async def one_shot() -> None:
        nonlocal runs
        runs += 1

    await asyncio.wait_for(sup.start("once", one_shot), 5)
    await asyncio.sleep(0.01)
    assert runs == 1 and sup.loops == {} and not sup.crashes
