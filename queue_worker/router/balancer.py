"""Routing strategies: pure choices over executor snapshots.

A strategy only ever picks an executor that is healthy and below capacity;
it returns ``None`` when there is none.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol


class Slot(Protocol):
    @property
    def url(self) -> str: ...
    @property
    def healthy(self) -> bool: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def capacity(self) -> int: ...


def eligible(executor: Slot) -> bool:
    return executor.healthy and executor.in_flight < executor.capacity


class Balancer(Protocol):
    name: str

    def choose(self, executors: Sequence[Slot]) -> int | None:
        """Index of the chosen executor in ``executors``, or ``None``."""


class RoundRobin:
    """Each pick starts after the previous one: eligible executors take turns."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, executors: Sequence[Slot]) -> int | None:
        n = len(executors)
        for step in range(n):
            i = (self._next + step) % n
            if eligible(executors[i]):
                self._next = i + 1
                return i
        return None


class Random:
    """The seed's strategy: uniform among the eligible executors."""

    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, executors: Sequence[Slot]) -> int | None:
        choices = [i for i, x in enumerate(executors) if eligible(x)]
        return self._rng.choice(choices) if choices else None


def make_balancer(name: str, rng: random.Random | None = None) -> Balancer:
    if name == "round_robin":
        return RoundRobin()
    if name == "random":
        return Random(rng)
    raise ValueError(f"unknown routing strategy {name!r}")
