"""Headless Chromium for the page tests: loopback only, a fresh profile, PNG checks."""

from __future__ import annotations

import asyncio
import os
import struct
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_TIMEOUT_S = 90.0
# Only 127.0.0.1 resolves: a page that needed a CDN would fail to render.
LOOPBACK_ONLY = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"
WINDOW = (1200, 800)


def chromium() -> Path:
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"{CHROMIUM} not found: the docs pages are tested in headless Chromium; install "
            "Debian's package (apt-get install chromium), as .ci/run does"
        )
    return CHROMIUM


async def run_chromium(profile: Path, *args: str) -> bytes:
    """Headless Chromium on loopback only, with a fresh profile; its stdout.

    The page runs on virtual time until it is idle (see :func:`live_page` for pages that
    never are)."""
    proc = await asyncio.create_subprocess_exec(
        str(chromium()),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        LOOPBACK_ONLY,
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CHROMIUM_TIMEOUT_S)
    except TimeoutError:
        raise AssertionError(f"chromium {args} did not finish in {CHROMIUM_TIMEOUT_S}s") from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, f"chromium {args} exited {proc.returncode}: {err.decode()[-2000:]}"
    return out


@dataclass(frozen=True)
class Png:
    width: int
    height: int
    rows: list[bytes]  # filtered scanlines, each with its filter-type byte


def read_png(data: bytes) -> Png:
    """An 8-bit RGB or RGBA PNG's size and (still filtered) scanlines, with the stdlib only."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, header, idat = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    channels = {2: 3, 6: 4}.get(color)
    assert depth == 8 and channels is not None and interlace == 0, (depth, color, interlace)
    raw = zlib.decompress(idat)
    stride = 1 + width * channels
    assert len(raw) == stride * height
    return Png(width, height, [raw[i : i + stride] for i in range(0, len(raw), stride)])


def looks_drawn(png: Png) -> bool:
    """Not blank: a one-colour image has identical scanlines made of a handful of byte values
    (filtered or not); a rendered page has hundreds of distinct lines and all 256 values."""
    distinct_rows = len(set(png.rows))
    distinct_bytes = len(set(b"".join(png.rows)))
    return distinct_rows >= png.height // 8 and distinct_bytes >= 128


@dataclass(frozen=True)
class Click:
    """A real click (mouse pressed and released over the DevTools protocol) at the middle of
    the first element matching ``selector``, scrolled into view first (waiting up to 10 s
    for it to be shown)."""

    selector: str


@dataclass(frozen=True)
class Type:
    """Click the element matching ``selector`` (focusing it), then type ``text`` into it."""

    selector: str
    text: str


@dataclass(frozen=True)
class WaitFor:
    """Wait until the JavaScript expression ``condition`` is true in the page."""

    condition: str
    timeout_s: float = 20.0


@dataclass(frozen=True)
class Shot:
    """Save a screenshot of the page to ``path``."""

    path: Path


Step = str | Callable[[], Awaitable[object]] | Click | Type | WaitFor | Shot


async def live_page(
    profile: Path, url: str, wait_s: float, steps: Sequence[tuple[float, Step]] = ()
) -> tuple[str, bytes]:
    """Open ``url`` in headless Chromium, let it run ``wait_s`` in real time, then read its
    DOM and a screenshot over the DevTools protocol (for pages that never go idle).

    ``steps`` are ``(seconds, step)``: after waiting that long, a JavaScript expression is
    evaluated in the page (typing into a form, say) or a coroutine function is awaited
    (restarting the server, say), in order, before ``wait_s``.
    """
    import base64
    import itertools

    import aiohttp

    proc = await asyncio.create_subprocess_exec(
        str(chromium()), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", LOOPBACK_ONLY, f"--user-data-dir={profile}",
        "--remote-debugging-port=0", "--window-size={},{}".format(*WINDOW), url,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(int(CHROMIUM_TIMEOUT_S / 0.05)):  # Chromium writes its port here
            if port_file.exists() and port_file.read_text().strip():
                break
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        ids = itertools.count(1)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            page = next(t for t in targets if t["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:

                async def call(method: str, **params: object) -> dict[str, object]:
                    call_id = next(ids)
                    await ws.send_json({"id": call_id, "method": method, "params": params})
                    async with asyncio.timeout(CHROMIUM_TIMEOUT_S):
                        while True:
                            answer = await ws.receive_json()
                            if answer.get("id") == call_id:
                                result: dict[str, object] = answer["result"]
                                return result

                width, height = WINDOW
                await call(
                    "Emulation.setDeviceMetricsOverride",
                    width=width, height=height, deviceScaleFactor=1, mobile=False,
                )  # fmt: skip

                async def value_of(expression: str) -> object:
                    done = await call("Runtime.evaluate", expression=expression, returnByValue=True)
                    assert "exceptionDetails" not in done, (expression, done)
                    result = done["result"]
                    assert isinstance(result, dict)
                    return result.get("value")

                async def click(selector: str) -> None:
                    where: object = None
                    for _ in range(100):  # up to 10 s for it to be shown
                        where = await value_of(
                            f"(() => {{ const el = document.querySelector({selector!r}); "
                            "if (!el) return null; el.scrollIntoView({block: 'center'}); "
                            "const r = el.getBoundingClientRect(); "
                            "if (r.width === 0 || r.height === 0) return null; "
                            "return [r.left + r.width / 2, r.top + r.height / 2]; })()"
                        )
                        if where is not None:
                            break
                        await asyncio.sleep(0.1)
                    assert isinstance(where, list), f"no element {selector!r} shown to click"
                    x, y = where
                    for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
                        await call(
                            "Input.dispatchMouseEvent", type=kind, x=x, y=y,
                            button="left", clickCount=1,
                        )  # fmt: skip

                for delay_s, step in steps:
                    await asyncio.sleep(delay_s)
                    if isinstance(step, Click):
                        await click(step.selector)
                    elif isinstance(step, Type):
                        await click(step.selector)
                        await call("Input.insertText", text=step.text)
                    elif isinstance(step, WaitFor):
                        for _ in range(max(1, round(step.timeout_s / 0.1))):
                            if await value_of(f"Boolean({step.condition})") is True:
                                break
                            await asyncio.sleep(0.1)
                        else:
                            body = await value_of("document.body.innerText.slice(0, 3000)")
                            raise AssertionError(
                                f"the page never met {step.condition} in {step.timeout_s}s; "
                                f"it showed: {body}"
                            )
                    elif isinstance(step, Shot):
                        shot = await call("Page.captureScreenshot", format="png")
                        assert isinstance(shot["data"], str)
                        step.path.write_bytes(base64.b64decode(shot["data"]))
                    elif isinstance(step, str):
                        done = await call("Runtime.evaluate", expression=step)
                        assert "exceptionDetails" not in done, (step, done)
                    else:
                        await step()
                await asyncio.sleep(wait_s)
                dom = await call(
                    "Runtime.evaluate",
                    expression="document.documentElement.outerHTML",
                    returnByValue=True,
                )
                shot = await call("Page.captureScreenshot", format="png")
        value = dom["result"]
        assert isinstance(value, dict) and isinstance(shot["data"], str)
        return str(value["value"]), base64.b64decode(shot["data"])
    finally:
        proc.kill()
        await proc.wait()
