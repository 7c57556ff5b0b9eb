"""Observability and operations: /metrics, the operator CLI, k8s manifests, the event contract."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from queue_worker.config import Settings
from queue_worker.devstack.serve import Server, free_port
from queue_worker.http import metrics
from queue_worker.http.app import create_app
from queue_worker.streams import events as ev
from queue_worker.streams import operate as ops
from queue_worker.streams.connection import open_redis
from queue_worker.streams.events import EVENT_TYPES, Entry
from queue_worker.streams.keys import Keys
from queue_worker.streams.store import EventStore
from queue_worker.streams.views import fold
from tests.harness import Stack, eventually

ROOT = Path(__file__).parents[1]

# --- /metrics ----------------------------------------------------------------------------------


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(stack: Stack) -> Samples:
    assert stack.worker is not None
    async with stack.http.get(f"{stack.worker.url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        v
        for (n, ls), v in samples.items()
        if n == name and all((k, val) in ls for k, val in labels.items())
    )


async def test_metrics_follow_tasks_and_executor_health(stack_factory) -> None:
    stack: Stack = await stack_factory(start_worker=False)
    stack.worker = await Server(create_app(stack.settings)).start()
    await stack.enqueue_many(6)
    await stack.enqueue("doomed", code="SIMULATE_FAIL")
    await stack.wait_terminal(7)

    async def settled() -> Samples | None:
        s = await scrape(stack)
        done = (
            total(s, "queue_worker_tasks_total", outcome="completed") == 6
            and total(s, "queue_worker_pubsub_published_total") == 7
            and total(s, "queue_worker_projector_lag", projector="reporter") == 0
            and total(s, "queue_worker_events_appended_total", type="task.reported") == 7
            and total(s, "queue_worker_projector_pending", projector="publisher") == 0
        )
        return s if done else None

    s: Samples = await eventually(settled)
    assert total(s, "queue_worker_tasks_total", outcome="failed") == 1
    for name in ("outcome_ids_diverged", "outcome_copies_missing", "index_writes_refused"):
        assert (f"queue_worker_{name}_total", ()) in s, name  # exported
        assert total(s, f"queue_worker_{name}_total") == 0, name  # and nothing went missing
    urls = [x.url for x in stack.executors]
    assert sum(total(s, "queue_worker_tasks_total", executor=u) for u in urls) == 7
    assert total(s, "queue_worker_events_appended_total", type="task.pulled") == 7
    assert total(s, "queue_worker_task_duration_seconds_count") == 7
    assert total(s, "queue_worker_routing_overhead_seconds_count") == 7
    assert total(s, "queue_worker_routing_failures_total") == 0  # SIMULATE_FAIL is a verdict
    assert total(s, "queue_worker_queue_polls_total", result="ok") >= 7
    assert total(s, "queue_worker_queue_polls_total", result="error") == 0
    assert total(s, "queue_worker_stream_length") >= len(await stack.entries()) - 1
    assert total(s, "queue_worker_projector_pending", projector="publisher") == 0
    assert total(s, "queue_worker_redis_up") == 1
    assert all(total(s, "queue_worker_executor_healthy", executor=u) == 1 for u in urls)
    assert total(s, "queue_worker_executor_in_flight") == 0
    assert total(s, "queue_worker_info", worker_id="test-worker") == 1

    async def healthy(i: int) -> float:
        return total(await scrape(stack), "queue_worker_executor_healthy", executor=urls[i])

    await stack.control(0, health="unhealthy")
    await eventually(lambda: _is(healthy(0), 0))
    await stack.control(0, health="healthy")
    await eventually(lambda: _is(healthy(0), 1))


async def _is(value: Any, expected: float) -> bool:
    return bool(await value == expected)


def _entry(n: int, event: ev.Event, worker: str = "w1") -> Entry:
    return msgspec.convert({"id": f"{n}-0", "worker_id": worker, "ts": n, "event": event}, Entry)


def test_metrics_projector_folds_routing_failures_and_overhead() -> None:
    registry = CollectorRegistry()
    projector = metrics.MetricsProjector(registry, worker_id="w1")
    task = ev.Task(eval_id="a", code="x")
    x = "http://x:8083"
    no_answer = ev.TaskFailed(
        eval_id="a", executor=x, attempt=1, reason="executor_no_answer", error="", duration_ms=40
    )
    retry = ev.TaskRetryScheduled(
        eval_id="a", executor=x, attempt=2, delay_ms=1, reason="executor_no_answer", error=""
    )
    entries = [
        _entry(1000, ev.TaskPulled(eval_id="a", pull_id="p", task=task, code_bytes=1)),
        _entry(1250, ev.TaskDispatched(eval_id="a", executor=x, attempt=1, timeout_s=1)),
        _entry(1260, retry),
        _entry(1300, no_answer),
        _entry(1400, ev.TaskFailed(eval_id="b", attempt=1, reason="no_healthy_executor", error="")),
        _entry(1500, ev.TaskRejected(pull_id="q", reason="invalid_json", excerpt="{")),
        _entry(1600, ev.TaskPulled(eval_id="c", pull_id="r", task=task, code_bytes=1), "w2"),
    ]
    for entry in entries:
        projector.observe(entry)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("queue_worker_routing_overhead_seconds_sum") == 0.25
    assert value("queue_worker_routing_failures_total", reason="executor_no_answer") == 2
    assert value("queue_worker_routing_failures_total", reason="no_healthy_executor") == 1
    assert value("queue_worker_tasks_total", outcome="failed", executor="none") == 1
    assert value("queue_worker_tasks_total", outcome="rejected", executor="none") == 1
    assert value("queue_worker_task_duration_seconds_count", outcome="failed", executor=x) == 1
    assert value("queue_worker_events_appended_total", type="task.pulled") == 1  # not w2's


# --- operator CLI ----------------------------------------------------------------------------

CLI = [sys.executable, "-m", "queue_worker"]


def stream_env(stack: Stack) -> dict[str, str]:
    return {**os.environ, "REDIS_URL": stack.redis_url, "STREAM_PREFIX": stack.prefix}


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=60, env=env or dict(os.environ)
    )


async def arun(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    result = await asyncio.to_thread(run, *args, env=stream_env(stack))
    assert result.returncode == 0, result.stderr
    return result


def test_ops_commands_have_help_and_fail_clearly_without_redis() -> None:
    down = {**os.environ, "REDIS_URL": f"redis://:s3cret@127.0.0.1:{free_port()}/0"}
    for command, option in (
        ("tail", "--eval-id"),
        ("replay", "--since"),
        ("stream-info", "--json"),
        ("list", "--state"),
    ):
        assert option in run(command, "--help").stdout
        result = run(command, *(("--state", "failed") if command == "list" else ()), env=down)
        assert result.returncode == 1, result
        assert "cannot reach Redis" in result.stderr and "REDIS_URL" in result.stderr
        assert "Traceback" not in result.stderr and "s3cret" not in result.stderr


async def test_tail_replay_and_stream_info_on_a_live_stream(stack_factory) -> None:
    stack: Stack = await stack_factory()
    live = await asyncio.create_subprocess_exec(
        *CLI, "tail", "--type", "task.completed", "--count", "3", "--json",
        env=stream_env(stack), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert live.stderr is not None
    assert b"following" in await asyncio.wait_for(live.stderr.readline(), 30)
    ids = await stack.enqueue_many(3)
    out, err = await asyncio.wait_for(live.communicate(), 30)
    assert live.returncode == 0, err
    tailed = [msgspec.json.decode(line) for line in out.splitlines()]
    assert sorted(e["event"]["eval_id"] for e in tailed) == ids
    assert {e["event"]["type"] for e in tailed} == {"task.completed"}

    for eval_id in ids:
        await stack.wait_event("task.reported", eval_id=eval_id)
    one = await arun(stack, "tail", "--from-start", "--eval-id", ids[1], "--count", "5")
    lines = one.stdout.splitlines()
    assert len(lines) == 5 and all(f"[{ids[1]}]" in line for line in lines)
    assert " task.pulled " in lines[0] and " task.reported " in lines[-1]
    dispatched = [e.event for e in await stack.entries() if isinstance(e.event, ev.TaskDispatched)]
    url = dispatched[0].executor  # one that ran a task (least_loaded may leave one idle)
    picked = await arun(stack, "tail", "--from-start", "--type", "task.*", "--executor", url,
                        "--count", "1", "--json")  # fmt: skip
    assert msgspec.json.decode(picked.stdout)["event"]["executor"] == url

    await stack.stop_worker()  # a quiet stream from here on
    entries = await stack.entries()
    # The last entries first, then it follows (nothing more comes: --count ends it).
    last = await arun(stack, "tail", "--last", "4", "--count", "4", "--json")
    assert [msgspec.json.decode(x)["id"] for x in last.stdout.splitlines()] == [
        e.id for e in entries[-4:]
    ]
    listed = await arun(stack, "list", "--state", "completed", "--json")
    assert sorted(msgspec.json.decode(x)["eval_id"] for x in listed.stdout.splitlines()) == ids
    bad = run("list", "--state", "lost", env=stream_env(stack))
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    view = msgspec.json.decode((await arun(stack, "replay")).stdout)
    assert view == msgspec.json.decode(msgspec.json.encode(fold(entries)))
    assert view["workers"]["test-worker"]["counters"]["completed"] == 3
    partial = msgspec.json.decode((await arun(stack, "replay", "--from", entries[-4].id)).stdout)
    assert partial["events"] == 4
    future = msgspec.json.decode((await arun(stack, "replay", "--since", "2999-01-01")).stdout)
    assert future["events"] == 0
    bad = await asyncio.to_thread(run, "replay", "--since", "yesterday", env=stream_env(stack))
    assert bad.returncode == 1 and "not an ISO time" in bad.stderr

    info = msgspec.json.decode((await arun(stack, "stream-info", "--json")).stdout)
    assert info["length"] == len(entries) == await stack.redis.xlen(stack.store.keys.events)
    assert (info["first"]["id"], info["last"]["id"]) == (entries[0].id, entries[-1].id)
    groups = {g["name"]: g for g in info["groups"]}
    assert set(groups) == set()  # the publisher and the reporter read the outcome stream
    outcomes = info["outcomes"]
    assert outcomes["key"] == stack.store.keys.outcomes
    assert outcomes["length"] == sum(e.event.type.encode() in ev.OUTCOME_TYPES for e in entries)
    assert {g["name"] for g in outcomes["groups"]} == {"publisher", "reporter"}
    text = (await arun(stack, "stream-info")).stdout
    assert f"{len(entries)} entries" in text and "publisher" in text
    assert f"stream {stack.store.keys.outcomes}: {outcomes['length']} entries" in text


EVIL = "evil\x1b[2J\x1b[H\n2026-01-01 forged"
ESCAPED = "evil\\x1b[2J\\x1b[H\\n2026-01-01 forged"
ERROR = "boom\x1b]0;owned\x07\r\x7f\x9b31m\u2028\u202efake"


def controls(text: str) -> set[str]:
    """The control characters in ``text`` other than the newlines that end lines."""
    return {
        c
        for c in text
        if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) < 0xA0 or c in "\u2028\u202e"
    }


async def test_audit_and_tail_escape_control_characters(redis_url: str, prefix: str) -> None:
    redis = await open_redis(redis_url)
    store = EventStore(redis, Keys(prefix), "worker\x1b[31m")
    task = ev.Task(eval_id=EVIL, code="x", language="py\x1b[8m")
    await store.append(ev.TaskPulled(eval_id=EVIL, pull_id="p", task=task, code_bytes=1))
    await store.append(
        ev.TaskFailed(eval_id=EVIL, executor="http://x:1", attempt=1, reason="r", error=ERROR)
    )
    await store.append(ev.TaskRejected(pull_id="q", eval_id=EVIL, reason="bad", excerpt=ERROR))
    await redis.aclose()
    env = {**os.environ, "REDIS_URL": redis_url, "STREAM_PREFIX": prefix}

    async def cli(*args: str) -> str:
        result = await asyncio.to_thread(run, *args, env=env)
        assert result.returncode == 0, result.stderr
        assert not controls(result.stderr)
        return result.stdout

    audit = await cli("audit", EVIL)
    tail = await cli("tail", "--from-start", "--count", "3")
    for text, lines in ((audit, 4), (tail, 3)):
        assert not controls(text), controls(text)
        assert len(text.splitlines()) == lines  # no forged line
        assert "\\x1b]0;owned\\x07\\r\\x7f\\x9b31m\\u2028\\u202efake" in text
        assert "worker\\x1b[31m" in text
    assert audit.splitlines()[0] == f"history of evaluation {ESCAPED} (3 events)"
    assert all(f"[{ESCAPED}]" in line for line in tail.splitlines())

    as_json = await cli("audit", EVIL, "--json")
    tailed = await cli("tail", "--from-start", "--count", "3", "--json")
    for text in (as_json, tailed):
        assert not controls(text)
    entries = msgspec.json.decode(as_json)
    assert [msgspec.json.decode(line) for line in tailed.splitlines()] == entries
    assert {e["event"]["eval_id"] for e in entries} == {EVIL}
    assert entries[1]["event"]["error"] == entries[2]["event"]["excerpt"] == ERROR
    assert entries[0]["worker_id"] == "worker\x1b[31m"


def test_tail_filters_and_replay_start() -> None:
    e = _entry(5, ev.TaskDispatched(eval_id="a", executor="http://executor-1:8083", attempt=1,
                                    timeout_s=1))  # fmt: skip
    assert ops.matches(e, ["task.*"], "executor-1", "a")
    assert not ops.matches(e, ["task.completed"], None, None)
    assert not ops.matches(e, [], "executor-2", None)
    assert ops.start_id(None, "1970-01-01T00:00:01") == "1000-0"
    assert ops.start_id("5-0", None) == "5-0" and ops.start_id(None, None) == "-"
    assert "executor=http://executor-1:8083" in ops.describe(e)


# --- Kubernetes manifests --------------------------------------------------------------------


def test_k8s_manifests_parse_and_probe_health() -> None:
    docs = [
        doc
        for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    (config,) = by_kind["ConfigMap"]
    Settings.from_env(config["data"])  # every value is a valid setting
    (deployment,) = by_kind["Deployment"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    # /health 503s on an executor outage; /health/live only when the process cannot go on.
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    services = {s["metadata"]["name"]: s["spec"] for s in by_kind["Service"]}
    assert services["executor"]["clusterIP"] == "None"
    assert services["queue-worker"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert services["queue-worker"]["ports"][0]["port"] == 8084


# --- event contract and example consumer -----------------------------------------------------


def test_events_doc_lists_every_type_and_field() -> None:
    text = (ROOT / "docs" / "events.md").read_text()
    for cls in EVENT_TYPES:
        assert f"### `{cls.__struct_config__.tag}`" in text
        for field in msgspec.structs.fields(cls):
            assert f"| `{field.name}` |" in text or field.name == "v", (cls, field.name)
    check = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "gen_events.py"), "--check"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr


async def test_example_consumer_receives_every_event_of_a_run(stack_factory) -> None:
    stack: Stack = await stack_factory()
    await stack.enqueue_many(4)
    await stack.enqueue("bad", code="SIMULATE_FAIL")
    await stack.wait_terminal(5)
    await stack.stop_worker()
    entries = await stack.entries()
    cmd = [sys.executable, str(ROOT / "examples" / "consumer.py"), "--group", "example",
           "--count", str(len(entries))]  # fmt: skip
    result = await asyncio.to_thread(
        subprocess.run, cmd, capture_output=True, text=True, timeout=60, env=stream_env(stack)
    )
    assert result.returncode == 0, result.stderr
    got = [msgspec.json.decode(line) for line in result.stdout.splitlines()]
    assert [g["id"] for g in got] == [e.id for e in entries]
    assert [g["data"]["type"] for g in got] == [e.event.type for e in entries]
    groups = {g["name"]: g for g in await stack.store.info_groups()}
    assert groups["example"]["pending"] == 0
