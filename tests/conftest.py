"""Shared fixtures: one private redis-server per test session, a fresh stream per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from queue_worker.devstack.redis import RedisServer
from queue_worker.logs import configure_logging
from tests.cluster import RedisClusterProcesses
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
