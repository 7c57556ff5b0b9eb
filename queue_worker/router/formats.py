"""Workers of another stream format: this worker waits until none of them is alive.

A worker of the earlier version (stream format 1, 0.1.x) reads the publisher's and the
reporter's groups on the main stream: beside this version it would publish and report
outcomes a second time (docs/OPERATIONS.md, "Upgrading to the outcome stream"). So:

* Every worker records ``"<stream format> <package version>"`` in ``{<prefix>}:formats``
  when it starts (the liveness ``START`` script; a clean stop removes it).
* A liveness key ``{<prefix>}:alive:<id>`` of this version holds the worker's generation,
  an integer; one of format 1 holds its package version (``0.1.0``).
* :class:`FormatGuard` looks for live workers of another format at start, and again every
  ``HEARTBEAT_INTERVAL_S`` while it finds any: ``SCAN`` over the liveness keys, their
  values (``MGET``) and the formats recorded (``HMGET``). A value that is not an integer
  is format 1; an integer with a recorded format other than ours is another format. An
  integer with no recorded format (the hash lost with Redis's data, say) is taken for
  ours. Until none is left, :attr:`FormatGuard.clear` is unset: the router does not
  start (it pulls, recovers and takes over nothing), the earlier version's groups are
  not handed over, and ``/health`` names the workers (:meth:`FormatGuard.problem`).

Once clear it stops scanning: a ``SCAN`` walks the whole key space (every task's index
keys too), not something to repeat for ever. It watches the folded status view instead
(:meth:`FormatGuard.watch`): every worker, the earlier version included, appends
``worker.started``, whose ``stream_format`` (absent from the earlier version's: 1) the
view keeps per worker. A running worker of another format there is asked about (one
``MGET`` of those workers' liveness keys) when that set changes, then every
``HEARTBEAT_INTERVAL_S`` while it is not empty; one whose key exists is in
:attr:`FormatGuard.peers` again: the router pulls nothing (``Router.pull_blocked``), the
tasks in flight finish, ``/health`` names it, and all goes on once its key is gone or it
recorded ``worker.stopped``. :attr:`FormatGuard.clear` stays set: nothing of the start
(the hand-over of the earlier version's groups) is done again. On a Redis Cluster the
scan asks every primary (redis-py's ``scan_iter``); the deployment's keys are all on its
hash tag's shard.

An ACL user without ``+scan`` (the README's line before this version) does not stop the
worker: it looks at the liveness keys of the workers the event stream names instead
(``known``, once the stream is folded), logged once as ``format_scan_denied``. That
misses only a worker of the earlier version whose every entry was trimmed away.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass

import structlog

from queue_worker.streams.connection import REDIS_ERRORS, denied, transient
from queue_worker.streams.keys import STREAM_FORMAT
from queue_worker.streams.store import EventStore
from queue_worker.streams.views import StatusView, WorkerView

log = structlog.get_logger(__name__)

SCAN_COUNT = 10_000  # keys a SCAN call looks at (the whole key space is walked once)
SHOWN_PEERS = 10  # workers named in /health's reason (and how many more there are)
WATCH_POLL_S = 0.1  # how often the folded view is looked at once clear (no Redis call)
UPGRADING = 'docs/OPERATIONS.md, "Upgrading to the outcome stream"'


@dataclass(frozen=True, slots=True, order=True)
class Peer:
    """A live worker of another stream format."""

    worker_id: str
    format: int
    version: str

    def __str__(self) -> str:
        return f"{self.worker_id} ({self.version}, stream format {self.format})"


def peer_of(worker_id: str, alive: bytes, recorded: bytes | None) -> Peer | None:
    """The worker behind a liveness key's value and its recorded format, when its format
    is not ours (``None`` when it is, or may be taken to be)."""
    value = alive.decode(errors="replace")
    if not value.isdigit():  # format 1 kept its package version there
        return Peer(worker_id, 1, value)
    if recorded is None:
        return None
    text = recorded.decode(errors="replace")
    fmt, _, version = text.partition(" ")
    if fmt.isdigit() and int(fmt) == STREAM_FORMAT:
        return None
    return Peer(worker_id, int(fmt) if fmt.isdigit() else 0, version or "unknown")


class FormatGuard:
    """Finds live workers of another stream format; :attr:`clear` once there is none."""

    def __init__(
        self,
        store: EventStore,
        *,
        interval_s: float,
        known: Callable[[], Awaitable[Collection[str]]] | None = None,
        view: Callable[[], StatusView] | None = None,
        poll_s: float = WATCH_POLL_S,
    ) -> None:
        self.store = store
        self.known = known  # the workers the stream names, when SCAN is not permitted
        self.view = view  # the folded status view, watched once clear
        self.poll_s = poll_s
        self.watched: frozenset[tuple[str, int | None]] = frozenset()  # (id, started_ts)
        self.scan_denied: str | None = None
        self.keys = store.keys
        self.worker_id = store.worker_id
        self.interval_s = interval_s
        self.clear = asyncio.Event()
        self.peers: tuple[Peer, ...] = ()
        self.checked = False  # a look went through
        self.error: str | None = None  # why the last look did not

    def problem(self) -> str | None:
        """Why this worker waits, for ``/health``; ``None`` once it does not."""
        if self.clear.is_set() and not self.peers:
            return None
        if not self.checked:
            looking = "looking for live workers of another stream format (nothing is pulled"
            return f"{looking} until none is found)" + (f": {self.error}" if self.error else "")
        shown = ", ".join(str(p) for p in self.peers[:SHOWN_PEERS])
        more = len(self.peers) - SHOWN_PEERS
        if more > 0:
            shown += f" and {more} more"
        return (
            f"workers of an incompatible version are alive: {shown}; stop them ({UPGRADING}): "
            f"running beside them, they would publish and report outcomes a second time. "
            f"Nothing is pulled until their liveness keys are gone; then this worker goes on "
            f"by itself"
        )

    async def find(self) -> tuple[Peer, ...]:
        """The live workers of another stream format, by worker id."""
        redis, keys = self.store.redis, self.keys
        ids = sorted(set(await self._candidates()) - {self.worker_id})
        if not ids:
            return ()
        values = await redis.mget([keys.alive(worker_id) for worker_id in ids])
        recorded = await redis.hmget(keys.formats, ids)  # type: ignore[misc]
        peers = (
            peer_of(worker_id, value, fmt)
            for worker_id, value, fmt in zip(ids, values, recorded, strict=True)
            if value is not None  # gone since the scan
        )
        return tuple(sorted(p for p in peers if p is not None))

    async def _candidates(self) -> list[str]:
        """The ids of the live workers to look at: every liveness key (``SCAN``), or,
        when the ACL user may not scan, the workers the event stream names."""
        redis, keys = self.store.redis, self.keys
        if self.scan_denied is None:
            at = len(keys.alive("").encode())
            try:
                return [
                    key[at:].decode(errors="replace")
                    async for key in redis.scan_iter(match=keys.alive_pattern, count=SCAN_COUNT)
                ]
            except REDIS_ERRORS as exc:
                if not denied(exc) or self.known is None:
                    raise
                self.scan_denied = str(exc)
                log.warning(
                    "format_scan_denied",
                    error=str(exc),
                    hint="add +scan to the ACL user (README); looking at the workers the "
                    "event stream names instead",
                )
        assert self.known is not None
        return list(await self.known())

    async def check(self) -> bool:
        """Look once; whether it is clear (logged when what was found changes)."""
        try:
            peers = await self.find()
        except REDIS_ERRORS as exc:
            if not (transient(exc) or denied(exc)):
                raise
            if str(exc) != self.error:
                log.warning("format_check_failed", error=str(exc))
            self.error = str(exc)
            return False
        self.error = None
        self._found(peers)
        if not peers:
            self.clear.set()
        return not peers

    def _found(self, peers: tuple[Peer, ...]) -> None:
        """Keep what a look found (logged when it changes)."""
        if peers != self.peers or not self.checked:
            if peers:
                log.warning(
                    "incompatible_workers_alive",
                    workers=[str(p) for p in peers],
                    hint=f"stop them ({UPGRADING}); nothing is pulled until they are gone",
                )
            elif self.checked:
                log.warning("incompatible_workers_gone")
        self.peers, self.checked = peers, True

    async def run(self) -> None:
        """Look at once, then every ``interval_s`` until none is found; then watch the
        workers that start (:meth:`watch`)."""
        while not self.clear.is_set():
            if await self.check():
                break
            await asyncio.sleep(self.interval_s)
        if self.view is not None:
            await self.watch(self.view)

    async def watch(self, view: Callable[[], StatusView]) -> None:
        """Once clear, find the workers of another format that start later from the
        status view, every ``poll_s``: those whose ``worker.started`` names another stream
        format and which have not stopped. Whether each is alive is asked of Redis (one
        ``MGET`` of their liveness keys) when that set changes, then every ``interval_s``
        while it is not empty; those alive are :attr:`peers` (pulling stops, ``/health``
        names them) until their keys are gone or they record ``worker.stopped``."""
        due = 0.0
        while True:
            workers = view().workers
            watched = frozenset(
                (worker_id, w.started_ts)
                for worker_id, w in workers.items()
                if w.running and w.stream_format != STREAM_FORMAT and worker_id != self.worker_id
            )
            now = time.monotonic()
            if watched != self.watched or (watched and now >= due):
                self.watched, due = watched, now + self.interval_s
                try:
                    self._found(await self._alive(sorted(watched), workers))
                except REDIS_ERRORS as exc:
                    if not (transient(exc) or denied(exc)):
                        raise
                    log.warning("format_check_failed", error=str(exc))  # asked again later
            await asyncio.sleep(self.poll_s)

    async def _alive(
        self, watched: list[tuple[str, int | None]], workers: Mapping[str, WorkerView]
    ) -> tuple[Peer, ...]:
        """Those of ``watched`` alive now, by their liveness key and recorded format (as
        at start: :func:`peer_of`, so a worker the view mistakes for another format, say
        from a ``worker.started`` trimmed away, is not taken for one)."""
        ids = [worker_id for worker_id, _ in watched if worker_id in workers]
        if not ids:
            return ()
        redis, keys = self.store.redis, self.keys
        values = await redis.mget([keys.alive(worker_id) for worker_id in ids])
        recorded = await redis.hmget(keys.formats, ids)  # type: ignore[misc]
        peers = (
            peer_of(worker_id, value, fmt)
            for worker_id, value, fmt in zip(ids, values, recorded, strict=True)
            if value is not None
        )
        return tuple(sorted(p for p in peers if p is not None))
