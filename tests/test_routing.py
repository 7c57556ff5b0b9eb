"""Routing intelligence, live: strategies, health thresholds, ejection, discovery, queues.

Real servers throughout: the devstack queue and executors, a private Redis, and for
discovery a small DNS server on loopback UDP that answers A/AAAA questions.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any, cast

import aiohttp
import pytest
import redis.asyncio as aioredis

from queue_worker.config import Settings
from queue_worker.devstack.executor import EXECUTOR_STATE, create_executor_app
from queue_worker.devstack.queue import QUEUE_STATE, create_queue_app
from queue_worker.devstack.serve import Server, free_port
from queue_worker.errors import ConfigError
from queue_worker.router.discovery import (
    DiscoveryError,
    DnsDiscovery,
    dns_addresses,
    dns_query,
    nameserver_resolver,
    system_resolver,
    url_of,
)
from queue_worker.router.router import Router
from queue_worker.streams import events as ev
from queue_worker.streams.keys import Keys
from queue_worker.streams.store import EventStore
from tests.harness import Stack, eventually

# --- a small real DNS server ---------------------------------------------------------


class DnsServer(asyncio.DatagramProtocol):
    """Answers A and AAAA questions from ``records`` (name -> addresses); NXDOMAIN else."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.questions = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.questions += 1
        query_id = struct.unpack("!H", data[:2])[0]
        offset, labels = 12, []
        while data[offset]:
            length = data[offset]
            labels.append(data[offset + 1 : offset + 1 + length].decode())
            offset += 1 + length
        qtype = struct.unpack("!H", data[offset + 1 : offset + 3])[0]
        question = data[12 : offset + 5]
        addresses = self.records.get(".".join(labels).lower())
        family = socket.AF_INET6 if qtype == 28 else socket.AF_INET
        raws = [
            socket.inet_pton(family, a)
            for a in addresses or []
            if (":" in a) == (family == socket.AF_INET6)
        ]
        flags = 0x8180 | (3 if addresses is None else 0)
        answer = struct.pack("!HHHHHH", query_id, flags, 1, len(raws), 0, 0) + question
        for raw in raws:
            answer += struct.pack("!HHHIH", 0xC00C, qtype, 1, 5, len(raw)) + raw
        assert self.transport is not None
        self.transport.sendto(answer, addr)


@pytest.fixture
async def dns() -> AsyncIterator[tuple[DnsServer, int]]:
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(DnsServer, local_addr=("127.0.0.1", 0))
    yield server, transport.get_extra_info("sockname")[1]
    transport.close()


# --- helpers ---------------------------------------------------------------------


def of_type(entries: list[ev.Entry], kind: type[Any]) -> list[Any]:
    return [e.event for e in entries if isinstance(e.event, kind)]


def executed(stack: Stack, i: int, prefix: str = "") -> int:
    ids = stack.executor_state(i).eval_ids
    return sum(n for eval_id, n in ids.items() if eval_id.startswith(prefix))


async def offer(stack: Stack, n: int, every_s: float, prefix: str) -> list[str]:
    """Enqueue ``n`` tasks at a steady rate."""
    ids = []
    for i in range(n):
        ids.append(f"{prefix}-{i:04d}")
        await stack.enqueue(ids[-1])
        await asyncio.sleep(every_s)
    return ids


# --- settings ----------------------------------------------------------------------


def test_routing_settings_are_parsed() -> None:
    s = Settings.from_env({})
    assert s.routing_strategy == "least_loaded"
    assert (s.healthy_threshold, s.unhealthy_threshold, s.health_timeout_s) == (1, 1, 2.0)
    assert s.queue_urls() == ("http://queue:8081",) and s.discovery == "compose"
    s = Settings.from_env(
        {
            "EXECUTOR_URLS": "http://a:1,http://b:2",
            "EXECUTOR_WEIGHTS": "3,1",
            "EXECUTOR_CAPACITIES": "http://b:2=4",
            "EXECUTOR_CAPACITY": "2",
            "QUEUE_SERVICE_URLS": "http://high:1, http://low:2",
            "UNHEALTHY_THRESHOLD": "3",
            "LEARN_CAPACITY": "true",
            "ROUTING_STRATEGY": "sticky",
        }
    )
    assert s.executor_weights == (("http://a:1", 3.0), ("http://b:2", 1.0))
    assert (s.capacity_of("http://a:1"), s.capacity_of("http://b:2")) == (2, 4)
    assert s.queue_urls() == ("http://high:1", "http://low:2") and s.queue_weights == ()
    assert s.queue_service_url == "http://high:1"  # the default for reports of old events
    assert (s.unhealthy_threshold, s.learn_capacity, s.routing_strategy) == (3, True, "sticky")
    s = Settings.from_env({"QUEUE_SERVICE_URLS": "http://high:1=3,http://low:2"})
    assert s.queue_weights == (3.0, 1.0)
    s = Settings.from_env(
        {"EXECUTOR_DNS_NAME": "executors.local", "EXECUTOR_DNS_SERVER": "127.0.0.1:5353"}
    )
    assert (s.discovery, s.executor_dns_server) == ("dns", ("127.0.0.1", 5353))


@pytest.mark.parametrize(
    ("variable", "env"),
    [
        ("EXECUTOR_WEIGHTS", {"EXECUTOR_WEIGHTS": "1,2"}),  # 3 executors by default
        ("EXECUTOR_WEIGHTS", {"EXECUTOR_WEIGHTS": "http://a:1=0"}),
        ("EXECUTOR_CAPACITIES", {"EXECUTOR_CAPACITIES": "http://a:1=1.5"}),
        ("QUEUE_SERVICE_URLS", {"QUEUE_SERVICE_URLS": "http://a:1,http://a:1"}),
        ("QUEUE_SERVICE_URLS", {"QUEUE_SERVICE_URLS": "queue:1"}),
        ("EXECUTOR_DNS_NAME", {"EXECUTOR_DNS_NAME": "not a name"}),
        ("EXECUTOR_DNS_NAME", {"EXECUTOR_DNS_NAME": "x", "EXECUTOR_URLS": "http://a:1"}),
        ("EXECUTOR_DNS_SERVER", {"EXECUTOR_DNS_SERVER": "nameserver"}),
        ("LEARN_CAPACITY", {"LEARN_CAPACITY": "perhaps"}),
        ("HEALTHY_THRESHOLD", {"HEALTHY_THRESHOLD": "0"}),
        ("EJECT_MAX_S", {"EJECT_BASE_S": "60", "EJECT_MAX_S": "30"}),
        ("ROUTING_STRATEGY", {"ROUTING_STRATEGY": "fastest"}),
    ],
)
def test_bad_routing_settings_name_the_variable(variable: str, env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert info.value.variable == variable


# --- DNS ---------------------------------------------------------------------------


def test_dns_messages_round_trip() -> None:
    query = dns_query(0x1234, "executors.test", 1)
    assert query[:2] == b"\x12\x34" and b"\x09executors\x04test\x00" in query
    answer = (
        struct.pack("!HHHHHH", 0x1234, 0x8180, 1, 2, 0, 0)
        + query[12:]
        + struct.pack("!HHHIH", 0xC00C, 1, 1, 5, 4)
        + socket.inet_aton("10.0.0.7")
        + struct.pack("!HHHIH", 0xC00C, 28, 1, 5, 16)
        + socket.inet_pton(socket.AF_INET6, "fd00::7")
    )
    assert dns_addresses(answer, 0x1234) == ["10.0.0.7", "fd00::7"]
    assert dns_addresses(struct.pack("!HHHHHH", 1, 0x8183, 0, 0, 0, 0), 1) == []  # NXDOMAIN
    with pytest.raises(ValueError, match="not the answer"):
        dns_addresses(answer, 0x4321)
    with pytest.raises(ValueError, match="code 2"):
        dns_addresses(struct.pack("!HHHHHH", 1, 0x8182, 0, 0, 0, 0), 1)
    assert url_of("fd00::7", 8083) == "http://[fd00::7]:8083"


async def test_dns_discovery_with_the_system_resolver_and_a_dns_server(
    dns: tuple[DnsServer, int],
) -> None:
    local = await DnsDiscovery("localhost", 8083, resolver=system_resolver).resolve()
    assert "http://127.0.0.1:8083" in local
    server, port = dns
    server.records["executors.test"] = ["127.0.0.3", "::1", "127.0.0.2"]
    found = await DnsDiscovery("executors.test", 9000, resolver=nameserver_resolver(
        "127.0.0.1", port)).resolve()  # fmt: skip
    assert found == ("http://127.0.0.2:9000", "http://127.0.0.3:9000", "http://[::1]:9000")
    with pytest.raises(DiscoveryError, match="has no address"):
        await DnsDiscovery("unknown.test", 1, resolver=nameserver_resolver(
            "127.0.0.1", port)).resolve()  # fmt: skip
    with pytest.raises(DiscoveryError, match="no answer"):
        nobody = nameserver_resolver("127.0.0.1", free_port(), timeout_s=0.2)
        await DnsDiscovery("executors.test", 1, resolver=nobody).resolve()
    server.records["slow.test"] = []  # an answer with no address: kept as an error
    with pytest.raises(DiscoveryError, match="has no address"):
        await DnsDiscovery("slow.test", 1, resolver=nameserver_resolver(
            "127.0.0.1", port)).resolve()  # fmt: skip


async def test_dns_discovery_adds_and_removes_executors_live(
    stack_factory: Any, dns: tuple[DnsServer, int]
) -> None:
    server, dns_port = dns
    port = free_port("127.0.0.2")
    a = Server(create_executor_app("exec-a", latency_s=0.01), host="127.0.0.2", port=port)
    b = Server(create_executor_app("exec-b", latency_s=0.01), host="127.0.0.3", port=port)
    await a.start()
    await b.start()
    try:
        server.records["executors.test"] = ["127.0.0.2"]
        stack: Stack = await stack_factory(
            executors=1,
            executor_urls=(),
            executor_dns_name="executors.test",
            executor_dns_server=("127.0.0.1", dns_port),
            executor_port=port,
            discovery_interval_s=0.1,
        )
        started = await stack.wait_event("worker.started")
        assert isinstance(started.event, ev.WorkerStarted)
        assert (started.event.executors, started.event.discovery) == ([a.url], "dns")
        await stack.enqueue_many(4, prefix="one")
        await stack.wait_terminal(4)
        assert a.app[EXECUTOR_STATE].executed == 4

        server.records["executors.test"] = ["127.0.0.2", "127.0.0.3"]
        added = await stack.wait_event("executor.added", executor=b.url)
        assert isinstance(added.event, ev.ExecutorAdded) and added.event.provider == "dns"
        await stack.wait_event("executor.health_changed", executor=b.url, healthy=True)
        await stack.enqueue_many(20, prefix="two")
        await stack.wait_terminal(24)
        assert b.app[EXECUTOR_STATE].executed > 0  # the new address takes tasks

        # A task in flight on an executor that leaves finishes there normally.
        await stack.http.post(f"{a.url}/_control", json={"latency_s": 1.5})
        await stack.http.post(f"{b.url}/_control", json={"latency_s": 1.5})
        await stack.enqueue_many(2, prefix="three")
        await eventually(lambda: a.app[EXECUTOR_STATE].in_flight == 1)
        server.records["executors.test"] = ["127.0.0.3"]
        removed = await stack.wait_event("executor.removed", executor=a.url)
        assert isinstance(removed.event, ev.ExecutorRemoved) and removed.event.in_flight == 1
        await stack.wait_terminal(26)
        entries = await stack.entries()
        on_a = [t for t in of_type(entries, ev.TaskCompleted) if t.eval_id.startswith("three")]
        assert {t.executor for t in on_a} == {a.url, b.url}
        after = [e.event for e in entries if e.id > removed.id]
        assert not any(isinstance(e, ev.ExecutorSelected) and e.executor == a.url for e in after)
        _, status = await stack.get_json("/status")
        assert [x["url"] for x in status["executors"]] == [b.url]
    finally:
        await a.stop()
        await b.stop()


# --- strategies live ---------------------------------------------------------------


async def test_least_loaded_sends_fewer_tasks_to_the_slow_executor(stack_factory: Any) -> None:
    stack: Stack = await stack_factory(
        executor_options=[{"latency_s": 0.25}, {"latency_s": 0.02}, {"latency_s": 0.02}],
        executor_capacity=4,
        routing_strategy="least_loaded",
    )
    await offer(stack, 30, 0.04, "ll")
    await stack.wait_terminal(30)
    least_loaded_slow = executed(stack, 0, "ll")
    await stack.stop_worker()
    await stack.start_worker(routing_strategy="round_robin")
    await offer(stack, 30, 0.04, "rr")
    await stack.wait_terminal(60)
    round_robin_slow = executed(stack, 0, "rr")
    assert least_loaded_slow <= 4 and round_robin_slow >= 8, (
        least_loaded_slow,
        round_robin_slow,
    )
    entries = await stack.entries()
    selected = [s for s in of_type(entries, ev.ExecutorSelected) if s.eval_id.startswith("ll")]
    assert {s.strategy for s in selected} == {"least_loaded"}
    assert all(s.why and len(s.candidates) == 3 for s in selected)
    assert any(s.why.startswith("lower latency of 2 sampled") for s in selected)
    slow = stack.executors[0].url
    figures = [c.latency_ms for s in selected[-5:] for c in s.candidates if c.executor == slow]
    assert all(f is not None and f > 200 for f in figures)  # the EWMA of the slow one


async def test_sticky_keeps_a_key_on_one_executor(stack_factory: Any) -> None:
    stack: Stack = await stack_factory(routing_strategy="sticky", executor_capacity=10)
    for i in range(6):
        key = "user-7" if i % 2 else "user-8"
        await stack.inject(f'{{"eval_id": "s-{i}", "code": "x", "affinity_key": "{key}"}}'.encode())
    entries = await eventually(
        lambda: _when(stack, lambda es: len(of_type(es, ev.TaskCompleted)) == 6)
    )
    selected = of_type(entries, ev.ExecutorSelected)
    by_key: dict[str | None, set[str]] = {}
    for s in selected:
        by_key.setdefault(s.key, set()).add(s.executor)
        assert s.why == f"rendezvous top for key {s.key}"
    assert set(by_key) == {"user-7", "user-8"} and all(len(v) == 1 for v in by_key.values())
    pulled = {p.eval_id: p.task for p in of_type(entries, ev.TaskPulled)}
    assert pulled["s-1"].affinity_key == "user-7" and pulled["s-1"].routing_key == "user-7"


async def _when(stack: Stack, check: Any) -> list[ev.Entry] | None:
    entries = await stack.entries()
    return entries if check(entries) else None


# --- health thresholds, capacity ------------------------------------------------------


async def test_one_failed_check_does_not_flip_with_unhealthy_threshold_2(
    stack_factory: Any,
) -> None:
    stack: Stack = await stack_factory(
        executor_options=[{"health": "flap"}, {}],
        health_interval_s=0.05,
        unhealthy_threshold=2,
        healthy_threshold=3,
    )
    flapping = stack.executors[0].url
    await stack.wait_event("executor.health_changed", executor=flapping, healthy=True)
    await eventually(lambda: stack.executor_state(0).health_checks >= 12)
    entries = await stack.entries()
    flips = [f for f in of_type(entries, ev.ExecutorHealthChanged) if f.executor == flapping]
    assert [f.healthy for f in flips] == [True]  # failing every other check never flips it

    await stack.control(0, health="unhealthy")
    down = await stack.wait_event("executor.health_changed", executor=flapping, healthy=False)
    assert isinstance(down.event, ev.ExecutorHealthChanged) and down.event.checks == 2
    await stack.control(0, health="healthy")
    up = await stack.wait_event("executor.health_changed", executor=flapping, healthy=True,
                                checks=3)  # fmt: skip
    assert up.id > down.id


async def test_capacity_is_learned_from_health(stack_factory: Any) -> None:
    stack: Stack = await stack_factory(
        executor_options=[{"capacity": 5}, {}],
        executor_capacity=1,
        executor_capacities=(),
        learn_capacity=True,
    )
    learned = await stack.wait_event("executor.capacity_changed")
    assert isinstance(learned.event, ev.ExecutorCapacityChanged)
    assert (learned.event.executor, learned.event.capacity, learned.event.previous) == (
        stack.executors[0].url,
        5,
        1,
    )
    _, status = await stack.get_json("/status")
    assert [x["capacity"] for x in status["executors"]] == [5, 1]


async def test_configured_capacity_per_executor(stack_factory: Any) -> None:
    stack: Stack = await stack_factory(
        executor_options=[{"latency_s": 0.3}, {"latency_s": 0.3}], executor_capacity=1
    )
    await stack.stop_worker()
    await stack.start_worker(executor_capacities=((stack.executors[1].url, 3),))
    await stack.enqueue_many(8)
    await eventually(lambda: stack.executor_state(1).max_in_flight == 3)
    await stack.wait_terminal(8)
    assert stack.executor_state(0).max_in_flight == 1


# --- passive ejection ------------------------------------------------------------------


async def test_failing_executor_is_ejected_and_rejoins(stack_factory: Any) -> None:
    stack: Stack = await stack_factory(
        executor_options=[{"latency_s": 0.02}] * 3,
        executor_capacity=1,
        routing_strategy="round_robin",
        eject_after_failures=2,
        eject_base_s=0.6,
        eject_max_s=10,
        health_interval_s=0.1,
        retry_base_ms=1,
    )
    bad = stack.executors[0].url
    await stack.control(0, execute="error500")
    feeding = asyncio.create_task(offer(stack, 400, 0.02, "e"))
    try:
        first = await stack.wait_event("executor.ejected", executor=bad)
        assert isinstance(first.event, ev.ExecutorEjected)
        assert (first.event.consecutive_failures, first.event.ejection_s) == (2, 0.6)
        assert first.event.ejections == 1 and "executor_http_error" in first.event.reason
        # Still failing after the first ejection: the next one lasts twice as long.
        await stack.wait_event("executor.rejoined", executor=bad)
        second = await stack.wait_event("executor.ejected", executor=bad, ejections=2)
        assert second.event.ejection_s == 1.2  # type: ignore[union-attr]
        await stack.control(0, execute="normal")
        rejoined = await eventually(lambda: _rejoined_after(stack, second.id), 10)
        ok_before = sum(1 for e in await stack.entries() if _completed_on(e, bad))
        await eventually(lambda: _completed_on_count(stack, bad, ok_before + 3), 10)
    finally:
        feeding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeding
    entries = await stack.entries()
    first_back = await _rejoined_after(stack, first.id)
    assert first_back is not None
    for start, end in ((first.id, first_back.id), (second.id, rejoined.id)):
        chosen = [
            e.event
            for e in entries
            if start < e.id < end and isinstance(e.event, ev.ExecutorSelected)
        ]
        assert chosen and all(s.executor != bad for s in chosen)  # nothing routed while ejected
        marked = [c for s in chosen for c in s.candidates if c.executor == bad]
        assert all(c.ejected and c.healthy for c in marked)
    _, health = await stack.get_json("/health")
    assert health["executors_healthy"] == 3


def _completed_on(entry: ev.Entry, url: str) -> bool:
    return isinstance(entry.event, ev.TaskCompleted) and entry.event.executor == url


async def _completed_on_count(stack: Stack, url: str, n: int) -> bool:
    return sum(1 for e in await stack.entries() if _completed_on(e, url)) >= n


async def _rejoined_after(stack: Stack, entry_id: str) -> ev.Entry | None:
    for e in await stack.entries():
        if e.id > entry_id and isinstance(e.event, ev.ExecutorRejoined):
            return e
    return None


# --- several queues --------------------------------------------------------------------


async def test_high_priority_queue_is_drained_first_and_reports_go_back(
    stack_factory: Any,
) -> None:
    stack: Stack = await stack_factory(start_worker=False, executor_capacity=1)
    high = Server(create_queue_app())
    await high.start()
    try:
        low = stack.queue
        for i in range(10):
            async with stack.http.post(
                f"{high.url}/tasks", json={"eval_id": f"high-{i}", "code": "x"}
            ) as resp:
                assert resp.status == 200
        await stack.enqueue_many(10, prefix="low")
        await stack.start_worker(queue_service_urls=(high.url, low.url))
        await stack.wait_terminal(10)
        high_state = high.app[QUEUE_STATE]
        await eventually(lambda: high_state.stats()["completed"] == 10)
        entries = await stack.entries()
        pulled = of_type(entries, ev.TaskPulled)
        assert [p.queue for p in pulled] == [high.url] * 10 + [low.url] * 10
        assert all(p.eval_id.startswith("high") for p in pulled[:10])
        assert {t.queue for t in of_type(entries, ev.TaskCompleted)} == {high.url, low.url}
        assert all(t.status == "completed" for t in high_state.tasks.values())
        assert all(t.status == "completed" for t in stack.queue_state.tasks.values())
        started = of_type(entries, ev.WorkerStarted)[-1]
        assert started.queues == [high.url, low.url]

        # Each queue's reachability is its own: the low one is still pulled meanwhile.
        await high.stop()
        down = await stack.wait_event("queue.unreachable", queue=high.url)
        await stack.enqueue("low-after")
        await stack.wait_terminal(11)
        assert not [e for e in of_type(await stack.entries(), ev.QueueUnreachable)
                    if e.queue != high.url]  # fmt: skip
        _, status = await stack.get_json("/status")
        assert status["queue"]["reachable"] is False
        await high.start()
        recovered = await stack.wait_event("queue.recovered", queue=high.url)
        assert recovered.id > down.id
    finally:
        await high.stop()


async def test_weighted_queues_share_pulls(stack_factory: Any) -> None:
    stack: Stack = await stack_factory(start_worker=False, executor_capacity=1)
    other = Server(create_queue_app())
    await other.start()
    try:
        for i in range(20):
            async with stack.http.post(
                f"{other.url}/tasks", json={"eval_id": f"w3-{i}", "code": "x"}
            ) as resp:
                assert resp.status == 200
        await stack.enqueue_many(20, prefix="w1")
        await stack.start_worker(
            queue_service_urls=(other.url, stack.queue.url), queue_weights=(3.0, 1.0)
        )
        await eventually(lambda: _when(stack, lambda es: len(of_type(es, ev.TaskPulled)) >= 16), 30)
        first = of_type(await stack.entries(), ev.TaskPulled)[:16]
        assert Counter(p.queue for p in first) == {other.url: 12, stack.queue.url: 4}
        await stack.wait_terminal(20)
    finally:
        await other.stop()


async def test_fast_path_spends_no_round_robin_turn_on_a_stale_executor(
    redis_url: str, prefix: str
) -> None:
    """The choice made right after a pull skips an executor due for a health check
    instead of choosing it and giving up: the round-robin order stays intact."""
    settings = Settings(
        redis_url=redis_url,
        executor_urls=("http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"),
        executor_capacity=5,
        routing_strategy="round_robin",
        stream_prefix=prefix,
    )
    redis = aioredis.Redis.from_url(redis_url)
    async with aiohttp.ClientSession() as session:
        router = Router(settings, EventStore(redis, Keys(prefix), "w"), session)
        first, second, third = router.pool.executors
        for x in router.pool.executors:
            x.healthy = x.checked = True
            x.last_check_monotonic = time.monotonic()
        first.last_check_monotonic = 0.0  # stale: the fast path must not take it
        task = ev.Task(eval_id="t", code="")
        picks = []
        for _ in range(2):
            selection = await router.selector.choose(task, wait=False)
            assert selection is not None
            picks.append(selection.executor)
        first.last_check_monotonic = time.monotonic()
        selection = await router.selector.choose(task, wait=False)
        assert selection is not None
        picks.append(selection.executor)
        assert picks == [second, third, first]
    await redis.aclose()
