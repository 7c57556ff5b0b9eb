"""Tracing: W3C trace context in and out, and spans built from the stream, exported with
the OpenTelemetry SDK over OTLP/HTTP to a receiver this test runs (protobuf decoded with
``opentelemetry-proto``)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from queue_worker.config import Settings
from queue_worker.devstack.otlp import OTLP_RECEIVER, OtlpReceiver, ReceivedSpan, create_otlp_app
from queue_worker.devstack.serve import Server
from queue_worker.http.state import SPANS
from queue_worker.router.queue_client import parse_handout, parse_task
from queue_worker.streams import events as ev
from queue_worker.streams import retention
from queue_worker.streams.keys import Keys
from queue_worker.streams.store import EventStore
from queue_worker.streams.tracecontext import (
    InvalidTraceparent,
    parse_traceparent,
    parse_tracestate,
    root_span_id,
    span_id,
)
from queue_worker.streams.tracing import SpanProjector
from tests.harness import Stack, eventually, spawn_worker

GIVEN_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
GIVEN_PARENT = "00f067aa0ba902b7"
GIVEN = f"00-{GIVEN_TRACE}-{GIVEN_PARENT}-01"


@pytest.fixture
async def otlp() -> AsyncIterator[tuple[Server, OtlpReceiver]]:
    server = Server(create_otlp_app())
    await server.start()
    yield server, server.app[OTLP_RECEIVER]
    await server.stop()


def traced(stack_options: dict[str, Any], server: Server) -> dict[str, Any]:
    return {
        "otel_exporter_otlp_endpoint": server.url,
        "claim_idle_ms": 300,
        **stack_options,
    }


def by_name(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.name == name]


def trace_of(receiver: OtlpReceiver, eval_id: str) -> list[ReceivedSpan]:
    return [s for s in receiver.spans if s.attributes.get("queue_worker.eval_id") == eval_id]


# --- trace context from outside -------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        None,
        42,
        ["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"],
        "",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # another version
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero parent id
        "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",  # shifted dash
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
        " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n",
        "00-\uff14bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # full-width 4
        "x" * 1_000_000,
    ],
)
def test_hostile_traceparents_are_refused_with_a_reason(value: object) -> None:
    with pytest.raises(InvalidTraceparent) as raised:
        parse_traceparent(value)
    assert str(raised.value)
    assert len(str(raised.value)) < 100  # the value itself is never echoed


def test_a_valid_traceparent_is_read() -> None:
    parent = parse_traceparent(GIVEN)
    assert (parent.trace_id, parent.parent_id, parent.flags) == (GIVEN_TRACE, GIVEN_PARENT, "01")
    assert parent.header() == GIVEN


def test_tracestate_is_kept_only_when_valid() -> None:
    assert parse_tracestate("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7") == (
        "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    )
    for bad in (None, 7, "", "no equals", "UPPER=x", "a=" + "x" * 600, ",".join(["a=b"] * 33)):
        assert parse_tracestate(bad) is None


def _body(**fields: Any) -> bytes:
    return msgspec.json.encode({"eval_id": "e1", "code": "print(1)", **fields})


def test_a_task_s_traceparent_is_its_trace_in_the_task_or_its_metadata() -> None:
    for body in (
        _body(traceparent=GIVEN, tracestate="k=v"),
        _body(metadata={"traceparent": GIVEN, "tracestate": "k=v", "other": [1, 2]}),
    ):
        found = parse_handout(body)
        assert found is not None
        task, ignored = found
        assert ignored is None
        assert (task.trace_id, task.traceparent, task.tracestate) == (GIVEN_TRACE, GIVEN, "k=v")


def test_a_task_without_or_with_a_bad_traceparent_gets_a_new_trace() -> None:
    plain = parse_task(_body())
    assert plain is not None and plain.traceparent is None
    assert plain.trace_id is not None and len(plain.trace_id) == 32
    assert plain.trace_id != parse_task(_body()).trace_id  # type: ignore[union-attr]
    for bad in ("garbage", 12, {"a": 1}, "00-" + "0" * 32 + "-00f067aa0ba902b7-01"):
        for body in (_body(traceparent=bad), _body(metadata={"traceparent": bad})):
            found = parse_handout(body)
            assert found is not None  # never a rejection
            task, ignored = found
            assert ignored is not None and ignored.startswith("traceparent ignored")
            assert task.traceparent is None and task.trace_id not in (None, GIVEN_TRACE)
    # A trace id the queue sends is not taken; metadata that is not an object is ignored.
    other = parse_task(_body(trace_id=GIVEN_TRACE, metadata="x"))
    assert other is not None and other.trace_id != GIVEN_TRACE


def test_span_ids_are_derived_not_drawn() -> None:
    assert span_id("e1", "1-0") == span_id("e1", "1-0")
    assert len({span_id("e1", "1-0"), span_id("e1", "1-1"), span_id("e2", "1-0")}) == 3
    assert span_id("e1", "1-0", "report") != span_id("e1", "1-0")
    assert root_span_id("e1", GIVEN_TRACE) == root_span_id("e1", GIVEN_TRACE)


# --- off by default ---------------------------------------------------------------------------


def test_tracing_is_off_by_default_and_the_sdk_not_loaded() -> None:
    assert Settings().traces_endpoint is None
    on = Settings(otel_exporter_otlp_endpoint="http://c:4318")
    assert on.traces_endpoint == "http://c:4318/v1/traces"
    assert on.with_(otel_sdk_disabled=True).traces_endpoint is None
    both = on.with_(otel_exporter_otlp_traces_endpoint="http://d/x")
    assert both.traces_endpoint == "http://d/x"
    probe = (
        "import sys\n"
        "from queue_worker.config import Settings\n"
        "from queue_worker.http.app import create_app\n"
        "create_app(Settings())\n"
        "print([m for m in sys.modules if m.startswith(('opentelemetry.sdk.trace',"
        " 'opentelemetry.exporter'))])\n"
    )
    # (redis-py imports the SDK's metrics on its own when they are installed: not ours.)
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip().splitlines()[-1] == "[]", loaded


async def test_off_by_default_no_group_no_export_but_context_still_propagated(
    stack_factory: Any,
) -> None:
    stack: Stack = await stack_factory(executors=1)
    assert stack.worker is not None and stack.worker.app[SPANS] is None
    await stack.enqueue("off-1", traceparent=GIVEN)
    await stack.wait_event("task.reported", eval_id="off-1")
    groups = {str(g["name"]) for g in await stack.store.info_groups()}
    assert "tracing" not in groups
    outcome_groups = await stack.store.info_groups(stack.store.keys.outcomes)
    assert "reporter" in {str(g["name"]) for g in outcome_groups}  # the groups do exist
    keys = [k async for k in stack.redis.scan_iter(match=f"{{{stack.prefix}}}:trace*")]
    assert keys == []
    sent = stack.executor_state(0).traceparents["off-1"]
    assert len(sent) == 1 and sent[0] is not None and sent[0].split("-")[1] == GIVEN_TRACE
    for entry in await stack.entries():
        if entry.event.eval_id_or_empty == "off-1":
            assert getattr(entry.event, "trace_id", None) == GIVEN_TRACE, entry.event.type


# --- spans --------------------------------------------------------------------------------------


async def test_one_trace_per_evaluation_with_its_structure(
    stack_factory: Any, otlp: tuple[Server, OtlpReceiver]
) -> None:
    server, receiver = otlp
    stack: Stack = await stack_factory(
        **traced(
            {
                "executor_options": [{"execute": "error500"}, {}],
                "routing_strategy": "round_robin",
                "retry_base_ms": 50,
                "eject_after_failures": 100,
                "otel_service_name": "qw-test",
            },
            server,
        )
    )
    assert isinstance(stack.worker.app[SPANS], SpanProjector)  # type: ignore[union-attr]
    await stack.enqueue("tr-given", traceparent=GIVEN, tracestate="k=v")
    await stack.enqueue("tr-meta", metadata={"traceparent": GIVEN.replace("4bf9", "5bf9")})
    await stack.enqueue("tr-new")
    await stack.enqueue("tr-bad", traceparent="00-zz-00-01")
    ids = ["tr-given", "tr-meta", "tr-new", "tr-bad"]
    await stack.wait_terminal(4)

    def exported() -> bool:
        return all(by_name(trace_of(receiver, i), "report") for i in ids)

    await eventually(exported, timeout_s=30)
    entries = await stack.entries()
    traces = receiver.traces()
    # One trace per evaluation: every span of a task in one trace, no trace shared.
    trace_ids = {i: {s.trace_id for s in trace_of(receiver, i)} for i in ids}
    assert all(len(t) == 1 for t in trace_ids.values()), trace_ids
    assert len({next(iter(t)) for t in trace_ids.values()}) == 4
    assert trace_ids["tr-given"] == {GIVEN_TRACE}
    assert trace_ids["tr-meta"] == {GIVEN_TRACE.replace("4bf9", "5bf9")}
    for eval_id in ids:
        spans = trace_of(receiver, eval_id)
        trace_id = spans[0].trace_id
        assert len(traces[trace_id]) == len(spans)
        [root] = by_name(spans, "evaluation")
        [pulled] = [
            e for e in entries if isinstance(e.event, ev.TaskPulled) and e.event.eval_id == eval_id
        ]
        assert root.span_id == root_span_id(eval_id, trace_id, pulled.id)
        assert root.attributes["queue_worker.outcome"] == "completed"
        assert root.attributes["queue_worker.worker_id"] == "test-worker"
        assert root.resource["service.name"] == "qw-test"
        children = [s for s in spans if s is not root]
        assert children and all(s.parent_id == root.span_id for s in children)
        assert all(root.start_ns <= s.start_ns <= s.end_ns <= root.end_ns for s in children)
        assert len({s.span_id for s in spans}) == len(spans)
        # The task's events all name its trace.
        mine = [e for e in entries if e.event.eval_id_or_empty == eval_id]
        assert mine and all(getattr(e.event, "trace_id", None) == trace_id for e in mine)
        dispatches = by_name(spans, "dispatch")
        dispatched = [e for e in mine if isinstance(e.event, ev.TaskDispatched)]
        assert len(dispatches) == len(dispatched)
        assert {d.span_id for d in dispatches} == {span_id(eval_id, e.id) for e in dispatched}
        for d in dispatches:
            assert d.attributes["queue_worker.executor"] in (x.url for x in stack.executors)
            assert d.attributes["queue_worker.strategy"] == "round_robin"
            assert d.attributes["queue_worker.why"]
            assert d.attributes["queue_worker.attempt"] >= 1
        [report] = by_name(spans, "report")
        assert report.attributes["queue_worker.http_status"] == 200
        # Propagation: the executor got each attempt's span as parent; the queue the report's.
        sent = [
            str(tp)
            for i in range(2)
            for tp in stack.executor_state(i).traceparents.get(eval_id, [])
        ]
        assert sorted(sent) == sorted(f"00-{trace_id}-{d.span_id}-01" for d in dispatches)
        reported = stack.queue_state.tasks[eval_id].report_traceparents
        assert reported == [f"00-{trace_id}-{report.span_id}-01"]
    # The given parent is the root's parent (remote); a new or ignored one has none.
    assert by_name(trace_of(receiver, "tr-given"), "evaluation")[0].parent_id == GIVEN_PARENT
    assert by_name(trace_of(receiver, "tr-new"), "evaluation")[0].parent_id is None
    bad_root = by_name(trace_of(receiver, "tr-bad"), "evaluation")[0]
    assert bad_root.parent_id is None
    assert bad_root.attributes["queue_worker.trace_ignored"].startswith("traceparent ignored")
    # Retries: round robin over a failing and a working executor retried at least one task;
    # its failed attempt is an error span, followed by a backoff span.
    retried = [i for i in ids if by_name(trace_of(receiver, i), "retry backoff")]
    assert retried
    for eval_id in retried:
        spans = trace_of(receiver, eval_id)
        first, *rest = sorted(by_name(spans, "dispatch"), key=lambda s: s.start_ns)
        assert first.status_code == 2 and first.attributes["queue_worker.attempt"] == 1
        assert rest and rest[-1].attributes["queue_worker.outcome"] == "completed"
        backoff = by_name(spans, "retry backoff")[0]
        assert backoff.attributes["queue_worker.reason"] == "executor_http_error"
        assert backoff.start_ns >= first.end_ns


async def test_no_duplicate_spans_after_redelivery_or_a_failed_export(
    stack_factory: Any, otlp: tuple[Server, OtlpReceiver]
) -> None:
    server, receiver = otlp
    stack: Stack = await stack_factory(**traced({"executors": 1, "max_deliveries": 50}, server))
    receiver.fail_next = 2  # the first exports are refused: the batch stays pending
    await stack.enqueue("dup-1")
    await stack.wait_event("task.reported", eval_id="dup-1")
    await eventually(lambda: trace_of(receiver, "dup-1"), timeout_s=30)
    assert receiver.refused == 2
    projector = stack.worker.app[SPANS]  # type: ignore[union-attr]
    assert projector is not None and projector.export_errors >= 2
    async with stack.http.get(f"{stack.worker.url}/metrics") as resp:  # type: ignore[union-attr]
        text = await resp.text()
    assert resp.status == 200
    assert "queue_worker_span_exports_failed_total 2.0" in text
    assert f"queue_worker_spans_exported_total {float(projector.spans_exported)}" in text
    await stack.enqueue("dup-2")
    await stack.wait_event("task.reported", eval_id="dup-2")
    await eventually(lambda: trace_of(receiver, "dup-2"), timeout_s=30)
    first = sorted((s.trace_id, s.span_id) for s in receiver.spans)
    assert len(first) == len(set(first))
    # Everything delivered again: the group read from the start, by a new worker.
    await stack.stop_worker()
    await stack.redis.xgroup_setid(stack.store.keys.events, "tracing", "0")
    await stack.start_worker()
    again = stack.worker.app[SPANS]  # type: ignore[union-attr]
    assert again is not None
    await eventually(lambda: again.repeats_skipped >= 2, timeout_s=30)
    await asyncio.sleep(0.5)
    assert sorted((s.trace_id, s.span_id) for s in receiver.spans) == first
    # Nothing pending, and no copy of any task's steps: the spans came from the index.
    pending = await stack.redis.xpending(stack.store.keys.events, "tracing")
    assert pending["pending"] == 0
    kept = [k async for k in stack.redis.scan_iter(match=f"{{{stack.prefix}}}:trace:*")]
    assert kept == []
    marks = [k async for k in stack.redis.scan_iter(match=f"{{{stack.prefix}}}:traced:*")]
    assert len(marks) == 2


@pytest.mark.parametrize("after", ["restart", "takeover"])
async def test_a_task_whose_worker_was_sigkilled_has_one_complete_trace(
    stack_factory: Any, otlp: tuple[Server, OtlpReceiver], after: str
) -> None:
    """The worker running the task is SIGKILLed mid-attempt; it is started again under
    its name (``restart``), or another replica takes it over (``takeover``)."""
    server, receiver = otlp
    stack: Stack = await stack_factory(start_worker=False, executors=1, latency_s=0.01)

    def env(name: str) -> dict[str, str]:
        return stack.process_env(
            name,
            EXECUTOR_CAPACITY="2",
            CLAIM_IDLE_MS="500",
            HEALTH_INTERVAL_S="0.5",
            HEARTBEAT_INTERVAL_S="0.2",
            DEAD_AFTER_S="1",
            TAKEOVER_INTERVAL_S="0.3",
            LOG_LEVEL="ERROR",
            OTEL_EXPORTER_OTLP_ENDPOINT=server.url,
            OTEL_EXPORTER_OTLP_HEADERS="x-test-token=s3cret%20value",
        )

    await stack.control(0, latency_s=30.0)  # the first attempt is still running at the kill
    await stack.enqueue("crash-1", traceparent=GIVEN)
    proc = await spawn_worker(env("trace-worker"))
    try:
        await stack.wait_event("task.dispatched", timeout_s=30, eval_id="crash-1")
        await eventually(lambda: stack.executor_state(0).in_flight == 1)
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    await stack.control(0, latency_s=0.01)
    proc = await spawn_worker(env("trace-worker" if after == "restart" else "trace-peer"))
    try:
        await stack.wait_event("task.reported", timeout_s=60, eval_id="crash-1")
        await eventually(lambda: by_name(trace_of(receiver, "crash-1"), "report"), 30)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    spans = trace_of(receiver, "crash-1")
    assert {s.trace_id for s in spans} == {GIVEN_TRACE}
    [root] = by_name(spans, "evaluation")
    assert root.parent_id == GIVEN_PARENT
    assert root.attributes["queue_worker.outcome"] == "completed"
    assert all(s.parent_id == root.span_id for s in spans if s is not root)
    dispatches = sorted(by_name(spans, "dispatch"), key=lambda s: s.start_ns)
    assert [d.attributes["queue_worker.attempt"] for d in dispatches] == [1, 2]
    assert dispatches[0].attributes["queue_worker.outcome"] == "interrupted"
    assert dispatches[0].status_code == 2
    assert dispatches[1].attributes["queue_worker.outcome"] == "completed"
    [recovery] = by_name(spans, "recovery")
    assert recovery.attributes["queue_worker.action"] == "redispatch"
    assert recovery.attributes["queue_worker.previous_attempt"] == 1
    assert recovery.attributes["queue_worker.previous_worker_id"] == "trace-worker"
    if after == "takeover":
        assert recovery.attributes["queue_worker.owner"] == "trace-worker"
        assert recovery.attributes["queue_worker.worker_id"] == "trace-peer"
        assert dispatches[1].attributes["queue_worker.worker_id"] == "trace-peer"
    assert root.attributes["queue_worker.worker_id"] == "trace-worker"  # it pulled the task
    assert dispatches[0].start_ns <= recovery.end_ns <= dispatches[1].start_ns
    assert len(by_name(spans, "report")) == 1
    assert len({s.span_id for s in spans}) == len(spans)
    # Both runs sent the executor a traceparent of this trace, each naming its attempt.
    sent = stack.executor_state(0).traceparents["crash-1"]
    assert sent == [f"00-{GIVEN_TRACE}-{d.span_id}-01" for d in dispatches]
    # The export headers came from OTEL_EXPORTER_OTLP_HEADERS, percent-decoded.
    assert all(h.get("x-test-token") == "s3cret value" for h in receiver.headers)


async def test_retention_does_not_wait_for_a_tracing_group(redis_url: str, prefix: str) -> None:
    """A ``tracing`` group left behind (tracing turned off) never holds trimming back;
    any other group still does."""
    redis = aioredis.Redis.from_url(redis_url)
    store = EventStore(redis, Keys(prefix), "w")
    try:
        ids = await store.append(*[ev.PullStarted(pull_id=str(i)) for i in range(100)])
        await redis.xgroup_create(store.keys.events, "tracing", id="0")  # never reads
        lossy = ("tracing",)
        assert await retention.trim_point(store, 10) is None  # it read nothing: all kept
        assert await retention.trim_point(store, 10, lossy=lossy) == ids[90]
        assert await retention.trim(store, 10, approximate=False, lossy=lossy) == 90
        await redis.xgroup_create(store.keys.events, "other", id="0")
        await store.append(*[ev.PullStarted(pull_id=str(i)) for i in range(20)])
        assert await retention.trim(store, 10, approximate=False, lossy=lossy) == 0
    finally:
        await redis.aclose()


def test_spans_of_a_history_with_waits_throttles_retries_and_a_recovery() -> None:
    """``build`` alone, on a made-up history: every kind of span, ids from the entries."""
    from queue_worker.streams.spans import Step, build

    t = GIVEN_TRACE

    def step(i: str, ts: int, type_: str, worker: str = "w1", **attrs: Any) -> Step:
        return Step(i, ts, type_, worker, t, attrs)

    steps = [
        step("100-0", 100, "task.pulled", traceparent=GIVEN, queue="q", language="python"),
        step("150-0", 150, "executor.selected", executor="x1", attempt=1, why="least loaded"),
        step("150-1", 150, "task.dispatched", executor="x1", attempt=1, timeout_s=30.0),
        step("160-0", 160, "executor.selected", executor="x2", attempt=1, why="x1 cooling"),
        step("160-1", 160, "task.dispatched", executor="x2", attempt=1, timeout_s=30.0),
        step(
            "200-0",
            200,
            "task.retry_scheduled",
            executor="x2",
            attempt=2,
            delay_ms=40.0,
            reason="executor_unreachable",
        ),
        step("250-0", 250, "executor.selected", executor="x1", attempt=2, why="least loaded"),
        step("250-1", 250, "task.dispatched", executor="x1", attempt=2, timeout_s=30.0),
        step(
            "900-0",
            900,
            "task.recovered",
            "w2",
            action="redispatch",
            stage="dispatched",
            previous_attempt=2,
        ),
        step("910-0", 910, "executor.selected", "w2", executor="x1", attempt=3, why="only one"),
        step("910-1", 910, "task.dispatched", "w2", executor="x1", attempt=3, timeout_s=30.0),
        step("950-0", 950, "task.completed", "w2", executor="x1", attempt=3, duration_ms=40.0),
        step("990-0", 990, "task.reported", "w2", outcome="completed", http_status=200),
    ]
    spans = build("e1", list(reversed(steps)) + steps[:3])  # any order, repeats ignored
    again = build("e1", steps)
    assert [(s.name, s.span_id, s.start_ns, s.end_ns) for s in spans] == [
        (s.name, s.span_id, s.start_ns, s.end_ns) for s in again
    ]
    root = spans[0]
    assert (root.name, root.parent_id, root.remote_parent) == ("evaluation", GIVEN_PARENT, True)
    assert (root.start_ns, root.end_ns) == (100 * 10**6, 990 * 10**6)
    assert root.attributes["queue_worker.attempts"] == 3 and root.error is None
    names = [s.name for s in spans[1:]]
    assert names == [
        "wait for slot", "dispatch", "dispatch", "retry backoff", "wait for slot", "dispatch",
        "recovery", "wait for slot", "dispatch", "report",
    ]  # fmt: skip
    assert all(s.parent_id == root.span_id and s.trace_id == t for s in spans[1:])
    waits = [s for s in spans if s.name == "wait for slot"]
    assert [(w.start_ns // 10**6, w.end_ns // 10**6) for w in waits] == [
        (100, 150),
        (240, 250),
        (900, 910),
    ]
    dispatches = [s for s in spans if s.name == "dispatch"]
    assert [d.span_id for d in dispatches] == [
        span_id("e1", i) for i in ("150-1", "160-1", "250-1", "910-1")
    ]
    outcomes = [d.attributes["queue_worker.outcome"] for d in dispatches]
    assert outcomes == ["rerouted", "executor_unreachable", "interrupted", "completed"]
    assert [d.error is not None for d in dispatches] == [True, True, True, False]
    assert dispatches[1].attributes["queue_worker.why"] == "x1 cooling"
    [recovery] = [s for s in spans if s.name == "recovery"]
    assert (recovery.start_ns // 10**6, recovery.end_ns // 10**6) == (250, 900)
    assert recovery.attributes["queue_worker.previous_worker_id"] == "w1"
    assert recovery.attributes["queue_worker.worker_id"] == "w2"
    report = spans[-1]
    assert report.span_id == span_id("e1", "950-0", "report")
    assert (report.start_ns // 10**6, report.end_ns // 10**6) == (950, 990)
    # No trace named anywhere: no spans (entries written before trace ids were recorded).
    assert build("e1", [Step("1-0", 1, "task.pulled", "w", None, {})]) == []
    # A traceparent that says "not sampled": spans built, marked so (the projector skips them).
    unsampled = [step("1-0", 1, "task.pulled", traceparent=GIVEN[:-2] + "00")]
    assert [s.sampled for s in build("e1", unsampled)] == [False]


async def test_replicas_sharing_the_group_export_each_trace_whole_and_once(
    stack_factory: Any, otlp: tuple[Server, OtlpReceiver]
) -> None:
    """Three replicas share the ``tracing`` group: a task's entries are spread over their
    batches, and still each trace is exported once with every span."""
    from queue_worker.http.app import create_app

    server, receiver = otlp
    stack: Stack = await stack_factory(**traced({"executors": 3}, server))
    others = [Server(create_app(stack.settings.with_(hostname=f"replica-{i}"))) for i in (2, 3)]
    for other in others:
        await other.start()
    try:
        ids = await stack.enqueue_many(300, prefix="rep")
        await stack.wait_terminal(300, timeout_s=120)

        def exported() -> bool:
            roots = {s.attributes.get("queue_worker.eval_id") for s in receiver.spans
                     if s.name == "evaluation"}  # fmt: skip
            return set(ids) <= roots

        await eventually(exported, timeout_s=60)
    finally:
        for other in others:
            await other.stop()
    entries = await stack.entries()
    pullers = {e.worker_id for e in entries if isinstance(e.event, ev.TaskPulled)}
    assert len(pullers) >= 2, pullers  # the work was shared
    keys = sorted((s.trace_id, s.span_id) for s in receiver.spans)
    assert len(keys) == len(set(keys))  # no span twice
    dispatched = Counter(e.event.eval_id for e in entries if isinstance(e.event, ev.TaskDispatched))
    for eval_id in ids:
        spans = trace_of(receiver, eval_id)
        names = Counter(s.name for s in spans)
        assert names["evaluation"] == 1 and names["report"] == 1, (eval_id, names)
        assert names["dispatch"] == dispatched[eval_id] >= 1, (eval_id, names)
        [root] = by_name(spans, "evaluation")
        assert "queue_worker.queue" in root.attributes  # its task.pulled step was there


async def test_entries_another_consumer_still_holds_are_in_the_trace(
    redis_url: str, prefix: str
) -> None:
    """A replica read the task's first entries and stalls (they stay pending with it) when
    the task ends: the projector handling the end finds them in the task index and reads
    them from the stream, so the trace is whole; when they come back later (claimed),
    nothing is exported again."""
    redis = aioredis.Redis.from_url(redis_url)
    store = EventStore(redis, Keys(prefix), "w")
    exported: list[list[Any]] = []

    async def export(spans: list[Any]) -> None:
        exported.append(spans)

    await redis.xgroup_create(store.keys.events, "tracing", id="0", mkstream=True)
    task = ev.Task(eval_id="held-1", code="x", trace_id=GIVEN_TRACE)
    await store.append(
        ev.TaskPulled(eval_id="held-1", pull_id="p", task=task, code_bytes=1, queue="q",
                      trace_id=GIVEN_TRACE),
        ev.ExecutorSelected(eval_id="held-1", executor="x1", strategy="s", attempt=1,
                            candidates=[], why="the only one", trace_id=GIVEN_TRACE),
    )  # fmt: skip
    stalled = await redis.xreadgroup("tracing", "stalled", {store.keys.events: ">"}, count=10)
    assert len(stalled[0][1]) == 2  # held by a consumer that never acknowledges
    await store.append(
        ev.TaskDispatched(eval_id="held-1", executor="x1", attempt=1, timeout_s=1.0,
                          trace_id=GIVEN_TRACE),
        ev.TaskCompleted(eval_id="held-1", executor="x1", attempt=1, result={},
                         duration_ms=1.0, trace_id=GIVEN_TRACE),
        ev.TaskReported(eval_id="held-1", outcome="completed", http_status=200,
                        trace_id=GIVEN_TRACE),
    )  # fmt: skip
    projector = SpanProjector(store, "tracing", "live", export, claim_idle_ms=60_000)
    runner = asyncio.create_task(projector.run())
    try:
        await eventually(lambda: exported, timeout_s=10)
        [spans] = exported
        root = spans[0]
        assert root.name == "evaluation" and root.attributes["queue_worker.queue"] == "q"
        [dispatch] = [s for s in spans if s.name == "dispatch"]
        assert dispatch.attributes["queue_worker.why"] == "the only one"
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    # The stalled consumer's entries are claimed by a projector: acknowledged, not exported.
    claimer = SpanProjector(store, "tracing", "claimer", export, claim_idle_ms=1)
    runner = asyncio.create_task(claimer.run())
    try:
        await eventually(lambda: claimer.handled >= 2, timeout_s=10)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    assert len(exported) == 1
    assert [k async for k in redis.scan_iter(match=f"{{{prefix}}}:trace:*")] == []
    assert (await redis.xpending(store.keys.events, "tracing"))["pending"] == 0
    await redis.aclose()


async def test_a_task_written_by_two_replicas_has_one_whole_trace(
    redis_url: str, prefix: str
) -> None:
    """Replica w1 pulls and dispatches the task, w2 takes it over and finishes it; each
    runs a projector in the group. Whichever reads the end, the trace has every entry
    of both, and it is exported once."""
    redis = aioredis.Redis.from_url(redis_url)
    w1, w2 = EventStore(redis, Keys(prefix), "w1"), EventStore(redis, Keys(prefix), "w2")
    exported: list[list[Any]] = []

    async def export(spans: list[Any]) -> None:
        exported.append(spans)

    await redis.xgroup_create(w1.keys.events, "tracing", id="0", mkstream=True)
    projectors = [
        SpanProjector(w1, "tracing", "w1", export, batch=2, linger_ms=0),
        SpanProjector(w2, "tracing", "w2", export, batch=2, linger_ms=0),
    ]
    runners = [asyncio.create_task(p.run()) for p in projectors]
    try:
        task = ev.Task(eval_id="two-1", code="x", trace_id=GIVEN_TRACE)
        await w1.append(
            ev.TaskPulled(eval_id="two-1", pull_id="p", task=task, code_bytes=1, queue="q",
                          trace_id=GIVEN_TRACE),
            ev.ExecutorSelected(eval_id="two-1", executor="x1", strategy="s", attempt=1,
                                candidates=[], why="first", trace_id=GIVEN_TRACE),
            ev.TaskDispatched(eval_id="two-1", executor="x1", attempt=1, timeout_s=1.0,
                              trace_id=GIVEN_TRACE),
        )  # fmt: skip
        await eventually(lambda: sum(p.handled for p in projectors) >= 3, timeout_s=10)
        await w2.append(
            ev.TaskRecovered(eval_id="two-1", action="redispatch", stage="dispatched",
                             previous_attempt=1, owner="w1", trace_id=GIVEN_TRACE),
            ev.ExecutorSelected(eval_id="two-1", executor="x2", strategy="s", attempt=2,
                                candidates=[], why="second", trace_id=GIVEN_TRACE),
            ev.TaskDispatched(eval_id="two-1", executor="x2", attempt=2, timeout_s=1.0,
                              trace_id=GIVEN_TRACE),
            ev.TaskCompleted(eval_id="two-1", executor="x2", attempt=2, result={},
                             duration_ms=1.0, trace_id=GIVEN_TRACE),
            ev.TaskReported(eval_id="two-1", outcome="completed", http_status=200,
                            trace_id=GIVEN_TRACE),
        )  # fmt: skip
        await eventually(lambda: exported, timeout_s=10)
        await eventually(lambda: sum(p.handled for p in projectors) >= 8, timeout_s=10)
        await asyncio.sleep(0.3)
    finally:
        for runner in runners:
            runner.cancel()
        await asyncio.gather(*runners, return_exceptions=True)
    [spans] = exported
    names = Counter(s.name for s in spans)
    assert (names["evaluation"], names["dispatch"], names["recovery"], names["report"]) == (
        1, 2, 1, 1,
    ), names  # fmt: skip
    root = spans[0]
    assert root.attributes["queue_worker.worker_id"] == "w1"  # w1 pulled it
    assert root.attributes["queue_worker.outcome"] == "completed"
    dispatches = sorted((s for s in spans if s.name == "dispatch"), key=lambda s: s.start_ns)
    assert [(d.attributes["queue_worker.worker_id"], d.attributes["queue_worker.why"])
            for d in dispatches] == [("w1", "first"), ("w2", "second")]  # fmt: skip
    assert dispatches[0].attributes["queue_worker.outcome"] == "interrupted"
    [recovery] = [s for s in spans if s.name == "recovery"]
    assert recovery.attributes["queue_worker.previous_worker_id"] == "w1"
    assert await redis.get(w1.keys.traced("two-1")) is not None
    assert [k async for k in redis.scan_iter(match=f"{{{prefix}}}:trace:*")] == []
    assert (await redis.xpending(w1.keys.events, "tracing"))["pending"] == 0
    await redis.aclose()


async def test_a_task_handed_out_again_gets_a_second_trace_of_its_own(
    redis_url: str, prefix: str
) -> None:
    """The queue took the task back (``lease_lost``): that ends its first trace. Handed
    out again, it ends a second trace, of the entries after the first one only."""
    redis = aioredis.Redis.from_url(redis_url)
    store = EventStore(redis, Keys(prefix), "w")
    exported: list[list[Any]] = []

    async def export(spans: list[Any]) -> None:
        exported.append(spans)

    await redis.xgroup_create(store.keys.events, "tracing", id="0", mkstream=True)

    def handout(n: int) -> list[ev.Event]:
        task = ev.Task(eval_id="again-1", code="x", trace_id=GIVEN_TRACE)
        return [
            ev.TaskPulled(eval_id="again-1", pull_id=f"p{n}", task=task, code_bytes=1,
                          queue=f"q{n}", trace_id=GIVEN_TRACE),
            ev.TaskDispatched(eval_id="again-1", executor="x", attempt=1, timeout_s=1.0,
                              trace_id=GIVEN_TRACE),
        ]  # fmt: skip

    await store.append(
        *handout(1),
        ev.TaskRecovered(eval_id="again-1", action="lease_lost", stage="dispatched",
                         previous_attempt=1, trace_id=GIVEN_TRACE),
        *handout(2),
        ev.TaskCompleted(eval_id="again-1", executor="x", attempt=1, result={},
                         duration_ms=1.0, trace_id=GIVEN_TRACE),
        ev.TaskReported(eval_id="again-1", outcome="completed", http_status=200,
                        trace_id=GIVEN_TRACE),
    )  # fmt: skip

    def roots() -> list[Any]:
        return [s for spans in exported for s in spans if s.name == "evaluation"]

    # One batch holds both endings, or the second comes after the first's mark.
    for batch in (100, 1):
        await redis.delete(store.keys.traced("again-1"))
        await redis.xgroup_setid(store.keys.events, "tracing", "0")
        exported.clear()
        projector = SpanProjector(store, "tracing", f"c{batch}", export, batch=batch)
        runner = asyncio.create_task(projector.run())
        try:
            await eventually(lambda: len(roots()) >= 2, timeout_s=10)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        assert len(exported) == (1 if batch > 1 else 2)
        first, second = roots()
        assert first.span_id != second.span_id  # one trace id, two roots
        assert first.attributes["queue_worker.queue"] == "q1"
        assert second.attributes["queue_worker.queue"] == "q2"
        assert [sum(s.name == "dispatch" for s in spans) for spans in exported] == (
            [2] if batch > 1 else [1, 1]
        )
        assert "queue_worker.outcome" not in first.attributes
        assert second.attributes["queue_worker.outcome"] == "completed"
    await redis.aclose()


def _skipped_a_repeat(projector: SpanProjector) -> bool:
    return projector.repeats_skipped >= 1


async def test_an_outcome_reported_twice_ends_one_trace(redis_url: str, prefix: str) -> None:
    """Two replicas' reporters both reported the outcome (a re-delivery; the queue answered
    "already" the second time): two ``task.reported``, one handout, one trace."""
    redis = aioredis.Redis.from_url(redis_url)
    store = EventStore(redis, Keys(prefix), "w")
    exported: list[list[Any]] = []

    async def export(spans: list[Any]) -> None:
        exported.append(spans)

    await redis.xgroup_create(store.keys.events, "tracing", id="0", mkstream=True)
    task = ev.Task(eval_id="twice-1", code="x", trace_id=GIVEN_TRACE)
    await store.append(
        ev.TaskPulled(eval_id="twice-1", pull_id="p", task=task, code_bytes=1,
                      trace_id=GIVEN_TRACE),
        ev.TaskDispatched(eval_id="twice-1", executor="x", attempt=1, timeout_s=1.0,
                          trace_id=GIVEN_TRACE),
        ev.TaskCompleted(eval_id="twice-1", executor="x", attempt=1, result={},
                         duration_ms=1.0, trace_id=GIVEN_TRACE),
        ev.TaskReported(eval_id="twice-1", outcome="completed", http_status=200,
                        trace_id=GIVEN_TRACE),
        ev.TaskReported(eval_id="twice-1", outcome="completed", http_status=200,
                        already=True, trace_id=GIVEN_TRACE),
    )  # fmt: skip
    # Both endings in one batch, or the second after the first's mark.
    for batch in (100, 1):
        await redis.delete(store.keys.traced("twice-1"))
        await redis.xgroup_setid(store.keys.events, "tracing", "0")
        exported.clear()
        projector = SpanProjector(store, "tracing", f"c{batch}", export, batch=batch)
        runner = asyncio.create_task(projector.run())
        try:
            await eventually(partial(_skipped_a_repeat, projector), timeout_s=10)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        spans = [s for one in exported for s in one]
        assert [s.name for s in spans].count("evaluation") == 1, spans
        assert {s.name for s in spans} >= {"evaluation", "dispatch", "report"}
    await redis.aclose()


async def test_the_entries_read_per_trace_are_capped_the_first_one_stays(
    redis_url: str, prefix: str
) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    store = EventStore(redis, Keys(prefix), "w")
    exported: list[list[Any]] = []

    async def export(spans: list[Any]) -> None:
        exported.append(spans)

    await redis.xgroup_create(store.keys.events, "tracing", id="0", mkstream=True)
    projector = SpanProjector(store, "tracing", "c", export, steps_max=4, batch=1)
    runner = asyncio.create_task(projector.run())
    try:
        task = ev.Task(eval_id="long-1", code="x", trace_id=GIVEN_TRACE)
        pulled = ev.TaskPulled(
            eval_id="long-1", pull_id="p", task=task, code_bytes=1, queue="q", trace_id=GIVEN_TRACE
        )
        await store.append(pulled)
        for attempt in range(1, 7):
            await store.append(
                ev.TaskDispatched(eval_id="long-1", executor="x", attempt=attempt,
                                  timeout_s=1.0, trace_id=GIVEN_TRACE),
                ev.TaskRetryScheduled(eval_id="long-1", executor="x", attempt=attempt + 1,
                                      delay_ms=0.0, reason="r", error="e", trace_id=GIVEN_TRACE),
            )  # fmt: skip
        await eventually(lambda: projector.handled >= 13, timeout_s=10)
        # Entries that do not end a task leave nothing in Redis: no copy of its steps.
        assert [k async for k in redis.scan_iter(match=f"{{{prefix}}}:trace*")] == []
        assert await redis.zcard(store.keys.task("long-1")) == 13  # the index has them
        assert exported == []
        await store.append(ev.TaskFailed(eval_id="long-1", attempt=7, reason="r", error="e",
                                         trace_id=GIVEN_TRACE),
                           ev.TaskReported(eval_id="long-1", outcome="failed", http_status=200,
                                           trace_id=GIVEN_TRACE))  # fmt: skip
        await eventually(lambda: exported, timeout_s=10)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await redis.aclose()
    [spans] = exported
    assert spans[0].attributes["queue_worker.queue"] == "q"  # task.pulled was read
    # The first entry and the latest 3 of 15: the last retry, the failure, the report.
    names = Counter(s.name for s in spans)
    assert (names["dispatch"], names["retry backoff"], names["report"]) == (0, 1, 1), names
    [backoff] = [s for s in spans if s.name == "retry backoff"]
    assert backoff.attributes["queue_worker.attempt"] == 7
    assert spans[0].attributes["queue_worker.outcome"] == "failed"


def test_the_otlp_settings_are_read_and_bad_ones_named() -> None:
    from queue_worker.errors import ConfigError

    settings = Settings.from_env(
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://otel.example:4318/v1/traces",
            "OTEL_EXPORTER_OTLP_HEADERS": "api-key=s%3Dcret, x-tenant = blue",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "2500",
            "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
            "OTEL_SERVICE_NAME": "evals",
        }
    )
    assert settings.traces_endpoint == "https://otel.example:4318/v1/traces"
    assert settings.otel_exporter_otlp_headers == (("api-key", "s=cret"), ("x-tenant", "blue"))
    assert (settings.otel_exporter_otlp_timeout, settings.otel_exporter_otlp_compression) == (
        2500,
        "gzip",
    )
    assert "s=cret" not in repr(settings)  # the headers hold credentials
    for name, value in (
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "no-equals-sign"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "bad name=x"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "x=a%0D%0AInjected: yes"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "0"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd"),
        ("OTEL_SDK_DISABLED", "maybe"),
    ):
        with pytest.raises(ConfigError) as raised:
            Settings.from_env({name: value})
        assert name in str(raised.value)
        assert "Injected" not in str(raised.value)
