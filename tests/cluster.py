"""A real three-master Redis Cluster on loopback, started for the tests."""

from __future__ import annotations

import time

import redis

from queue_worker.devstack.redis import RedisServer

SLOTS = 16384


class RedisClusterProcesses:
    """Three ``redis-server --cluster-enabled yes`` processes, slots split in three."""

    def __init__(self) -> None:
        self.nodes = [RedisServer(cluster=True) for _ in range(3)]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self, timeout_s: float = 20.0) -> RedisClusterProcesses:
        for node in self.nodes:
            node.start()
        clients = [redis.Redis(port=node.port) for node in self.nodes]
        bounds = [SLOTS * i // len(clients) for i in range(len(clients) + 1)]
        for client, low, high in zip(clients, bounds, bounds[1:], strict=False):
            client.execute_command("CLUSTER ADDSLOTSRANGE", low, high - 1)  # type: ignore[no-untyped-call]
        for node in self.nodes[1:]:
            clients[0].execute_command("CLUSTER MEET", "127.0.0.1", node.port)  # type: ignore[no-untyped-call]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            infos = [c.execute_command("CLUSTER INFO") for c in clients]  # type: ignore[no-untyped-call]
            if all(
                i["cluster_state"] == "ok" and int(i["cluster_known_nodes"]) == 3 for i in infos
            ):
                break
            time.sleep(0.1)
        else:
            self.close()
            raise RuntimeError("the test cluster did not reach cluster_state:ok")
        for client in clients:
            client.close()
        return self

    def close(self) -> None:
        for node in self.nodes:
            node.close()
