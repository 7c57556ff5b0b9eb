"""Run an aiohttp application on a loopback port inside the current event loop."""

from __future__ import annotations

import socket

from aiohttp import web


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """One aiohttp app served on ``host:port``; ``stop()`` then ``start()`` reuses the port.

    ``stop()`` gives the requests under way ``shutdown_timeout_s`` (1 s) to finish, then
    cancels them: a simulated executor stopped in the middle of a 30 s run, or a queue
    holding a long poll, goes at once (aiohttp's own default waits a minute for them).
    """

    def __init__(
        self,
        app: web.Application,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        shutdown_timeout_s: float = 1.0,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port or free_port(host)
        self.shutdown_timeout_s = shutdown_timeout_s
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> Server:
        self._runner = web.AppRunner(
            self.app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=self.shutdown_timeout_s,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Server:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
