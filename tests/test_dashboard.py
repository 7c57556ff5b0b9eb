"""The live dashboard and the stream as Server-Sent Events, against a live worker."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from queue_worker.devstack.serve import Server
from queue_worker.http.app import create_app
from tests.browser import WINDOW, Step, chromium, live_page, looks_drawn, read_png
from tests.harness import Stack


async def read_events(
    resp: aiohttp.ClientResponse, n: int, timeout_s: float = 20.0
) -> list[tuple[str, dict[str, Any]]]:
    """The next ``n`` SSE messages as (id, data)."""
    out: list[tuple[str, dict[str, Any]]] = []
    entry_id = ""
    async with asyncio.timeout(timeout_s):
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("id: "):
                entry_id = line[4:]
            elif line.startswith("data: "):
                out.append((entry_id, msgspec.json.decode(line[6:])))
                if len(out) == n:
                    return out
    return out


async def test_sse_sends_the_backlog_then_live_entries_and_resumes(stack_factory) -> None:
    stack: Stack = await stack_factory()
    await stack.enqueue("first")
    await stack.wait_event("task.reported", eval_id="first")
    assert stack.worker is not None
    url = f"{stack.worker.url}/events/stream"
    async with stack.http.get(url, params={"last": "3"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        backlog = await read_events(resp, 3)
        entries = await stack.entries()
        assert [i for i, _ in backlog] == [e.id for e in entries[-3:]]
        await stack.enqueue("second")
        live = await read_events(resp, 5)
        assert [d["event"]["type"] for _, d in live][:1] == ["pull.started"] or any(
            d["event"].get("eval_id") == "second" for _, d in live
        )
        assert all(d["id"] == i for i, d in live)
        resume_from = live[0][0]
    # A reconnecting client resumes right after the last id it saw.
    async with stack.http.get(url, headers={"Last-Event-ID": resume_from}) as resp:
        ((next_id, _),) = await read_events(resp, 1)
        ids = [e.id for e in await stack.entries()]
        assert ids.index(next_id) == ids.index(resume_from) + 1


async def test_sse_rejects_a_bad_query_or_last_event_id_before_it_starts(stack_factory) -> None:
    stack: Stack = await stack_factory()
    assert stack.worker is not None
    url = f"{stack.worker.url}/events/stream"
    bad_queries = [{"last": v} for v in ("-1", "many", "5000", "", "1e3", "\u00b2", "\u0663")]
    bad_ids = ["99999999999999999999999-0", "18446744073709551616-0", "0-18446744073709551616",
               "abc", "1-2-3", "1", "1-0x", "-1-0"]  # fmt: skip
    cases: list[tuple[dict[str, str], dict[str, str], str]]
    cases = [(query, {}, "last") for query in bad_queries]
    cases += [({}, {"Last-Event-ID": bad}, "Last-Event-ID") for bad in bad_ids]
    for query, headers, named in cases:
        async with stack.http.get(url, params=query, headers=headers) as resp:
            assert (resp.status, resp.content_type) == (400, "application/json"), (query, headers)
            body = msgspec.json.decode(await resp.read())
            assert body["status"] == 400 and body["detail"].startswith(f"{named} must be")
    # The largest id Redis takes is a valid place to resume from: nothing comes after it,
    # and the stream stays open (a closed one would answer the read below with b"").
    top = f"{(1 << 64) - 1}-{(1 << 64) - 1}"
    async with stack.http.get(url, headers={"Last-Event-ID": top}) as resp:
        assert resp.status == 200
        assert await asyncio.wait_for(resp.content.readline(), 10) == b"retry: 2000\n"
        assert await asyncio.wait_for(resp.content.readline(), 10) == b"\n"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(resp.content.readline(), 1.0)


async def test_root_leads_to_the_dashboard(stack_factory) -> None:
    stack: Stack = await stack_factory()
    assert stack.worker is not None
    async with stack.http.get(stack.worker.url + "/", allow_redirects=False) as resp:
        assert resp.status == 302 and resp.headers["Location"] == "/dashboard"
    async with stack.http.get(stack.worker.url + "/dashboard") as resp:
        page = await resp.text()
        assert resp.content_type == "text/html" and resp.charset == "utf-8"
    assert "http://" not in page and "https://" not in page  # nothing from a CDN


async def test_dashboard_renders_executors_and_live_events(stack_factory, tmp_path: Path) -> None:
    chromium()
    stack: Stack = await stack_factory(latency_s=0.05)
    assert stack.worker is not None
    await stack.enqueue_many(10, prefix="before")
    await stack.wait_terminal(10)

    async def keep_tasks_flowing() -> None:
        for i in range(200):
            await stack.enqueue(f"live-{i:03d}")
            await asyncio.sleep(0.05)

    flow = asyncio.create_task(keep_tasks_flowing())
    try:
        url = stack.worker.url + "/dashboard"
        dom, png = await live_page(tmp_path / "profile", url, wait_s=4.0)
        (tmp_path / "dashboard.png").write_bytes(png)
    finally:
        flow.cancel()
        await asyncio.gather(flow, return_exceptions=True)
    for executor in stack.executors:
        assert executor.url in dom  # the executors board, from /status
    assert "test-worker" in dom and "healthy" in dom
    assert re.search(r"<b>\d+</b><span>waiting for a slot</span>", dom)  # counters, /status
    assert dom.count('class="entry"') >= 20  # the event tail, pushed over SSE
    assert "live-" in dom  # events of tasks enqueued after the page opened
    image = read_png(png)
    assert (image.width, image.height) == WINDOW
    assert looks_drawn(image), f"the screenshot {tmp_path / 'dashboard.png'} looks blank"


async def test_dashboard_signs_in_and_streams_with_a_ticket(stack_factory, tmp_path: Path) -> None:
    """With a token configured the page asks for one, keeps it in sessionStorage, sends it as
    a bearer token, and opens the event stream with a single-use ticket: never the token."""
    chromium()
    token = "dashboard-token-0123456789abcdef"
    stack: Stack = await stack_factory(latency_s=0.05, api_token=(("ops", token),))
    assert stack.worker is not None

    async def keep_tasks_flowing() -> None:
        for i in range(200):
            await stack.enqueue(f"live-{i:03d}")
            await asyncio.sleep(0.05)

    async def restart_worker() -> None:  # the page's spent ticket cannot reopen the stream
        assert stack.worker is not None
        port = stack.worker.port
        await stack.worker.stop()
        stack.worker = await Server(create_app(stack.settings), port=port).start()

    login, form = "document.getElementById('login')", "document.getElementById('login-form')"
    steps: list[tuple[float, Step]] = [
        # Before signing in: the form, with the server's hint, and no data.
        (1.5, f"document.body.dataset.before = String(!{login}.hidden) + '|' + "
              "document.getElementById('login-hint').textContent; 0"),
        (0.0, f"document.getElementById('token-input').value = '{token}'; "
              f"{form}.requestSubmit(); 0"),
        (4.0, "document.body.dataset.stored = String(sessionStorage.getItem("
              f"'queue-worker-token') === '{token}'); "
              "document.body.dataset.stream = source.url; "
              f"document.body.dataset.after = String({login}.hidden); 0"),
        (0.0, restart_worker),
        (5.0, "document.body.dataset.again = source === null ? '' : source.url; "
              "document.body.dataset.state = source === null ? '' : String(source.readyState); 0"),
    ]  # fmt: skip
    flow = asyncio.create_task(keep_tasks_flowing())
    try:
        url = stack.worker.url + "/dashboard"
        dom, png = await live_page(tmp_path / "profile", url, wait_s=0.5, steps=steps)
        (tmp_path / "dashboard.png").write_bytes(png)
    finally:
        flow.cancel()
        await asyncio.gather(flow, return_exceptions=True)
    before = re.search(r'data-before="([^"]*)"', dom)
    assert before is not None and before.group(1).startswith("true|"), dom[:2000]
    assert 'data-stored="true"' in dom and 'data-after="true"' in dom
    stream = re.search(r'data-stream="([^"]*)"', dom)
    assert stream is not None and "/events/stream?last=100&amp;ticket=" in stream.group(1)
    assert token not in dom  # not in the stream's URL, nor anywhere on the page
    # After the worker restarted, the page came back with a new ticket, and stays live.
    again = re.search(r'data-again="([^"]*)"', dom)
    assert again is not None and "ticket=" in again.group(1), dom[:2000]
    assert again.group(1) != stream.group(1) and 'data-state="1"' in dom  # EventSource.OPEN
    for executor in stack.executors:
        assert executor.url in dom  # /status, fetched with the bearer token
    assert dom.count('class="entry"') >= 20 and "live-" in dom  # the live feed
    assert looks_drawn(read_png(png))
