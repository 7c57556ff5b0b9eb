"""Example bodies of the OpenAPI document, typed as the Structs they illustrate.

Built from the same types the code answers with, so an example cannot name a field the
schema does not have. Each is used by one declaration (see the route tables) or by the
document's shared parts (:mod:`queue_worker.openapi.spec`).
"""

from __future__ import annotations

import msgspec

from queue_worker import __version__
from queue_worker.openapi import schemas as s
from queue_worker.streams import events as ev
from queue_worker.streams.keys import Keys
from queue_worker.streams.publisher import CompletedMessage, FailedMessage
from queue_worker.streams.redaction import redact_event
from queue_worker.streams.views import Counters

WORKER = "queue-worker-1"
EXECUTORS = ("http://executor-1:8083", "http://executor-2:8083")
STREAM_ID = "1735689600000-0"
COUNTERS = Counters(pulled=120, routed=121, completed=110, failed=9, reported=119)

# --- /health and /health/live ----------------------------------------------------------------

HEALTHY = s.HealthResponse(
    status="healthy",
    worker_id=WORKER,
    redis=True,
    queue_reachable=True,
    executors_healthy=2,
    executors_total=2,
    loops_dead=[],
    executors=[s.ExecutorHealth(url=u, healthy=True, reason="ok") for u in EXECUTORS],
)
DEGRADED = msgspec.structs.replace(
    HEALTHY,
    status="degraded",
    executors_healthy=0,
    executors=[
        s.ExecutorHealth(url=u, healthy=False, reason="no health answer within 2s")
        for u in EXECUTORS
    ],
    reasons=["no healthy executor"],
)
ALIVE = s.LivenessResponse(status="alive")
FAILING = s.LivenessResponse(
    status="failing",
    reason="loop publisher keeps failing: ResponseError: WRONGTYPE Operation against "
    "a key holding the wrong kind of value",
)

# --- /status ---------------------------------------------------------------------------------


def _executor(index: int, url: str) -> s.ExecutorStatus:
    return s.ExecutorStatus(
        url=url,
        healthy=True,
        health_reason="ok",
        last_check_ms=1_735_689_600_000,
        latency_ms=1.8,
        capacity=1,
        in_flight=index,
        routed=60 + index,
        completed=55,
        failed=4 + index,
    )


STATUS = s.StatusResponse(
    worker_id=WORKER,
    version=__version__,
    strategy="round_robin",
    uptime_s=3600.5,
    in_flight=2,
    waiting=1,
    routed_last_minute=12,
    counters=COUNTERS,
    live=s.LiveCounters(
        polls=900,
        empty_polls=780,
        published=119,
        report_errors=0,
        events_appended=860,
        append_round_trips=410,
        folded_as_written=846,
        folded_parked=2,
        read_back=14,
    ),
    queue=s.QueueStatus(url="http://queue:8081", reachable=True, consecutive_errors=0),
    executors=[_executor(i, u) for i, u in enumerate(EXECUTORS)],
    stream=s.StreamStatus(
        key=Keys().events,
        length=860,
        last_id=STREAM_ID,
        projectors=[
            s.ProjectorStatus(name="status", last_id=STREAM_ID),
            s.ProjectorStatus(name="publisher", last_id=STREAM_ID, pending=0, lag=0),
            s.ProjectorStatus(name="reporter", last_id="1735689599000-3", pending=1, lag=2),
        ],
    ),
    fleet=[
        s.FleetMember(worker_id=WORKER, alive=True, running=True, in_flight=1, counters=COUNTERS)
    ],
)

# --- task views ------------------------------------------------------------------------------

_EXECUTOR = "http://executor-1:8083"
TASK_HISTORY = s.TaskHistory(
    eval_id="eval-42",
    state="completed",
    executor=_EXECUTOR,
    entries=[
        s.TaskEntry(
            id="1764590000000-0",
            ts=1764590000000,
            worker_id=WORKER,
            event=msgspec.to_builtins(
                ev.TaskDispatched(eval_id="eval-42", executor=_EXECUTOR, attempt=1, timeout_s=30.0)
            ),
        ),
        s.TaskEntry(
            id="1764590000120-0",
            ts=1764590000120,
            worker_id=WORKER,
            event=redact_event(
                msgspec.to_builtins(
                    ev.TaskCompleted(
                        eval_id="eval-42",
                        executor=_EXECUTOR,
                        attempt=1,
                        result={"status": "completed", "output": "4\n", "exit_code": 0},
                        duration_ms=118.0,
                    )
                )
            ),
        ),
    ],
)
TASK_LIST = s.TaskList(
    state="failed",
    tasks=[
        s.TaskStateRow(
            eval_id="eval-41", state="failed", executor=_EXECUTOR, since_ms=1764590000120
        )
    ],
    next_cursor="1764590000120:eval-41",
)
TASK_UNKNOWN = s.ErrorResponse(
    error="Not Found", status=404, detail="no entry about 'eval-43' in the stream"
)
BAD_EVAL_ID = s.ErrorResponse(
    error="Bad Request", status=400, detail="eval_id must be 1 to 256 characters"
)
BAD_TASK_QUERY = s.ErrorResponse(
    error="Bad Request",
    status=400,
    detail="state must be one of waiting, in_flight, completed, failed",
)

# --- admin actions ---------------------------------------------------------------------------

PAUSE_RECORDED = s.ActionRecorded(action="pause", scope="fleet", by="ops", entry_id=STREAM_ID)
RESUME_RECORDED = s.ActionRecorded(action="resume", scope="fleet", by="ops", entry_id=STREAM_ID)
DRAIN_RECORDED = s.ActionRecorded(
    action="drain", scope="http://executor-2:8083", by="ops", entry_id=STREAM_ID
)
UNDRAIN_RECORDED = s.ActionRecorded(
    action="undrain", scope="http://executor-2:8083", by="ops", entry_id=STREAM_ID
)
BAD_ACTION = s.ErrorResponse(
    error="Bad Request",
    status=400,
    detail="the body is not what PauseRequest expects: Object missing required field `reason`",
)
CANCEL_RECORDED = s.ActionRecorded(action="cancel", scope="eval-42", by="ops", entry_id=STREAM_ID)
RETRY_RECORDED = s.RetryRecorded(
    action="retry",
    scope="eval-42",
    by="ops",
    entry_id=STREAM_ID,
    new_eval_id="eval-42-retry-1",
    queue="http://queue:8081",
)
BAD_TASK_ACTION = s.ErrorResponse(
    error="Bad Request",
    status=400,
    detail="the body is not what TaskActionRequest expects: Object missing required field `reason`",
)
CANCEL_UNKNOWN = s.ErrorResponse(
    error="Not Found",
    status=404,
    detail="no worker pulled 'eval-43' (or its entries were trimmed): only tasks a worker "
    "has pulled can be cancelled here; a task still in the queue is the queue's to remove",
)
CANCEL_FINISHED = s.ErrorResponse(
    error="Conflict",
    status=409,
    detail="'eval-42' is already completed: only a task in flight can be cancelled (a "
    "finished one can be retried)",
)
RETRY_UNKNOWN = s.ErrorResponse(
    error="Not Found", status=404, detail="no entry about 'eval-43' in the stream"
)
RETRY_NOT_FINISHED = s.ErrorResponse(
    error="Conflict",
    status=409,
    detail="'eval-42' is in_flight: only a completed or failed task can be retried",
)
QUEUE_REFUSED = s.ErrorResponse(
    error="Bad Gateway",
    status=502,
    detail="the queue at http://queue:8081 answered HTTP 500: internal error",
)
NEED_ADMIN = s.ErrorResponse(
    error="Forbidden", status=403, detail="this action needs an ADMIN_TOKEN"
)

# --- errors ----------------------------------------------------------------------------------

NOT_FOUND = s.ErrorResponse(error="Not Found", status=404, detail="404: Not Found")
NOT_ALLOWED = s.ErrorResponse(
    error="Method Not Allowed", status=405, detail="405: Method Not Allowed"
)
REDIS_DOWN = s.ErrorResponse(error="Service Unavailable", status=503, detail="Redis is unreachable")
UNAUTHORIZED = s.ErrorResponse(
    error="Unauthorized",
    status=401,
    detail="send 'Authorization: Bearer <token>' with an API_TOKEN or ADMIN_TOKEN",
)
FORBIDDEN = s.ErrorResponse(
    error="Forbidden", status=403, detail="full payloads (payloads=1) need an ADMIN_TOKEN"
)
TICKET = s.TicketResponse(ticket="q3JvYm9zZS1leGFtcGxlLXRpY2tldC0xMjM0NTY3ODkw", expires_in_s=30.0)
TOO_LARGE = s.ErrorResponse(
    error="Content Too Large",
    status=413,
    detail="the request body is larger than 65536 bytes (HTTP_MAX_BODY_BYTES)",
)
TOO_MANY_STREAMS = s.ErrorResponse(
    error="Service Unavailable",
    status=503,
    detail="at most 4 live streams at once per client address (STREAM_MAX_PER_CLIENT)",
)

# --- pub/sub messages ------------------------------------------------------------------------

_RESULT = {
    "eval_id": "eval-42",
    "status": "completed",
    "output": "4\n",
    "error": None,
    "exit_code": 0,
    "executor_id": "executor-1",
}
COMPLETED = CompletedMessage("eval-42", _RESULT)
COMPLETED_TRUNCATED = CompletedMessage(
    "eval-44",
    {**_RESULT, "eval_id": "eval-44", "output": "0123456789" * 8 + "..."},
    truncated=True,
    result_key="{queue-worker}:result:eval-44",
)
FAILED = FailedMessage(
    "eval-43",
    "executor timed out after 30s",
    {**_RESULT, "eval_id": "eval-43", "status": "timeout", "output": "", "exit_code": -1},
)
