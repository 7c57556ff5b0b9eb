"""Every Redis key and group name of a deployment comes from here.

Keys carry the hash tag ``{<prefix>}`` so that all of a deployment's keys
land on one Redis Cluster shard.
"""

from __future__ import annotations

from dataclasses import dataclass

COMPLETED_CHANNEL = "evaluation:completed"
FAILED_CHANNEL = "evaluation:failed"


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "queue-worker"

    @property
    def events(self) -> str:
        return f"{{{self.prefix}}}:events"

    @property
    def dead_letters(self) -> str:
        return f"{{{self.prefix}}}:dead"

    def alive(self, worker_id: str) -> str:
        """A worker's liveness key: it exists while the worker runs (refreshed, with a TTL)."""
        return f"{{{self.prefix}}}:alive:{worker_id}"

    def takeover(self, worker_id: str) -> str:
        """Held by the replica that recovers a dead worker's tasks."""
        return f"{{{self.prefix}}}:takeover:{worker_id}"

    def slots(self, executor_url: str) -> str:
        """Fleet-wide in-flight slots of one executor (a sorted set scored by expiry)."""
        return f"{{{self.prefix}}}:slots:{executor_url}"

    def result(self, eval_id: str) -> str:
        """Where a result too large for the stream is kept in full."""
        return f"{{{self.prefix}}}:result:{eval_id}"

    publisher_group: str = "publisher"
    reporter_group: str = "reporter"
