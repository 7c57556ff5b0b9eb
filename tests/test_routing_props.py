"""Routing strategies as pure functions: properties over many generated pools."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from queue_worker.router.balancer import (
    LATENCY_TIE_RATIO,
    LeastLoaded,
    Snapshot,
    Sticky,
    Weighted,
    eligible,
    make_balancer,
    rendezvous_order,
)
from queue_worker.router.executors import ejection_s

STRATEGY_NAMES = ["least_loaded", "round_robin", "random", "weighted", "sticky"]

snapshots = st.builds(
    Snapshot,
    url=st.integers(1, 10_000).map(lambda i: f"http://executor-{i}:8083"),
    healthy=st.booleans(),
    in_flight=st.integers(0, 4),
    capacity=st.integers(1, 4),
    latency_ms=st.none() | st.floats(0, 1000),
)
pools = st.lists(snapshots, min_size=1, max_size=8, unique_by=lambda x: x.url)
keys = st.text(min_size=1, max_size=20)


def fill(pool: list[Snapshot], index: int) -> None:
    x = pool[index]
    pool[index] = Snapshot(x.url, x.healthy, x.in_flight + 1, x.capacity, x.latency_ms)


@given(pools, st.sampled_from(STRATEGY_NAMES), st.lists(keys, min_size=1, max_size=20))
def test_never_picks_an_unhealthy_or_full_executor(
    pool: list[Snapshot], name: str, task_keys: list[str]
) -> None:
    balancer = make_balancer(name, random.Random(0), {pool[0].url: 3.0})
    for key in task_keys:
        decision = balancer.decide(pool, key)
        if decision is None:
            assert not any(eligible(x) for x in pool)
            return
        assert eligible(pool[decision.index]), decision
        assert decision.why
        fill(pool, decision.index)


@given(
    st.lists(st.integers(1, 5), min_size=2, max_size=6),
    st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_weighted_picks_in_proportion_to_the_weights(
    weights: list[int], healthy: list[bool]
) -> None:
    pool = [Snapshot(f"http://x{i}", healthy[i] or i == 0, 0, 1_000) for i in range(len(weights))]
    balancer = Weighted({x.url: float(w) for x, w in zip(pool, weights, strict=True)})
    picks = 60 * sum(weights)
    counts = Counter(balancer.choose(pool) for _ in range(picks))
    total = sum(w for x, w in zip(pool, weights, strict=True) if x.healthy)
    for i, (x, w) in enumerate(zip(pool, weights, strict=True)):
        expected = picks * w / total if x.healthy else 0
        assert abs(counts[i] - expected) <= 1, (counts, weights)


def test_weighted_defaults_to_capacity_and_explains() -> None:
    pool = [Snapshot("a", True, 0, 3), Snapshot("b", True, 0, 1)]
    balancer = Weighted()
    counts = Counter(balancer.choose(pool) for _ in range(400))
    assert counts == {0: 300, 1: 100}
    decision = balancer.decide(pool)
    assert decision is not None and "weight 3 of 4" in decision.why


@settings(max_examples=50)
@given(st.integers(2, 12), st.integers(0, 11))
def test_sticky_keys_of_a_leaver_move_and_only_they(n: int, leaving: int) -> None:
    urls = [f"http://10.0.0.{i}:8083" for i in range(n)]
    leaving %= n
    rest = [u for i, u in enumerate(urls) if i != leaving]
    for k in range(300):
        key = f"key-{k}"
        before = urls[rendezvous_order(key, urls)[0]]
        after = rest[rendezvous_order(key, rest)[0]]
        if before != urls[leaving]:
            assert after == before
        else:  # it goes to its second choice
            assert after == urls[rendezvous_order(key, urls)[1]]


@settings(max_examples=30)
@given(st.integers(1, 10))
def test_sticky_a_joiner_takes_about_one_in_n_keys_and_nothing_else_moves(n: int) -> None:
    urls = [f"http://10.0.1.{i}:8083" for i in range(n)]
    joined = [*urls, "http://10.0.1.200:8083"]
    moved = 0
    keys_n = 2_000
    for k in range(keys_n):
        key = f"session-{k}"
        before = urls[rendezvous_order(key, urls)[0]]
        after = joined[rendezvous_order(key, joined)[0]]
        if after != before:
            assert after == joined[-1]  # a key only ever moves to the joiner
            moved += 1
    assert abs(moved / keys_n - 1 / (n + 1)) < 0.05


@given(pools, keys)
def test_sticky_prefers_its_top_and_falls_back_in_rendezvous_order(
    pool: list[Snapshot], key: str
) -> None:
    decision = Sticky().decide(pool, key)
    order = rendezvous_order(key, [x.url for x in pool])
    first_eligible = next((i for i in order if eligible(pool[i])), None)
    if first_eligible is None:
        assert decision is None
        return
    assert decision is not None and decision.index == first_eligible and decision.key == key
    if first_eligible == order[0]:
        assert decision.why == f"rendezvous top for key {key}"
    else:
        assert decision.why.startswith(f"fallback: preferred {pool[order[0]].url} ")


def test_sticky_spreads_keys_evenly() -> None:
    pool = [Snapshot(f"http://e{i}", True, 0, 10**6) for i in range(4)]
    counts = Counter(Sticky().choose(pool, f"eval-{i}") for i in range(8_000))
    assert all(1_800 < n < 2_200 for n in counts.values())


@given(pools, st.integers(0, 2**32))
def test_least_loaded_takes_the_less_busy_of_two_samples(pool: list[Snapshot], seed: int) -> None:
    choices = [i for i, x in enumerate(pool) if eligible(x)]
    decision = LeastLoaded(random.Random(seed)).decide(pool)
    if not choices:
        assert decision is None
        return
    assert decision is not None and decision.index in choices
    if len(choices) == 1:
        assert decision.why.startswith("only eligible executor")
        return
    # The same rng draws the same sample: the winner is never busier than its rival.
    i, j = random.Random(seed).sample(choices, 2)
    assert decision.index in (i, j)
    rival = pool[j if decision.index == i else i]
    chosen = pool[decision.index]
    assert chosen.in_flight <= rival.in_flight
    if chosen.in_flight == rival.in_flight:  # then clearly slower never wins
        assert (chosen.latency_ms or 0.0) <= LATENCY_TIE_RATIO * (rival.latency_ms or 0.0)


def test_least_loaded_explains_its_choices() -> None:
    busy = [Snapshot("a", True, 0, 4), Snapshot("b", True, 2, 4)]
    decision = LeastLoaded(random.Random(1)).decide(busy)
    assert decision is not None and (decision.index, decision.why) == (
        0,
        "least in flight of 2 sampled (0 vs 2)",
    )
    slow = [Snapshot("a", True, 1, 4, 250.0), Snapshot("b", True, 1, 4, 50.0)]
    decision = LeastLoaded(random.Random(1)).decide(slow)
    assert decision is not None and decision.index == 1
    assert decision.why == "lower latency of 2 sampled, both 1 in flight (50.0 ms vs 250.0 ms)"
    alone = [Snapshot("a", False, 0, 4), Snapshot("b", True, 0, 4), Snapshot("c", True, 4, 4)]
    decision = LeastLoaded().decide(alone)
    assert decision is not None and decision.index == 1
    assert decision.why == "only eligible executor (2 unhealthy or full)"


def test_least_loaded_avoids_a_slow_executor_under_light_load() -> None:
    pool = [Snapshot("slow", True, 0, 1, 250.0), *(Snapshot(u, True, 0, 1, 50.0) for u in "ab")]
    balancer = LeastLoaded(random.Random(7))
    assert Counter(balancer.choose(pool) for _ in range(300))[0] == 0


def test_least_loaded_shares_between_near_equal_executors() -> None:
    pool = [Snapshot("a", True, 0, 1, 50.0), Snapshot("b", True, 0, 1, 52.0)]
    balancer = LeastLoaded(random.Random(3))
    counts = Counter(balancer.choose(pool) for _ in range(1000))
    assert 400 < counts[0] < 600  # 4 % apart: a coin toss, not always the faster one
    decision = LeastLoaded(random.Random(3)).decide(pool)
    assert decision is not None and decision.why.startswith("tie of 2 sampled (0 in flight")


def test_round_robin_explains_skips() -> None:
    pool = [Snapshot("a", True, 0, 1), Snapshot("b", False, 0, 1), Snapshot("c", True, 0, 1)]
    balancer = make_balancer("round_robin")
    first, second = balancer.decide(pool), balancer.decide(pool)
    assert first is not None and first.why == "next in turn (1 of 3)"
    assert second is not None and second.why == "next in turn (3 of 3, skipped 1 unhealthy or full)"


def test_ejection_time_doubles_and_is_capped() -> None:
    assert [ejection_s(n, 30, 300) for n in range(1, 7)] == [30, 60, 120, 240, 300, 300]
    assert ejection_s(10_000, 0.5, 5) == 5
