"""Routing strategies: pure choices over executor snapshots, each explained.

A strategy only ever picks an executor that is healthy and below capacity;
it returns ``None`` when there is none. :meth:`Strategy.decide` also says
*why* the executor won, in a short sentence recorded in ``executor.selected``.

* ``least_loaded`` (the default): power of two choices. Two eligible executors
  are sampled at random; the one with fewer tasks in flight wins, a tie goes to
  the clearly lower latency EWMA (more than ``LATENCY_TIE_RATIO`` apart; an
  executor with no figure counts as fast, so it gets tried), and anything closer
  is a coin toss, so that near-equal executors share the load.
* ``round_robin``: eligible executors take turns.
* ``random``: uniform among the eligible executors (the seed's strategy).
* ``weighted``: smooth weighted round robin (nginx's): over any window, each
  eligible executor gets picks in proportion to its weight (``EXECUTOR_WEIGHTS``,
  else its capacity).
* ``sticky``: rendezvous (highest random weight) hashing of a task key over the
  executors: a key always goes to the same executor while it is eligible; when it
  is unhealthy or full the key's next executor in rendezvous order is used. When
  an executor leaves only its keys move; when one joins only the keys it now tops
  (about 1/n) move to it.
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

KEY_CHARS_IN_WHY = 64
LATENCY_TIE_RATIO = 1.2  # latencies closer than this factor count as equal


class Slot(Protocol):
    """An executor as a strategy sees it (an optional ``latency_ms`` is used when present)."""

    @property
    def url(self) -> str: ...
    @property
    def healthy(self) -> bool: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def capacity(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An executor's state at the moment of a decision. ``healthy`` means routable:
    its health checks pass and it is not ejected."""

    url: str
    healthy: bool
    in_flight: int
    capacity: int
    latency_ms: float | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The chosen index in the executors the strategy was given, and why."""

    index: int
    why: str
    key: str | None = None


def eligible(executor: Slot) -> bool:
    return executor.healthy and executor.in_flight < executor.capacity


def latency_of(executor: Slot) -> float | None:
    """The executor's latency EWMA in ms when the slot carries one."""
    value = getattr(executor, "latency_ms", None)
    return float(value) if isinstance(value, int | float) else None


def ineligible_reason(executor: Slot) -> str:
    if not executor.healthy:
        return "unhealthy"
    return "full" if executor.in_flight >= executor.capacity else "eligible"


def short(key: str) -> str:
    return key if len(key) <= KEY_CHARS_IN_WHY else key[: KEY_CHARS_IN_WHY - 1] + "…"


class Strategy(ABC):
    """A routing strategy; ``decide`` may keep state (turns) but does no I/O."""

    name: str

    @abstractmethod
    def decide(self, executors: Sequence[Slot], key: str | None = None) -> Decision | None:
        """The chosen executor and why, or ``None`` when none is eligible."""

    def choose(self, executors: Sequence[Slot], key: str | None = None) -> int | None:
        """Index of the chosen executor in ``executors``, or ``None``."""
        decision = self.decide(executors, key)
        return None if decision is None else decision.index


Balancer = Strategy


def _eligible_indexes(executors: Sequence[Slot]) -> list[int]:
    return [i for i, x in enumerate(executors) if eligible(x)]


class RoundRobin(Strategy):
    """Each pick starts after the previous one: eligible executors take turns."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def decide(self, executors: Sequence[Slot], key: str | None = None) -> Decision | None:
        n = len(executors)
        for step in range(n):
            i = (self._next + step) % n
            if eligible(executors[i]):
                self._next = i + 1
                skipped = f", skipped {step} unhealthy or full" if step else ""
                return Decision(i, f"next in turn ({i + 1} of {n}{skipped})")
        return None


class Random(Strategy):
    """The seed's strategy: uniform among the eligible executors."""

    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def decide(self, executors: Sequence[Slot], key: str | None = None) -> Decision | None:
        choices = _eligible_indexes(executors)
        if not choices:
            return None
        return Decision(self._rng.choice(choices), f"random among {len(choices)} eligible")


def _ms(value: float | None) -> str:
    return "no figure" if value is None else f"{value:.1f} ms"


class LeastLoaded(Strategy):
    """Power of two choices over tasks in flight; ties go to the lower latency EWMA."""

    name = "least_loaded"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def decide(self, executors: Sequence[Slot], key: str | None = None) -> Decision | None:
        choices = _eligible_indexes(executors)
        if not choices:
            return None
        if len(choices) == 1:
            others = len(executors) - 1
            why = "only eligible executor" + (f" ({others} unhealthy or full)" if others else "")
            return Decision(choices[0], why)
        i, j = self._rng.sample(choices, 2)
        a, b = executors[i], executors[j]
        if a.in_flight != b.in_flight:
            win, lose = (i, j) if a.in_flight < b.in_flight else (j, i)
            return Decision(
                win,
                f"least in flight of 2 sampled ({executors[win].in_flight} vs "
                f"{executors[lose].in_flight})",
            )
        la, lb = latency_of(a), latency_of(b)
        fa, fb = la or 0.0, lb or 0.0  # no figure yet: counts as fast, so it gets tried
        if max(fa, fb) > LATENCY_TIE_RATIO * min(fa, fb):
            win, (lw, ll) = (i, (la, lb)) if fa < fb else (j, (lb, la))
            return Decision(
                win,
                f"lower latency of 2 sampled, both {a.in_flight} in flight "
                f"({_ms(lw)} vs {_ms(ll)})",
            )
        return Decision(
            i, f"tie of 2 sampled ({a.in_flight} in flight, {_ms(la)} vs {_ms(lb)}): random"
        )


class Weighted(Strategy):
    """Smooth weighted round robin: picks in proportion to each executor's weight.

    ``weights`` maps executor URLs to weights; an executor not in it weighs its
    capacity. Only eligible executors take part in a pick.
    """

    name = "weighted"

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        self.weights = dict(weights or {})
        self._current: dict[str, float] = {}

    def weight(self, executor: Slot) -> float:
        return self.weights.get(executor.url, float(executor.capacity))

    def decide(self, executors: Sequence[Slot], key: str | None = None) -> Decision | None:
        choices = _eligible_indexes(executors)
        if not choices:
            return None
        total = 0.0
        best, best_current = choices[0], float("-inf")
        for i in choices:
            url, w = executors[i].url, self.weight(executors[i])
            total += w
            current = self._current[url] = self._current.get(url, 0.0) + w
            if current > best_current:
                best, best_current = i, current
        self._current[executors[best].url] -= total
        if len(self._current) > 2 * len(executors):  # forget executors that left
            present = {x.url for x in executors}
            self._current = {u: c for u, c in self._current.items() if u in present}
        w = self.weight(executors[best])
        return Decision(
            best, f"weighted turn: weight {w:g} of {total:g} over {len(choices)} eligible"
        )


def rendezvous_score(key: str, url: str) -> int:
    """The highest-random-weight score of ``url`` for ``key`` (stable across processes)."""
    digest = hashlib.blake2b(f"{url}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(key: str, urls: Sequence[str]) -> list[int]:
    """Indexes of ``urls`` from the key's first choice to its last."""
    return sorted(range(len(urls)), key=lambda i: (rendezvous_score(key, urls[i]), urls[i]))[::-1]


class Sticky(Strategy):
    """Rendezvous hashing on the task key, falling back in rendezvous order."""

    name = "sticky"

    def decide(self, executors: Sequence[Slot], key: str | None = None) -> Decision | None:
        if key is None:
            raise ValueError("the sticky strategy needs a key")
        order = rendezvous_order(key, [x.url for x in executors])
        for rank, i in enumerate(order):
            if eligible(executors[i]):
                if rank == 0:
                    return Decision(i, f"rendezvous top for key {short(key)}", key)
                top = executors[order[0]]
                return Decision(
                    i,
                    f"fallback: preferred {top.url} {ineligible_reason(top)}; "
                    f"choice {rank + 1} for key {short(key)}",
                    key,
                )
        return None


def make_balancer(
    name: str, rng: random.Random | None = None, weights: Mapping[str, float] | None = None
) -> Strategy:
    if name == "least_loaded":
        return LeastLoaded(rng)
    if name == "round_robin":
        return RoundRobin()
    if name == "random":
        return Random(rng)
    if name == "weighted":
        return Weighted(weights)
    if name == "sticky":
        return Sticky()
    raise ValueError(f"unknown routing strategy {name!r}")
