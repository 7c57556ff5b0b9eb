"""The live dashboard and the stream as Server-Sent Events, against a live worker."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from tests.browser import WINDOW, chromium, live_page, looks_drawn, read_png
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


async def test_sse_rejects_a_bad_query(stack_factory) -> None:
    stack: Stack = await stack_factory()
    assert stack.worker is not None
    for bad in ("-1", "many", "5000"):
        async with stack.http.get(f"{stack.worker.url}/events/stream?last={bad}") as resp:
            assert resp.status == 400 and resp.content_type == "application/json"


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
