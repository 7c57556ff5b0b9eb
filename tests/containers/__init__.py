"""Redis in a Docker container that a test can fault: kill, restart, pause, fill.

Containers come from testcontainers' ``RedisContainer`` on the image ``redis:latest``,
which ``tests/containers/setup-docker.sh`` builds locally from this machine's
``redis-server`` (no image registry is needed). The container's port 6379 is published
on a loopback port chosen once, so :attr:`RedisInContainer.url` stays the same across
every restart and a worker's ``REDIS_URL`` keeps pointing at it.

The fault methods block (a container operation takes up to a second); an async test
calls them as ``await asyncio.to_thread(redis.kill)`` so its event loop, and an
in-process worker on it, keeps running meanwhile.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Literal

import docker
import docker.errors
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from testcontainers.community.redis import RedisContainer
from testcontainers.core.config import testcontainers_config
from testcontainers.core.waiting_utils import WaitStrategy, WaitStrategyTarget

from queue_worker.devstack.serve import free_port

REDIS_IMAGE = "redis:latest"
SETUP_HINT = "run tests/containers/setup-docker.sh and export the lines it prints"
START_TIMEOUT_S = 30

Fsync = Literal["always", "everysec", "no"]


def docker_problem(image: str = REDIS_IMAGE) -> str | None:
    """Why Redis containers cannot run here (no Docker daemon, no image), or None."""
    try:
        client = docker.from_env(timeout=10)
    except docker.errors.DockerException as exc:
        return f"no Docker daemon answers ({exc})"
    try:
        client.ping()
        if not _has_image(client, image):
            return f"Docker has no image {image} (nothing is pulled: the script builds it)"
        ryuk = testcontainers_config.ryuk_image
        if not testcontainers_config.ryuk_disabled and not _has_image(client, ryuk):
            return (
                f"testcontainers would start its reaper, whose image {ryuk} is not here "
                "(nothing is pulled); set TESTCONTAINERS_RYUK_DISABLED=true"
            )
    except (docker.errors.DockerException, OSError) as exc:
        return f"Docker is not usable ({exc})"
    finally:
        client.close()
    return None


def setup_failure() -> str | None:
    """What ``setup-docker.sh`` recorded when its last run failed (None after a success).

    CI shows only the end of its output: the reason travels into the tests' own error.
    """
    directory = Path(os.environ.get("QW_DOCKER_DIR") or "/tmp/qwdocker")
    try:
        text = (directory / "setup-failed.txt").read_text(errors="replace").strip()
    except OSError:
        return None
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())[:2000] or None


def _has_image(client: docker.DockerClient, name: str) -> bool:
    try:
        client.images.get(name)
    except docker.errors.ImageNotFound:
        return False
    return True


def _no_retries() -> Retry:
    return Retry(NoBackoff(), 0)


def _answers(port: int) -> bool:
    client = redis.Redis(
        host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1, retry=_no_retries()
    )
    try:
        return bool(client.ping())
    finally:
        client.close()


class _Ping(WaitStrategy):
    """Ready when Redis answers PING on the published loopback port (polled every 20 ms)."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port
        self.with_poll_interval(0.02).with_startup_timeout(START_TIMEOUT_S)
        # BusyLoadingError (still loading the AOF) is a ConnectionError.
        self.with_transient_exceptions(redis.ConnectionError, redis.TimeoutError)

    def wait_until_ready(self, container: WaitStrategyTarget) -> None:
        def check() -> bool:
            container.reload()
            if container.status in ("exited", "dead"):
                raise StopIteration  # it will never answer
            return _answers(self.port)

        if not self._poll(check):
            out, err = container.get_logs()
            raise TimeoutError(
                f"Redis in container did not answer PING on 127.0.0.1:{self.port} "
                f"(status {container.status}): {(out + err).decode(errors='replace').strip()}"
            )


class _Container(RedisContainer):
    """A RedisContainer whose port 6379 is published on 127.0.0.1:``host_port`` only."""

    def __init__(self, image: str, host_port: int, command: list[str]) -> None:
        super().__init__(image)
        # docker-py takes (host ip, host port) for a binding, which testcontainers'
        # own typing of ``ports`` (a port number or None) does not spell out.
        loopback: dict[str, Any] = {"6379/tcp": ("127.0.0.1", host_port)}
        self.ports = loopback
        self.with_command(command)
        self.with_name(f"qw-test-redis-{uuid.uuid4().hex[:12]}")
        self.waiting_for(_Ping(host_port))

    def get_container_host_ip(self) -> str:
        return "127.0.0.1"


class RedisInContainer:
    """One Redis server, in a container, on a fixed loopback URL.

    ``appendonly`` turns the AOF on (with ``appendfsync``); RDB snapshots are off,
    so what survives :meth:`kill` + :meth:`start` is exactly what the AOF kept.
    """

    def __init__(
        self,
        *,
        appendonly: bool = False,
        appendfsync: Fsync = "everysec",
        image: str = REDIS_IMAGE,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.image = image
        self.command = [
            "redis-server",
            "--protected-mode", "no",
            "--save", "",
            "--appendonly", "yes" if appendonly else "no",
            "--appendfsync", appendfsync,
        ]  # fmt: skip
        self._containers: list[_Container] = []

    @property
    def _current(self) -> _Container:
        if not self._containers:
            raise RuntimeError("no container yet: call create() first")
        return self._containers[-1]

    @property
    def container_id(self) -> str:
        """Docker's id of the current container."""
        return self._current.get_container_id()

    def create(self) -> RedisInContainer:
        """Start a new container on this URL and wait until it answers PING."""
        container = _Container(self.image, self.port, self.command)
        self._containers.append(container)  # close() removes it even if start fails
        container.start()
        return self

    def _wait_ready(self) -> None:
        _Ping(self.port).wait_until_ready(self._current)

    def kill(self) -> None:
        """SIGKILL the server (``docker kill``); the URL refuses connections until start()."""
        wrapped = self._current.get_wrapped_container()
        wrapped.kill()
        wrapped.wait(condition="not-running")

    def start(self) -> None:
        """Start the killed server again (``docker start``); with the AOF on, its data is back."""
        self._current.get_wrapped_container().start()
        self._wait_ready()

    def restart_empty(self) -> None:
        """Replace the server by a fresh container, with no data, on the same URL."""
        self._current.stop()  # docker rm --force --volumes
        self._containers.pop()
        self.create()

    def pause(self) -> None:
        """Freeze the server (``docker pause``): connections open but nothing answers."""
        self._current.get_wrapped_container().pause()

    def unpause(self) -> None:
        """Thaw a paused server; it answers again (commands sent meanwhile are served)."""
        self._current.get_wrapped_container().unpause()
        self._wait_ready()

    def set_maxmemory(self, nbytes: int, policy: str = "noeviction") -> None:
        """CONFIG SET maxmemory and maxmemory-policy (a restart forgets them)."""
        with self.client() as client:
            client.config_set("maxmemory", nbytes)
            client.config_set("maxmemory-policy", policy)

    def client(self, **options: Any) -> redis.Redis:
        """A synchronous client of this server (``redis.Redis.from_url`` options).

        It does not retry (redis-py retries a failed command three times by default,
        with a backoff), so a fault shows at once.
        """
        options.setdefault("retry", _no_retries())
        return redis.Redis.from_url(self.url, **options)

    def close(self) -> None:
        """Remove every container this object made (running, paused or dead)."""
        errors: list[Exception] = []
        while self._containers:
            container = self._containers.pop()
            try:
                container.stop()
            except (docker.errors.DockerException, OSError) as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
