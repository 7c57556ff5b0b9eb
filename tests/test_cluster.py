"""The worker on a real three-master Redis Cluster: the stream, the consumer groups,
the atomic publish-and-acknowledge and the side keys all work on one shard."""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter

import redis.asyncio as aioredis

from queue_worker.streams.connection import open_redis
from tests.harness import Stack


async def test_open_redis_tells_a_cluster_from_a_single_server(
    redis_url: str, cluster_url: str
) -> None:
    single, cluster = await open_redis(redis_url), await open_redis(cluster_url)
    try:
        assert isinstance(single, aioredis.Redis)
        assert isinstance(cluster, aioredis.RedisCluster)
    finally:
        await single.aclose()
        await cluster.aclose()


async def test_end_to_end_on_a_cluster(stack_factory, cluster_url: str) -> None:
    stack: Stack = await stack_factory(redis=cluster_url, executor_capacity=3, max_output_bytes=512)
    assert isinstance(stack.redis, aioredis.RedisCluster)
    ids = await stack.enqueue_many(150)
    await stack.enqueue("big", code="SIMULATE_OUTPUT_BYTES=5000")
    await stack.enqueue("bad", code="SIMULATE_FAIL")
    await stack.wait_terminal(152)
    await stack.wait_messages(152)
    await asyncio.sleep(0.3)
    per_task = Counter(p["eval_id"] for _, p in stack.messages)
    assert set(per_task) == {*ids, "big", "bad"} and set(per_task.values()) == {1}
    assert all(stack.queue_state.tasks[i].complete_calls == 1 for i in ids)
    assert len(stack.queue_state.tasks["big"].output["output"]) == 5000  # kept whole aside
    assert await stack.types_for(ids[0]) == [
        "task.pulled", "executor.selected", "task.dispatched", "task.completed", "task.reported",
    ]  # fmt: skip
    _, status = await stack.get_json("/status")
    assert status["counters"]["completed"] == 151 and status["counters"]["failed"] == 1
    projectors = {p["name"]: p for p in status["stream"]["projectors"]}
    assert projectors["publisher"]["pending"] == 0 and projectors["reporter"]["pending"] == 0
    status_code, health = await stack.get_json("/health")
    assert status_code == 200 and health["redis"] is True
    # The operator commands read the cluster too.
    env = {**os.environ, "REDIS_URL": cluster_url, "STREAM_PREFIX": stack.prefix}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "queue_worker", "audit", ids[0], env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert out.decode().startswith(f"history of evaluation {ids[0]} (5 events)")
