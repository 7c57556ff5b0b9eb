"""Shared fixtures: one private redis-server per test session, a fresh stream per test,
Redis servers in containers for fault tests."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from queue_worker.devstack.redis import RedisServer
from queue_worker.logs import configure_logging
from tests.cluster import RedisClusterProcesses
from tests.containers import (
    REDIS_IMAGE,
    SETUP_HINT,
    Fsync,
    RedisInContainer,
    docker_problem,
    setup_failure,
)
from tests.harness import Stack, make_stack


def pytest_configure(config: pytest.Config) -> None:
    configure_logging("WARNING", "console")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """``QW_TEST_REDIS_URL`` when set, else a redis-server spawned for this session."""
    external = os.environ.get("QW_TEST_REDIS_URL")
    if external:
        yield external
        return
    with RedisServer() as server:
        yield server.url


@pytest.fixture(scope="session")
def cluster_url() -> Iterator[str]:
    """A three-master Redis Cluster spawned for this session (any node's URL)."""
    cluster = RedisClusterProcesses().start()
    try:
        yield cluster.url
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def docker_for_containers() -> None:
    """Skip (or fail, when ``QW_REQUIRE_CONTAINERS=1``) unless Redis containers can run."""
    problem = docker_problem()
    if problem is None:
        return
    reason = f"Redis fault tests need Docker and the {REDIS_IMAGE} image: {problem}; {SETUP_HINT}"
    recorded = setup_failure()
    if recorded:
        reason += f"; setup-docker.sh failed: {recorded}"
    if os.environ.get("QW_REQUIRE_CONTAINERS") == "1":
        pytest.fail(f"{reason} (QW_REQUIRE_CONTAINERS=1 makes this a failure)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def redis_container_factory(
    docker_for_containers: None,
) -> Iterator[Callable[..., RedisInContainer]]:
    """Make Redis servers in containers (``tests/containers``), all removed at teardown.

    ``factory(appendonly=True, appendfsync="always")`` starts one and returns it.
    """
    with contextlib.ExitStack() as made:  # closes every one, even when one close fails

        def factory(
            *, appendonly: bool = False, appendfsync: Fsync = "everysec"
        ) -> RedisInContainer:
            server = RedisInContainer(appendonly=appendonly, appendfsync=appendfsync)
            made.callback(server.close)
            return server.create()

        yield factory


@pytest.fixture
def redis_container(
    redis_container_factory: Callable[..., RedisInContainer],
) -> RedisInContainer:
    """A Redis server in a container with the AOF on (fsync every second, as compose runs it)."""
    return redis_container_factory(appendonly=True, appendfsync="everysec")


@pytest.fixture
def prefix() -> str:
    """A stream prefix of this test's own, so tests never see each other's events."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def stack_factory(redis_url: str, prefix: str) -> AsyncIterator[Callable[..., Any]]:
    stacks: list[Stack] = []

    async def factory(
        *, start_worker: bool = True, redis: str | None = None, **options: Any
    ) -> Stack:
        stack = make_stack(redis or redis_url, prefix, **options)
        stacks.append(stack)
        return await stack.start(worker=start_worker)

    yield factory
    for stack in stacks:
        await stack.close()
