"""Strategies never pick an unhealthy or full executor, and spread load."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from queue_worker.router.balancer import RoundRobin, eligible, make_balancer


@dataclass
class X:
    url: str
    healthy: bool
    in_flight: int
    capacity: int


executors = st.lists(
    st.builds(
        X,
        url=st.text(min_size=1, max_size=5),
        healthy=st.booleans(),
        in_flight=st.integers(0, 4),
        capacity=st.integers(1, 4),
    ),
    min_size=1,
    max_size=8,
)


@given(executors, st.sampled_from(["round_robin", "random"]), st.integers(1, 20))
def test_never_picks_unhealthy_or_full(pool: list[X], name: str, picks: int) -> None:
    balancer = make_balancer(name, random.Random(0))
    for _ in range(picks):
        index = balancer.choose(pool)
        if index is None:
            assert not any(eligible(x) for x in pool)
            return
        assert pool[index].healthy and pool[index].in_flight < pool[index].capacity
        pool[index].in_flight += 1


def test_round_robin_takes_turns_and_skips_ineligible() -> None:
    pool = [X("a", True, 0, 9), X("b", False, 0, 9), X("c", True, 0, 9), X("d", True, 9, 9)]
    rr = RoundRobin()
    assert [rr.choose(pool) for _ in range(5)] == [0, 2, 0, 2, 0]


def test_random_spreads_evenly() -> None:
    pool = [X(str(i), True, 0, 1) for i in range(3)]
    balancer = make_balancer("random", random.Random(42))
    counts = Counter(balancer.choose(pool) for _ in range(3000))
    assert set(counts) == {0, 1, 2}
    assert all(800 < n < 1200 for n in counts.values())
