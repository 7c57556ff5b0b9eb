"""Every Redis key and group name of a deployment comes from here.

Keys carry the hash tag ``{<prefix>}`` so that all of a deployment's keys
land on one Redis Cluster shard.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The layout of a deployment's stream and keys that this version reads and writes. Format 1
# (0.1.x) had no outcome stream: its publisher and reporter read groups of the main stream.
# Workers of different formats must not run at once (see ``router/formats.py``).
STREAM_FORMAT = 2

COMPLETED_CHANNEL = "evaluation:completed"
FAILED_CHANNEL = "evaluation:failed"


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "queue-worker"

    @property
    def tag(self) -> str:
        """What every key of the deployment starts with (scripts build keys from it)."""
        return f"{{{self.prefix}}}:"

    @property
    def events(self) -> str:
        return f"{{{self.prefix}}}:events"

    @property
    def outcomes(self) -> str:
        """The outcome stream: a copy of every ``task.completed`` / ``task.failed`` /
        ``task.rejected`` entry of ``events``, under the same id, written by the same
        script call. The publisher and the reporter read it."""
        return f"{{{self.prefix}}}:outcomes"

    @property
    def fenced(self) -> str:
        """A hash: worker id -> the highest generation of it that was taken over."""
        return f"{{{self.prefix}}}:fenced"

    @property
    def epoch(self) -> str:
        """Set once per Redis data set (``<token>:<ms>``): gone or changed, Redis lost data."""
        return f"{{{self.prefix}}}:epoch"

    def generation(self, worker_id: str) -> str:
        """A counter bumped by every start of ``worker_id``: its generation."""
        return f"{{{self.prefix}}}:generation:{worker_id}"

    def claim(self, eval_id: str) -> str:
        """Held (``<worker> <generation>``) while the task is in flight in the fleet."""
        return f"{{{self.prefix}}}:claim:{eval_id}"

    def quarantine(self, digest: str) -> str:
        """Marks a queue answer that was rejected once (by its SHA-256)."""
        return f"{{{self.prefix}}}:quarantine:{digest}"

    @property
    def dead_letters(self) -> str:
        return f"{{{self.prefix}}}:dead"

    def alive(self, worker_id: str) -> str:
        """A worker's liveness key: it exists while the worker runs (refreshed, with a TTL);
        its value is the worker's generation (format 1: its package version)."""
        return f"{{{self.prefix}}}:alive:{worker_id}"

    @property
    def alive_pattern(self) -> str:
        """A ``SCAN ... MATCH`` pattern of every liveness key (the prefix taken literally)."""
        return re.sub(r"([*?\[\]\\])", r"\\\1", self.alive("")) + "*"

    @property
    def formats(self) -> str:
        """A hash: worker id -> ``"<stream format> <package version>"``, written at start."""
        return f"{{{self.prefix}}}:formats"

    def takeover(self, worker_id: str) -> str:
        """Held by the replica that recovers a dead worker's tasks."""
        return f"{{{self.prefix}}}:takeover:{worker_id}"

    def slots(self, executor_url: str) -> str:
        """Fleet-wide in-flight slots of one executor (a sorted set scored by expiry)."""
        return f"{{{self.prefix}}}:slots:{executor_url}"

    def rate(self, executor_url: str) -> str:
        """The fleet's pace of dispatches to one executor (EXECUTOR_RATE_LIMIT)."""
        return f"{{{self.prefix}}}:rate:{executor_url}"

    def task(self, eval_id: str) -> str:
        """The ids of one evaluation's entries (the task index)."""
        return f"{{{self.prefix}}}:task:{eval_id}"

    @property
    def tasks(self) -> str:
        """Each indexed evaluation's latest state: ``eval_id -> "<id> <state> <executor>"``."""
        return f"{{{self.prefix}}}:tasks"

    def tasks_in(self, state: str) -> str:
        """The evaluations in one state, scored by when they entered it."""
        return f"{{{self.prefix}}}:tasks:{state}"

    @property
    def checkpoint(self) -> str:
        """The status view's latest checkpoint (``id``, ``view``)."""
        return f"{{{self.prefix}}}:checkpoint"

    def budget(self, second: int) -> str:
        """The fleet's dispatches (``d``) and retries (``r``) in one second (unix time),
        which the retry budget sums over its window."""
        return f"{{{self.prefix}}}:budget:{second}"

    def result(self, eval_id: str) -> str:
        """Where a result too large for the stream is kept in full."""
        return f"{{{self.prefix}}}:result:{eval_id}"

    def traced(self, eval_id: str) -> str:
        """The id of the entry that ended a task whose spans were exported (the latest)."""
        return f"{{{self.prefix}}}:traced:{eval_id}"

    publisher_group: str = "publisher"
    reporter_group: str = "reporter"
    index_group: str = "index"
    tracing_group: str = "tracing"
