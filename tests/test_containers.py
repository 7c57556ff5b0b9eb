"""The container fixture's fault operations do what they say, against real containers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import docker
import docker.errors
import pytest
import redis

from tests.containers import RedisInContainer


def _url_is_fixed(server: RedisInContainer, url: str) -> None:
    assert server.url == url == f"redis://127.0.0.1:{server.port}/0"
    with server.client() as client:
        assert client.ping()


def test_url_is_a_loopback_port_published_by_the_container(
    redis_container: RedisInContainer,
) -> None:
    with contextlib.closing(docker.from_env()) as api:
        bindings = api.containers.get(redis_container.container_id).ports["6379/tcp"]
    assert bindings == [{"HostIp": "127.0.0.1", "HostPort": str(redis_container.port)}]
    with redis_container.client() as client:
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}


def test_kill_then_start_brings_back_what_the_aof_kept(
    redis_container_factory: Callable[..., RedisInContainer],
) -> None:
    server = redis_container_factory(appendonly=True, appendfsync="always")
    url = server.url
    with server.client() as client:
        client.set("kept", "yes")

    server.kill()
    with server.client(socket_connect_timeout=1) as client, pytest.raises(redis.ConnectionError):
        client.ping()

    server.start()
    _url_is_fixed(server, url)
    with server.client() as client:
        assert client.get("kept") == b"yes"


def test_kill_then_start_without_aof_comes_back_empty(
    redis_container_factory: Callable[..., RedisInContainer],
) -> None:
    server = redis_container_factory(appendonly=False)
    with server.client() as client:
        client.set("lost", "yes")
    server.kill()
    server.start()
    with server.client() as client:
        assert client.get("lost") is None


def test_restart_empty_is_a_fresh_server_on_the_same_url(
    redis_container: RedisInContainer,
) -> None:
    url, first = redis_container.url, redis_container.container_id
    with redis_container.client() as client:
        client.set("gone", "yes")

    redis_container.restart_empty()
    assert redis_container.container_id != first
    _url_is_fixed(redis_container, url)
    with redis_container.client() as client:
        assert client.get("gone") is None
        assert client.dbsize() == 0


def test_pause_stops_answers_until_unpause(redis_container: RedisInContainer) -> None:
    url = redis_container.url
    redis_container.pause()
    with redis_container.client(socket_timeout=0.3) as client:
        with pytest.raises(redis.TimeoutError):
            client.ping()

        redis_container.unpause()
        _url_is_fixed(redis_container, url)
        client.set("after", "unpause")
        assert client.get("after") == b"unpause"


def test_maxmemory_with_noeviction_refuses_writes(redis_container: RedisInContainer) -> None:
    url = redis_container.url
    value = b"x" * 65536
    with redis_container.client() as client:
        client.set("before", value)  # the write itself is fine without a limit
        used = int(client.info("memory")["used_memory"])

        redis_container.set_maxmemory(used + 100_000)
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            for i in range(10):  # 640 kB against 100 kB of headroom
                client.set(f"fill-{i}", value)
        assert client.get("before") == value  # noeviction: nothing was evicted
    _url_is_fixed(redis_container, url)


def test_close_removes_every_container_even_a_paused_one(
    docker_for_containers: None,
) -> None:
    server = RedisInContainer().create()
    try:
        first = server.container_id
        server.restart_empty()
        second = server.container_id
        server.pause()
    finally:
        server.close()
    with contextlib.closing(docker.from_env()) as api:
        for container_id in (first, second):
            with pytest.raises(docker.errors.NotFound):
                api.containers.get(container_id)
