"""What the operators' dashboard reads beside /status: the queue's backlog (and its gauge in
/metrics) and the throughput history, against a live worker, devstack queue and executors."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from queue_worker.devstack.serve import Server
from queue_worker.http.docs import build_spec
from queue_worker.streams import events as ev
from tests.browser import (
    Click,
    Shot,
    Step,
    Type,
    WaitFor,
    chromium,
    live_page,
    looks_drawn,
    read_png,
)
from tests.harness import Stack, eventually


async def get_json(stack: Stack, path: str) -> Any:
    assert stack.worker is not None
    async with stack.http.get(stack.worker.url + path) as resp:
        assert resp.status == 200, (path, resp.status, await resp.text())
        return msgspec.json.decode(await resp.read())


async def test_backlog_gauge_and_throughput_history(stack_factory) -> None:
    stack: Stack = await stack_factory(start_worker=False)
    # Paused before the worker starts: what is enqueued stays in the queue, as a backlog.
    await stack.store.append(ev.ControlPaused(scope=ev.FLEET, by="ops", reason="backlog test"))
    ids = await stack.enqueue_many(7, prefix="backlog")
    await stack.start_worker()
    backlog = await get_json(stack, "/queue/backlog")
    assert backlog["queued"] == 7, backlog
    [queue] = backlog["queues"]
    assert (queue["url"], queue["reachable"], queue["queued"], queue["running"]) == (
        stack.queue.url,
        True,
        7,
        0,
    )
    assert stack.worker is not None
    async with stack.http.get(stack.worker.url + "/metrics") as resp:
        gauge = f'\nqueue_worker_queue_backlog{{queue="{stack.queue.url}"}} 7.0\n'
        assert gauge in await resp.text()

    await stack.store.append(ev.ControlResumed(scope=ev.FLEET, by="ops", reason="go"))
    await stack.wait_terminal(7)

    async def all_counted() -> bool:
        history = await get_json(stack, "/throughput")
        done: int = sum(s["completed"] for s in history["per_second"])
        return done == len(ids)

    await eventually(all_counted)
    history = await get_json(stack, "/throughput")
    assert history["window_s"] == 300
    seconds = [s["second"] for s in history["per_second"]]
    assert seconds == sorted(seconds) and all(s["failed"] == 0 for s in history["per_second"])
    by_executor = {d["executor"]: d for d in history["durations"]}
    assert set(by_executor) <= {x.url for x in stack.executors} and by_executor
    assert sum(d["samples"] for d in by_executor.values()) == len(ids)
    assert all(0 < d["p50_ms"] <= d["p95_ms"] for d in by_executor.values())


HOSTILE = {
    "/a/stats": lambda: web.Response(body=b"[" * 60_000, content_type="application/json"),
    "/b/stats": lambda: web.Response(body=b"x" * (1 << 20), content_type="application/json"),
    "/c/stats": lambda: web.Response(body=b'{"queued": true, "running": "9"}'),
    "/d/stats": lambda: web.Response(status=500, text="no"),
    "/e/stats": lambda: web.Response(body=b'["queued", 3]'),
}


async def test_backlog_of_hostile_queues_is_shown_unknown(stack_factory) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        make = HOSTILE.get(request.path)
        return make() if make else web.json_response(None)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    async with Server(app) as hostile:
        stack: Stack = await stack_factory(start_worker=False)
        await stack.store.append(ev.ControlPaused(scope=ev.FLEET, by="ops", reason="hostile"))
        await stack.enqueue_many(3, prefix="waiting")
        names = ("a", "b", "c", "d", "e")
        urls = (stack.queue.url, *(f"{hostile.url}/{name}" for name in names))
        await stack.start_worker(queue_service_urls=urls)
        backlog = await get_json(stack, "/queue/backlog")
        assert backlog["queued"] == 3, backlog  # the one queue that could tell
        by_url = {q["url"]: q for q in backlog["queues"]}
        assert list(by_url) == list(urls)
        for name, url in zip(names, urls[1:], strict=True):
            queue = by_url[url]
            assert queue["queued"] is None and queue["error"], (name, queue)
            assert queue["reachable"] is (name == "c"), (name, queue)
        assert stack.worker is not None
        async with stack.http.get(stack.worker.url + "/metrics") as resp:
            gauges = [
                line for line in (await resp.text()).splitlines()
                if line.startswith("queue_worker_queue_backlog{")
            ]  # fmt: skip
        assert gauges == [f'queue_worker_queue_backlog{{queue="{stack.queue.url}"}} 3.0']


def screenshots(tmp_path: Path) -> Path:
    """Where the page tests save their screenshots: DASHBOARD_SCREENSHOTS, else tmp_path."""
    where = Path(os.environ.get("DASHBOARD_SCREENSHOTS") or tmp_path)
    where.mkdir(parents=True, exist_ok=True)
    return where


def rows_with(table: str, *texts: str) -> str:
    """A page expression: whether a row of ``table`` holds every one of ``texts``."""
    checks = " && ".join(f"r.textContent.includes({t!r})" for t in texts)
    return f"[...document.querySelectorAll('#{table} tr')].some(r => {checks})"


async def test_operators_search_follow_links_and_pause_with_real_clicks(
    stack_factory, tmp_path: Path
) -> None:
    """Signed in with an admin token: a failed task's reason in the failures list, a search
    that opens a task's timeline, a link of the live tail that opens its task, and the pause
    button, which asks for a reason and then appends control.paused with it."""
    chromium()
    admin = "dashboard-admin-token-0123456789abcdef"
    stack: Stack = await stack_factory(latency_s=0.05, admin_token=(("ops-admin", admin),))
    assert stack.worker is not None
    [searched_id, *_] = await stack.enqueue_many(5, prefix="ok")
    await stack.enqueue("bad-1", code="SIMULATE_FAIL")
    await stack.wait_event("task.failed", eval_id="bad-1")
    await stack.wait_terminal(6)
    out = screenshots(tmp_path)

    async def keep_tasks_flowing() -> None:
        for i in range(400):
            await stack.enqueue(f"live-{i:03d}")
            await asyncio.sleep(0.05)

    home = "!document.querySelector('section.home').hidden"
    task_page = "!document.getElementById('task-view').hidden"
    entries = "[...document.querySelectorAll('#events .entry')]"
    clear = "(id => { const el = document.getElementById(id); el.value = ''; "
    clear += "el.dispatchEvent(new Event('input')); })"
    steps: list[tuple[float, Step]] = [
        (0.5, Type("#token-input", admin)),
        (0.0, Click("#login-form button")),
        # The failures list shows the failed task and its reason (from its history).
        (0.0, WaitFor(rows_with("failures", "bad-1", "execution_failed"))),
        (0.0, WaitFor("document.querySelectorAll('#events a.eval').length >= 5")),
        (0.0, WaitFor("document.getElementById('backlog').textContent.includes('queued')")),
        (0.0, Shot(out / "dashboard-home.png")),
        # The failed task's page, from its link in the failures list: retry it, with a reason.
        (0.0, Click("#failures a.eval")),
        (0.0, WaitFor(f"{task_page} && " + rows_with("task-timeline", "task.failed"))),
        (0.0, Type("#task-reason", "flaky executor")),
        (0.0, Click("#task-retry")),
        (0.0, WaitFor("document.getElementById('task-action-result').textContent"
                      ".includes('retry recorded by ops-admin: runs again as bad-1-retry-')")),
        (0.0, Shot(out / "dashboard-retried.png")),
        (0.0, Click("#task-view h2 a")),
        (0.0, WaitFor(home)),
        # Search: the task's page, with its timeline and result.
        (0.0, Type("#search-input", searched_id)),
        (0.0, Click("#search button")),
        (0.0, WaitFor(f"{task_page} && " + rows_with("task-timeline", "task.completed"))),
        (0.0, "document.body.dataset.searched = location.hash + '|' + "
              "document.getElementById('task-id').textContent + '|' + "
              "[...document.querySelectorAll('#task-timeline tr')].map(r => "
              "r.children[2].textContent + r.children[1].textContent).join(','); "
              "document.body.dataset.result = "
              "document.getElementById('task-outcome').textContent; 0"),
        (0.0, Shot(out / "dashboard-task.png")),
        (0.0, Click("#task-view h2 a")),
        (0.0, WaitFor(home)),
        # The tail, paused so that it holds still, then one of its eval_ids clicked.
        (0.0, Click("#tail-pause")),
        (0.0, "document.body.dataset.linked = "
              "document.querySelector('#events a.eval').textContent; 0"),
        (0.0, Click("#events a.eval")),
        (0.0, WaitFor(f"{task_page} && document.getElementById('task-id').textContent === "
                      "document.body.dataset.linked && "
                      "document.querySelectorAll('#task-timeline tr').length >= 2")),
        (0.0, Shot(out / "dashboard-tail-link.png")),
        (0.0, "document.body.dataset.offered = "
              "String(!document.getElementById('task-cancel').hidden) + '|' + "
              "String(!document.getElementById('task-retry').hidden); 0"),
        (0.0, Click("#task-view h2 a")),
        (0.0, WaitFor(home)),
        # Filters of the (still paused) tail: by type, then by eval_id.
        (0.0, Type("#f-type", "task.completed")),
        (0.0, WaitFor(f"{entries}.length > 0 && "
                      f"{entries}.every(e => e.textContent.includes('task.completed'))")),
        (0.0, f"{clear}('f-type'); 0"),
        (0.0, "document.getElementById('f-eval').value = document.body.dataset.linked; "
              "document.getElementById('f-eval').dispatchEvent(new Event('input')); 0"),
        (0.0, WaitFor(f"{entries}.length >= 1 && {entries}.every(e => "
                      "e.textContent.includes(document.body.dataset.linked))")),
        (0.0, f"{clear}('f-eval'); 0"),
        (0.0, Click("#tail-pause")),
        # Pause: without a reason it asks for one; with one, it is recorded.
        (0.0, Click("#ctl-pause")),
        (0.0, "document.body.dataset.asked = "
              "document.getElementById('ctl-result').textContent; 0"),
        (0.0, Type("#ctl-reason", "maintenance window")),
        (0.0, Click("#ctl-pause")),
        (0.0, WaitFor("document.getElementById('ctl-result').textContent"
                      ".includes('pause recorded')")),
        (0.0, WaitFor("document.getElementById('pause-state').textContent"
                      ".includes('maintenance window')")),
        (0.0, Shot(out / "dashboard-paused.png")),
        # Drain the executor chosen in the list (the first), with a reason.
        (0.0, Type("#ctl-reason", "kernel upgrade")),
        (0.0, Click("#ctl-drain")),
        (0.0, WaitFor("document.getElementById('ctl-result').textContent"
                      ".includes('drain recorded')")),
        (0.0, WaitFor(rows_with("executors", "(drained)"))),
    ]  # fmt: skip
    flow = asyncio.create_task(keep_tasks_flowing())
    try:
        url = stack.worker.url + "/dashboard"
        dom, png = await live_page(tmp_path / "profile", url, wait_s=0.2, steps=steps)
    finally:
        flow.cancel()
        await asyncio.gather(flow, return_exceptions=True)
    searched = re.search(r'data-searched="([^"]*)"', dom)
    assert searched is not None, dom[:2000]
    route, shown_id, timeline = searched.group(1).split("|")
    assert (route, shown_id) == (f"#/task/{searched_id}", searched_id)
    types = [step.split("+")[0] for step in timeline.split(",")]
    for expected in ("task.pulled", "executor.selected", "task.dispatched", "task.completed"):
        assert expected in types, timeline
    assert re.search(r"task\.completed\+\d+ ms", timeline), timeline  # the time between steps
    result = re.search(r'data-result="([^"]*)"', dom)
    assert result is not None and result.group(1).startswith("result"), dom[:2000]
    assert "Enter a reason" in (re.search(r'data-asked="([^"]*)"', dom) or [""])[0]
    linked = re.search(r'data-linked="([^"]*)"', dom)
    assert linked is not None and linked.group(1)
    assert admin not in dom
    # Cancel and retry are offered exactly when the API declares them.
    paths = build_spec()["paths"]
    declared = [f"/tasks/{{eval_id}}/{action}" in paths for action in ("cancel", "retry")]
    offered = re.search(r'data-offered="([^"]*)"', dom)
    assert offered is not None and offered.group(1) == "|".join(str(d).lower() for d in declared)
    paused = [e for e in await stack.entries() if e.event.type == "control.paused"]
    assert len(paused) == 1, paused  # the click without a reason appended nothing
    event = paused[0].event
    assert isinstance(event, ev.ControlPaused)
    assert (event.scope, event.by, event.reason) == (ev.FLEET, "ops-admin", "maintenance window")
    [drained] = [e.event for e in await stack.entries() if e.event.type == "executor.drained"]
    assert isinstance(drained, ev.ExecutorDrained)
    assert (drained.executor, drained.by, drained.reason) == (
        stack.executors[0].url,
        "ops-admin",
        "kernel upgrade",
    )
    [retried] = [e.event for e in await stack.entries() if e.event.type == "task.retry_requested"]
    assert isinstance(retried, ev.TaskRetryRequested)
    assert (retried.eval_id, retried.by, retried.reason) == ("bad-1", "ops-admin", "flaky executor")
    for name in ("home", "task", "tail-link", "paused", "retried"):
        assert looks_drawn(read_png((out / f"dashboard-{name}.png").read_bytes())), name
    assert looks_drawn(read_png(png))


async def test_a_read_token_sees_errors_redacted_and_cannot_act(
    stack_factory, tmp_path: Path
) -> None:
    chromium()
    read, admin = "dashboard-read-token-0123456789abcdef", "dashboard-admin-token-0123456789ab"
    stack: Stack = await stack_factory(
        api_token=(("viewer", read),), admin_token=(("ops-admin", admin),)
    )
    assert stack.worker is not None
    await stack.enqueue("bad-2", code="SIMULATE_FAIL")
    await stack.wait_event("task.failed", eval_id="bad-2")
    out = screenshots(tmp_path)
    flapping = stack.executors[2].url
    top = "document.querySelector('#events .entry').textContent"
    entries = "[...document.querySelectorAll('#events .entry')]"

    async def flips() -> int:
        return sum(
            1
            for e in await stack.entries()
            if isinstance(e.event, ev.ExecutorHealthChanged) and e.event.executor == flapping
        )

    async def flap() -> None:
        server, seen = stack.executors[2], await flips()
        for n in range(4):  # down, up, down, up
            await (server.start() if n % 2 else server.stop())

            async def flipped(wanted: int = seen + n + 1) -> bool:
                return await flips() >= wanted

            await eventually(flipped, timeout_s=20)

    steps: list[tuple[float, Step]] = [
        (0.5, Type("#token-input", read)),
        (0.0, Click("#login-form button")),
        (0.0, WaitFor(rows_with("failures", "bad-2", "execution_failed", "redacted"))),
        (0.0, Click("#failures a.eval")),
        (0.0, WaitFor("document.getElementById('task-outcome').textContent.includes('redacted')")),
        (0.0, "document.body.dataset.outcome = "
              "document.getElementById('task-outcome').textContent; 0"),
        (0.0, Shot(out / "dashboard-read-task.png")),
        (0.0, Click("#task-view h2 a")),
        (0.0, WaitFor("!document.getElementById('controls').hidden")),
        (0.0, Type("#ctl-reason", "not allowed")),
        (0.0, Click("#ctl-pause")),
        (0.0, WaitFor("document.getElementById('ctl-result').textContent"
                      ".includes('needs an admin token')")),
        # An executor that flaps: its consecutive health flips fold into one line.
        (0.0, flap),
        (0.0, Type("#f-type", "health_changed")),
        (0.0, WaitFor(f"{top}.includes({flapping!r}) && {top}.includes('flips)')")),
        (0.0, f"document.body.dataset.folded = {top}; 0"),
        (0.0, Click("#f-fold")),
        (0.0, f"document.body.dataset.unfolded = String({entries}.filter(e => "
              f"e.textContent.includes({flapping!r})).length); 0"),
        (0.0, Shot(out / "dashboard-read-flips.png")),
    ]  # fmt: skip
    dom, _ = await live_page(tmp_path / "profile", stack.worker.url + "/dashboard", 0.1, steps)
    outcome = re.search(r'data-outcome="([^"]*)"', dom)
    assert outcome is not None and outcome.group(1).startswith("error (execution_failed)")
    assert "simulated failure" not in dom  # the executor's error text, only to an admin
    assert not [e for e in await stack.entries() if e.event.type == "control.paused"]
    folded = re.search(r'data-folded="[^"]*\(\u00d7(\d+) flips\)"', dom)
    unfolded = re.search(r'data-unfolded="(\d+)"', dom)
    assert folded is not None and unfolded is not None, dom[:3000]
    assert int(folded.group(1)) >= 4 and int(unfolded.group(1)) >= 4
