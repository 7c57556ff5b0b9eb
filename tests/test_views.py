"""The status view is a pure fold: the same entries always give the same view."""

from __future__ import annotations

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from queue_worker.streams import events as ev
from queue_worker.streams.events import Entry, Task
from queue_worker.streams.views import StatusView, apply, fold

W = "w1"
A, B = "http://a", "http://b"


def entries_for(eval_id: str, executor: str, ok: bool, start: int) -> list[Entry]:
    task = Task(eval_id=eval_id, code="x")
    terminal: ev.Event = (
        ev.TaskCompleted(eval_id=eval_id, executor=executor, attempt=1, result={}, duration_ms=1)
        if ok
        else ev.TaskFailed(eval_id=eval_id, executor=executor, attempt=1, reason="r", error="e")
    )
    events: list[ev.Event] = [
        ev.TaskPulled(eval_id=eval_id, pull_id="p", task=task, code_bytes=1),
        ev.ExecutorSelected(eval_id=eval_id, executor=executor, strategy="s", attempt=1,
                            candidates=[]),
        ev.TaskDispatched(eval_id=eval_id, executor=executor, attempt=1, timeout_s=30),
        terminal,
        ev.TaskReported(eval_id=eval_id, outcome="completed" if ok else "failed", http_status=200),
    ]  # fmt: skip
    return [Entry(f"{start + i}-0", W, start + i, e) for i, e in enumerate(events)]  # type: ignore[arg-type]


def test_counters_and_executors() -> None:
    started = Entry("1-0", W, 1, ev.WorkerStarted(version="1", executors=[A, B], strategy="rr",
                                                  capacity=1))  # fmt: skip
    view = fold([started, *entries_for("t1", A, True, 10), *entries_for("t2", B, False, 20)])
    c = view.workers[W].counters
    assert (c.pulled, c.routed, c.completed, c.failed, c.reported) == (2, 2, 1, 1, 2)
    assert view.executors[A].completed == 1 and view.executors[B].failed == 1
    assert view.executors[A].in_flight == 0 and view.in_flight == {} and view.unreported == {}
    assert view.last_id == "24-0" and view.events == 11
    assert view.workers[W].running


def test_in_flight_and_unreported_follow_the_task() -> None:
    es = entries_for("t1", A, True, 10)
    view = fold(es[:3])
    assert view.in_flight["t1"].stage == "dispatched" and view.executors[A].in_flight == 1
    apply(view, es[3])
    assert "t1" not in view.in_flight and view.unreported == {"t1": "completed"}
    apply(view, es[4])
    assert view.unreported == {}


def test_health_flips_and_queue_errors() -> None:
    es = [
        Entry("1-0", W, 1, ev.ExecutorHealthChanged(executor=A, healthy=False, reason="down")),
        Entry("2-0", W, 2, ev.QueueUnreachable(consecutive_errors=2, backoff_s=10, reason="x")),
    ]
    view = fold(es)
    assert view.executors[A].healthy is False and view.executors[A].health_reason == "down"
    assert not view.workers[W].queue_reachable and view.workers[W].counters.queue_errors == 1
    apply(view, Entry("3-0", W, 3, ev.QueueRecovered(after_errors=2)))
    assert view.workers[W].queue_reachable


def test_rejected_with_eval_id_waits_for_its_report() -> None:
    e = ev.TaskRejected(pull_id="p", eval_id="bad", reason="r", excerpt="{}")
    view = fold([Entry("1-0", W, 1, e)])
    assert view.workers[W].counters.rejected == 1 and view.unreported == {"bad": "failed"}


def test_routed_in_the_last_minute() -> None:
    view = fold(entries_for("t1", A, True, 0) + entries_for("t2", A, True, 70_000))
    assert view.routed_since(70_000 - 60_000) == 1
    assert list(view.routed_per_s) == [70]  # older seconds are dropped


@given(st.lists(st.tuples(st.booleans(), st.sampled_from([A, B])), max_size=30), st.data())
def test_folding_in_any_split_gives_the_same_view(tasks, data) -> None:
    es: list[Entry] = []
    for i, (ok, executor) in enumerate(tasks):
        es += entries_for(f"t{i}", executor, ok, i * 10)
    cut = data.draw(st.integers(0, len(es)))
    whole = fold(es)
    resumed = fold(es[cut:], fold(es[:cut]))
    assert msgspec.to_builtins(whole) == msgspec.to_builtins(resumed)
    assert msgspec.to_builtins(fold(es)) == msgspec.to_builtins(whole)
    assert isinstance(whole, StatusView)
