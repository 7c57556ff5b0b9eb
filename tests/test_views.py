"""The status view is a pure fold: the same entries always give the same view."""

from __future__ import annotations

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from queue_worker.streams import events as ev
from queue_worker.streams.events import Entry, Task
from queue_worker.streams.views import DURATIONS_KEPT, StatusView, apply, fold

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


def test_outcomes_per_second_for_five_minutes_and_durations_per_executor() -> None:
    es = entries_for("t1", A, True, 0) + entries_for("t2", B, False, 1_000)
    es += entries_for("t3", A, True, 290_500) + entries_for("t4", A, True, 302_000)
    view = fold(es)
    # Seconds more than five minutes older than the newest outcome are dropped.
    assert view.finished_per_s == {290: [1, 0], 302: [1, 0]}
    assert fold(es[:12]).finished_per_s == {0: [1, 0], 1: [0, 1]}
    assert view.durations_ms == {A: [1, 1, 1]}  # task.completed only
    many = [e for i in range(300) for e in entries_for(f"m{i}", B, True, i)]
    assert len(fold(many).durations_ms[B]) == DURATIONS_KEPT


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


def test_entries_of_a_fenced_generation_after_the_fence_are_ignored() -> None:
    started = ev.WorkerStarted(version="1", executors=[A], strategy="rr", capacity=1)
    es = [Entry("1-0", W, 1, started, gen=3), *entries_for("t1", A, True, 10)[:3]]
    es = [msgspec.structs.replace(e, gen=3) for e in es]
    fenced = Entry("20-0", "w2", 20, ev.WorkerFenced(owner=W, generation=3), gen=1)
    late = msgspec.structs.replace(entries_for("t1", A, True, 30)[3], gen=3)
    restarted = Entry("40-0", W, 40, started, gen=4)
    view = fold([*es, fenced, late])
    assert view.ignored == 1 and "t1" in view.in_flight  # the late outcome did not count
    assert view.workers[W].counters.completed == 0 and not view.workers[W].running
    apply(view, restarted)
    assert view.workers[W].running and view.workers[W].generation == 4


def test_a_restored_task_is_held_again_and_a_restored_outcome_not_counted_twice() -> None:
    es = entries_for("t1", A, True, 10)
    task = Task(eval_id="t1", code="x")
    restored = ev.TaskRestored(eval_id="t1", task=task, stage="dispatched", executor=A, attempt=1)
    view = fold([*es[:3], Entry("15-0", W, 15, restored)])
    held = view.in_flight["t1"]
    assert (held.stage, held.executor, held.pulled_id) == ("dispatched", A, "15-0")
    assert view.executors[A].in_flight == 1  # the restored dispatch replaces the first one
    apply(view, es[3])
    again = msgspec.structs.replace(es[3].event, restored=True)
    apply(view, Entry("16-0", W, 16, again))
    assert view.workers[W].counters.completed == 1 and view.executors[A].completed == 1
    assert view.executors[A].in_flight == 0 and view.unreported == {"t1": "completed"}


def test_pull_closed_and_duplicate_handouts_close_the_open_pull() -> None:
    view = fold([Entry("1-0", W, 1, ev.PullStarted(pull_id="p1"))])
    assert view.workers[W].open_pull == "p1"
    apply(view, Entry("2-0", W, 2, ev.PullClosed(pull_id="p1", reason="shutdown")))
    assert view.workers[W].open_pull is None
    apply(view, Entry("3-0", W, 3, ev.PullStarted(pull_id="p2")))
    dup = ev.TaskDuplicateHandout(eval_id="t", pull_id="p2", holder="w2 1")
    apply(view, Entry("4-0", W, 4, dup))
    assert view.workers[W].open_pull is None
    assert view.workers[W].counters.duplicate_handouts == 1
