"""Views folded from the stream.

``apply(view, entry)`` is the fold step: deterministic, no I/O and no clock
(times come from the entries). For replay speed it updates the view it is
given and returns it; folding the same entries into a fresh view always gives
the same result, which is what ``/status`` relies on.
"""

from __future__ import annotations

import msgspec

from queue_worker.streams import events as ev
from queue_worker.streams.entries import id_key
from queue_worker.streams.events import Entry

ROUTED_WINDOW_MS = 60_000
FINISHED_WINDOW_MS = 300_000  # outcomes per second are kept this long (the dashboard's chart)
DURATIONS_KEPT = 256  # the latest task.completed durations kept per executor


class Counters(msgspec.Struct):
    pulled: int = 0
    rejected: int = 0
    routed: int = 0
    completed: int = 0
    failed: int = 0
    reported: int = 0
    queue_errors: int = 0
    retries: int = 0
    recovered: int = 0
    pulls_interrupted: int = 0
    dead_lettered: int = 0
    duplicate_handouts: int = 0
    leases_lost: int = 0
    loop_crashes: int = 0
    stream_resets: int = 0


class QueueView(msgspec.Struct):
    """One queue's reachability as one worker saw it."""

    reachable: bool = True
    consecutive_errors: int = 0
    errors: int = 0


class WorkerView(msgspec.Struct):
    started_ts: int | None = None
    stopped_ts: int | None = None
    version: str | None = None
    running: bool = False
    stream_format: int = 1  # as its worker.started says (an earlier version's: 1)
    counters: Counters = msgspec.field(default_factory=Counters)
    open_pull: str | None = None
    queue_reachable: bool = True  # every queue (QUEUE_SERVICE_URLS) is reachable
    queue_consecutive_errors: int = 0  # the most of any queue
    queues: dict[str, QueueView] = msgspec.field(default_factory=dict)  # "" is QUEUE_SERVICE_URL
    generation: int = 0  # the newest generation seen on its entries
    fenced_generation: int | None = None  # taken over up to this generation


class ExecutorView(msgspec.Struct):
    healthy: bool | None = None
    health_changed_ts: int | None = None
    health_reason: str | None = None
    routed: int = 0
    completed: int = 0
    failed: int = 0
    in_flight: int = 0
    ejected: bool = False
    ejected_until_ts: int | None = None
    ejections: int = 0
    removed: bool = False
    capacity: int | None = None
    throttles: int = 0
    cooling_until_ts: int | None = None


class PauseView(msgspec.Struct):
    """A pause in force (``control.paused``) or a drain (``executor.drained``)."""

    by: str
    reason: str
    since_ts: int
    entry_id: str


class TaskView(msgspec.Struct):
    """A task that has been pulled and has not reached a terminal event."""

    worker_id: str
    pulled_ts: int
    pulled_id: str
    leased: bool = False
    stage: str = "pulled"
    executor: str | None = None
    attempt: int = 0
    queue: str | None = None


class StatusView(msgspec.Struct):
    last_id: str | None = None
    events: int = 0
    by_type: dict[str, int] = msgspec.field(default_factory=dict)
    workers: dict[str, WorkerView] = msgspec.field(default_factory=dict)
    executors: dict[str, ExecutorView] = msgspec.field(default_factory=dict)
    in_flight: dict[str, TaskView] = msgspec.field(default_factory=dict)
    unreported: dict[str, str] = msgspec.field(default_factory=dict)
    routed_per_s: dict[int, int] = msgspec.field(default_factory=dict)
    ignored: int = 0  # entries of a fenced generation written after its fence
    paused: dict[str, PauseView] = msgspec.field(default_factory=dict)  # by scope
    drained: dict[str, PauseView] = msgspec.field(default_factory=dict)  # by executor
    # Cancels asked for tasks in flight (``task.cancel_requested``), until the task ends:
    # the worker holding one acts on it.
    cancels: dict[str, PauseView] = msgspec.field(default_factory=dict)  # by eval_id
    # What the dashboard charts. A checkpoint saved before these two existed fills them
    # empty: the history starts again from the entries after it, no counter is affected.
    # second -> [completed, failed] over the last FINISHED_WINDOW_MS (of the entries' times)
    finished_per_s: dict[int, list[int]] = msgspec.field(default_factory=dict)
    # executor -> the duration_ms of its latest DURATIONS_KEPT task.completed, oldest first
    durations_ms: dict[str, list[float]] = msgspec.field(default_factory=dict)

    def acknowledged(self, eval_id: str, entry_id: str) -> bool:
        """Whether the queue acknowledged the outcome ``entry_id`` of ``eval_id``: it is
        folded into this view and the task is no longer unreported (a stream reset never
        re-records such an outcome)."""
        folded = id_key(self.last_id or "0-0")
        return id_key(entry_id) <= folded and eval_id not in self.unreported

    def routed_since(self, since_ms: int) -> int:
        """Tasks dispatched from ``since_ms`` on (to the second; the last minute is kept)."""
        first = since_ms // 1000
        return sum(n for second, n in self.routed_per_s.items() if second >= first)


def _count_finished(view: StatusView, ts: int, column: int) -> None:
    """One outcome in its second; seconds older than the window are dropped."""
    second = ts // 1000
    counts = view.finished_per_s.get(second)
    if counts is None:
        horizon = (ts - FINISHED_WINDOW_MS) // 1000
        for old in [s for s in view.finished_per_s if s < horizon]:
            del view.finished_per_s[old]
        counts = view.finished_per_s[second] = [0, 0]
    counts[column] += 1


def _keep_duration(view: StatusView, executor: str, duration_ms: float) -> None:
    kept = view.durations_ms.setdefault(executor, [])
    kept.append(duration_ms)
    if len(kept) > DURATIONS_KEPT:
        del kept[: len(kept) - DURATIONS_KEPT]


def _worker(view: StatusView, worker_id: str) -> WorkerView:
    w = view.workers.get(worker_id)
    if w is None:
        w = view.workers[worker_id] = WorkerView()
    return w


def _executor(view: StatusView, url: str) -> ExecutorView:
    x = view.executors.get(url)
    if x is None:
        x = view.executors[url] = ExecutorView()
    return x


def _queue(w: WorkerView, queue: str | None) -> QueueView:
    q = w.queues.get(queue or "")
    if q is None:
        q = w.queues[queue or ""] = QueueView()
    return q


def _queues_summary(w: WorkerView) -> None:
    w.queue_reachable = all(q.reachable for q in w.queues.values())
    w.queue_consecutive_errors = max((q.consecutive_errors for q in w.queues.values()), default=0)


def _held(entry: Entry, e: ev.TaskPulled | ev.TaskRestored) -> TaskView:
    """A task held from ``entry`` on (its ``task.pulled``, or its ``task.restored``)."""
    return TaskView(
        worker_id=entry.worker_id,
        pulled_ts=entry.ts,
        pulled_id=entry.id,
        leased=e.lease_s is not None,
        queue=e.queue,
    )


def _end_attempt(view: StatusView, task: TaskView | None) -> None:
    if task is not None and task.executor is not None and task.stage == "dispatched":
        _executor(view, task.executor).in_flight -= 1


def _finish(view: StatusView, eval_id: str, outcome: str) -> None:
    _end_attempt(view, view.in_flight.pop(eval_id, None))
    if view.cancels:
        view.cancels.pop(eval_id, None)
    view.unreported[eval_id] = outcome


def apply(view: StatusView, entry: Entry) -> StatusView:
    """Fold one entry into ``view`` and return it."""
    e = entry.event
    view.last_id = entry.id
    w = _worker(view, entry.worker_id)
    if w.fenced_generation is not None and entry.gen <= w.fenced_generation:
        view.ignored += 1  # written by a worker after a peer took it over: void
        return view
    view.events += 1
    view.by_type[e.type] = view.by_type.get(e.type, 0) + 1
    w.generation = max(w.generation, entry.gen)
    c = w.counters
    match e:
        case ev.WorkerStarted():
            w.started_ts, w.stopped_ts, w.version, w.running = entry.ts, None, e.version, True
            w.stream_format = e.stream_format
            for url in e.executors:
                _executor(view, url)
        case ev.WorkerStopped():
            w.stopped_ts, w.running = entry.ts, False
        case ev.PullStarted():
            w.open_pull = e.pull_id
        case ev.PullClosed() | ev.TaskDuplicateHandout() if w.open_pull == e.pull_id:
            w.open_pull = None
            if isinstance(e, ev.TaskDuplicateHandout):
                c.duplicate_handouts += 1
        case ev.TaskDuplicateHandout():
            c.duplicate_handouts += 1
        case ev.TaskPulled():
            c.pulled += 1
            w.open_pull = None
            view.in_flight[e.eval_id] = _held(entry, e)
        case ev.PullInterrupted():
            c.pulls_interrupted += 1
            owner = _worker(view, e.owner) if e.owner else w
            if owner.open_pull == e.pull_id:
                owner.open_pull = None
        case ev.TaskRejected():
            c.rejected += 1
            w.open_pull = None
            if e.eval_id is not None:
                view.unreported[e.eval_id] = "failed"
        case ev.QueueUnreachable():
            c.queue_errors += 1
            q = _queue(w, e.queue)
            q.reachable, q.consecutive_errors = False, e.consecutive_errors
            q.errors += 1
            _queues_summary(w)
        case ev.QueueRecovered():
            q = _queue(w, e.queue)
            q.reachable, q.consecutive_errors = True, 0
            _queues_summary(w)
        case ev.ExecutorSelected():
            task = view.in_flight.get(e.eval_id)
            if task is not None:
                task.stage, task.executor, task.attempt = "selected", e.executor, e.attempt
        case ev.TaskDispatched():
            c.routed += 1
            x = _executor(view, e.executor)
            x.routed += 1
            x.in_flight += 1
            task = view.in_flight.get(e.eval_id)
            if task is not None:
                task.stage, task.executor, task.attempt = "dispatched", e.executor, e.attempt
            second = entry.ts // 1000
            if second not in view.routed_per_s:
                horizon = (entry.ts - ROUTED_WINDOW_MS) // 1000
                for old in [s for s in view.routed_per_s if s < horizon]:
                    del view.routed_per_s[old]
            view.routed_per_s[second] = view.routed_per_s.get(second, 0) + 1
        case ev.TaskCompleted():
            if not e.restored:  # a re-recorded outcome was counted when first recorded
                c.completed += 1
                _executor(view, e.executor).completed += 1
                _count_finished(view, entry.ts, 0)
                _keep_duration(view, e.executor, e.duration_ms)
            _finish(view, e.eval_id, "completed")
        case ev.TaskFailed():
            if not e.restored:
                c.failed += 1
                if e.executor is not None:
                    _executor(view, e.executor).failed += 1
                _count_finished(view, entry.ts, 1)
            _finish(view, e.eval_id, "failed")
        case ev.TaskRetryScheduled():
            c.retries += 1
            task = view.in_flight.get(e.eval_id)
            _end_attempt(view, task)
            if task is not None:
                task.stage, task.attempt = "retrying", e.attempt
        case ev.TaskRecovered():
            c.recovered += 1
            task = view.in_flight.get(e.eval_id)
            if e.action == "lease_lost":
                _end_attempt(view, view.in_flight.pop(e.eval_id, None))
                view.cancels.pop(e.eval_id, None)
            elif task is not None:
                _end_attempt(view, task)
                task.stage, task.worker_id = "recovered", entry.worker_id
        case ev.TaskRestored():
            _end_attempt(view, view.in_flight.get(e.eval_id))
            held = view.in_flight[e.eval_id] = _held(entry, e)
            held.stage, held.executor, held.attempt = e.stage, e.executor, e.attempt
            if e.stage == "dispatched" and e.executor is not None:
                _executor(view, e.executor).in_flight += 1
        case ev.TaskLeaseLost():
            c.leases_lost += 1
            task = view.in_flight.get(e.eval_id)
            if task is not None:
                task.leased = False
        case ev.WorkerFenced():
            owner = _worker(view, e.owner)
            owner.running = False
            owner.fenced_generation = max(owner.fenced_generation or 0, e.generation)
        case ev.LoopCrashed():
            c.loop_crashes += 1
        case ev.StreamReset():
            c.stream_resets += 1
        case ev.EntryDeadLettered():
            c.dead_lettered += 1
        case ev.TaskReported():
            c.reported += 1
            view.unreported.pop(e.eval_id, None)
        case ev.ExecutorHealthChanged():
            x = _executor(view, e.executor)
            x.healthy, x.health_changed_ts, x.health_reason = e.healthy, entry.ts, e.reason
        case ev.ExecutorEjected():
            x = _executor(view, e.executor)
            x.ejected, x.ejections = True, x.ejections + 1
            x.ejected_until_ts = entry.ts + round(e.ejection_s * 1000)
        case ev.ExecutorThrottled():
            x = _executor(view, e.executor)
            x.throttles += 1
            x.cooling_until_ts = entry.ts + round(e.cooldown_s * 1000)
            task = view.in_flight.get(e.eval_id)
            _end_attempt(view, task)  # not run there: routed again, same attempt
            if task is not None:
                task.stage = "throttled"
        case ev.ExecutorRejoined():
            x = _executor(view, e.executor)
            x.ejected, x.ejected_until_ts = False, None
        case ev.ExecutorAdded():
            x = _executor(view, e.executor)
            x.removed, x.capacity = False, e.capacity
        case ev.ExecutorRemoved():
            _executor(view, e.executor).removed = True
        case ev.ExecutorCapacityChanged():
            _executor(view, e.executor).capacity = e.capacity
        case ev.ControlPaused():
            view.paused[e.scope] = PauseView(e.by, e.reason, entry.ts, entry.id)
        case ev.ControlResumed():
            view.paused.pop(e.scope, None)
        case ev.ExecutorDrained():
            view.drained[e.executor] = PauseView(e.by, e.reason, entry.ts, entry.id)
        case ev.ExecutorUndrained():
            view.drained.pop(e.executor, None)
        case ev.TaskCancelRequested() if e.eval_id in view.in_flight:
            if e.eval_id not in view.cancels:  # the first request stands
                view.cancels[e.eval_id] = PauseView(e.by, e.reason, entry.ts, entry.id)
    return view


def fold(entries: list[Entry], view: StatusView | None = None) -> StatusView:
    view = StatusView() if view is None else view
    for entry in entries:
        apply(view, entry)
    return view
