"""How a task ends when it fails, and the text its outcome carries cut to size.

The attempts (:mod:`queue_worker.router.attempts`) end a task with one terminal
event: ``task.completed``, or ``task.failed`` built here for each way it fails
(no healthy executor, past its deadline, the retry budget spent, the last
attempt failed), its error followed by what each earlier attempt ran into.
Text from an executor is cut to a size in bytes (:func:`cap_text`) before it is
recorded.
"""

from __future__ import annotations

from typing import Any

from queue_worker.router.dispatch import ExecutionFailed
from queue_worker.router.executor_state import ExecutorState
from queue_worker.streams import events as ev
from queue_worker.streams.budget import RetryBudget, Verdict

NO_HEALTHY_EXECUTOR = "no_healthy_executor"
DEADLINE_EXCEEDED = "deadline_exceeded"
RETRY_BUDGET_EXHAUSTED = "retry_budget_exhausted"
EJECT_REASON_BYTES = 200  # of an executor's error kept in an ejection's reason
Terminal = ev.TaskCompleted | ev.TaskFailed


def cap_text(text: str, max_bytes: int) -> tuple[str, bool]:
    """``text`` cut to ``max_bytes`` of UTF-8 (on a character boundary), and whether it was."""
    if len(text) * 4 <= max_bytes:
        return text, False
    data = text.encode()
    if len(data) <= max_bytes:
        return text, False
    return data[:max_bytes].decode(errors="ignore"), True


def cap_result(result: dict[str, Any], max_bytes: int) -> tuple[dict[str, Any], bool]:
    """The result with its ``output`` and ``error`` strings cut to ``max_bytes`` each."""
    capped, cut = dict(result), False
    for field in ("output", "error"):
        value = capped.get(field)
        if isinstance(value, str):
            capped[field], was_cut = cap_text(value, max_bytes)
            cut = cut or was_cut
    return capped, cut


def with_history(error: str, earlier: list[ev.AttemptFailure]) -> str:
    """The last error, followed by what each earlier attempt ran into."""
    if not earlier:
        return error
    history = "; ".join(
        f"attempt {f.attempt} on {f.executor}: {f.reason}: {f.error}" for f in earlier
    )
    return f"{error} (earlier: {history})"


def no_executor(task: ev.Task, attempt: int, failures: list[ev.AttemptFailure]) -> Terminal:
    error = "no healthy executor available"
    last = ev.AttemptFailure(
        attempt=attempt, executor=None, reason=NO_HEALTHY_EXECUTOR, error=error
    )
    return ev.TaskFailed(
        eval_id=task.eval_id,
        attempt=attempt,
        reason=NO_HEALTHY_EXECUTOR,
        error=with_history(error, failures),
        attempts=[*failures, last],
    )


def over_budget(
    task: ev.Task,
    attempt: int,
    chosen: ExecutorState,
    outcome: ExecutionFailed,
    failures: list[ev.AttemptFailure],
    verdict: Verdict,
    budget: RetryBudget,
) -> Terminal:
    why = verdict.explain(budget.percent, budget.least)
    error = f"{failures[-1].error}; not retried, the retry budget is spent: {why}"
    return ev.TaskFailed(
        eval_id=task.eval_id,
        executor=chosen.url,
        attempt=attempt,
        reason=RETRY_BUDGET_EXHAUSTED,
        error=with_history(error, failures[:-1]),
        result=outcome.result,
        duration_ms=outcome.duration_ms,
        attempts=failures,
    )


def past_deadline(
    task: ev.Task, attempt: int, late_s: float, failures: list[ev.AttemptFailure]
) -> Terminal:
    error = f"deadline passed {late_s:.3f}s before attempt {attempt} could be dispatched"
    last = ev.AttemptFailure(attempt=attempt, executor=None, reason=DEADLINE_EXCEEDED, error=error)
    return ev.TaskFailed(
        eval_id=task.eval_id,
        attempt=attempt,
        reason=DEADLINE_EXCEEDED,
        error=with_history(error, failures),
        attempts=[*failures, last],
    )


def failed(
    task: ev.Task,
    attempt: int,
    chosen: ExecutorState,
    outcome: ExecutionFailed,
    failures: list[ev.AttemptFailure],
) -> Terminal:
    return ev.TaskFailed(
        eval_id=task.eval_id,
        executor=chosen.url,
        attempt=attempt,
        reason=outcome.reason,
        error=with_history(failures[-1].error, failures[:-1]),
        result=outcome.result,
        duration_ms=outcome.duration_ms,
        attempts=failures,
    )
