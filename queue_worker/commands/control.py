"""``queue-worker pause | resume | drain | undrain | cancel | retry``: the operator's
actions from a shell.

Each appends its event to the stream directly (``REDIS_URL``, ``STREAM_PREFIX``), as
``POST /admin/...`` and ``POST /tasks/{eval_id}/cancel|retry`` do, with ``by`` =
``cli:<login>`` unless ``--by`` names someone; every replica obeys it within a second.
Access to Redis is the credential here. ``retry`` also enqueues the task at the queue
(``QUEUE_SERVICE_URL``, or the queue the task came from; ``QUEUE_API_KEY``).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from queue_worker.commands.stream import on_stream
from queue_worker.config import Settings

if TYPE_CHECKING:
    from queue_worker.streams.store import EventStore

ENV = (
    "Appends to the stream at REDIS_URL (with rediss://, REDIS_CA_FILE, REDIS_CERT_FILE and "
    "REDIS_KEY_FILE) with STREAM_PREFIX; every worker obeys within a second."
)


def _who(args: argparse.Namespace) -> str:
    if args.by:
        return str(args.by)
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no login name in this environment
        return "cli"


def _action(kind: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from queue_worker.streams import events as ev
        from queue_worker.streams import operate

        by, reason = _who(args), args.reason
        event: ev.Event
        match kind:
            case "pause":
                event = ev.ControlPaused(scope=args.worker or ev.FLEET, by=by, reason=reason)
            case "resume":
                event = ev.ControlResumed(scope=args.worker or ev.FLEET, by=by, reason=reason)
            case "drain":
                event = ev.ExecutorDrained(executor=args.executor, by=by, reason=reason)
            case _:
                event = ev.ExecutorUndrained(executor=args.executor, by=by, reason=reason)
        return on_stream(Settings.from_env(), lambda store: operate.record_action(store, event))

    return run


def _task_action(kind: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        settings = Settings.from_env()
        return on_stream(settings, lambda store: _on_task(kind, store, settings, args))

    return run


async def _on_task(
    kind: str, store: EventStore, settings: Settings, args: argparse.Namespace
) -> int:
    import aiohttp

    from queue_worker.http import task_actions as ta
    from queue_worker.streams.audit import printable
    from queue_worker.streams.index import TaskIndex

    index, by, eval_id = TaskIndex(store.redis, store.keys), _who(args), args.eval_id
    try:
        if kind == "cancel":
            entry_id = await ta.request_cancel(store, index, None, eval_id, by, args.reason)
            print(f"{entry_id} task.cancel_requested {printable(eval_id)}")
            return 0
        async with aiohttp.ClientSession() as session:
            enqueue = ta.enqueuer(session, settings)
            entry_id, event = await ta.retry(store, index, enqueue, eval_id, by, args.reason)
        print(
            f"{entry_id} task.retry_requested {printable(eval_id)} -> "
            f"{printable(event.new_eval_id)} at {printable(event.queue)}"
        )
        return 0
    except ta.ActionRefused as exc:
        print(f"queue-worker {kind}: {exc.status} {printable(exc.detail)}", file=sys.stderr)
        return 1


# name, help, and its one argument: (name or option, metavar, help).
WORKER = ("--worker", None, "only this worker (its HOSTNAME); default: every one")
EXECUTOR = ("executor", "EXECUTOR_URL", "the executor, as the worker names it")
EVAL_ID = ("eval_id", "EVAL_ID", "the evaluation")
COMMANDS = (
    ("pause", "stop pulling (tasks in flight finish), for the fleet or --worker", WORKER),
    ("resume", "lift the pause of the fleet or of --worker", WORKER),
    ("drain", "send an executor no new task (its tasks in flight finish)", EXECUTOR),
    ("undrain", "let a drained executor take tasks again", EXECUTOR),
    ("cancel", "cancel an evaluation a worker holds (it ends failed: cancelled)", EVAL_ID),
    ("retry", "enqueue a finished evaluation again, as <eval_id>-retry-<n>", EVAL_ID),
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``pause``, ``resume``, ``drain``, ``undrain``, ``cancel`` and ``retry``."""
    for name, what, (argument, metavar, about) in COMMANDS:
        cmd = subparsers.add_parser(name, help=what, description=f"{what.capitalize()}. {ENV}")
        cmd.add_argument(argument, metavar=metavar, help=about)
        cmd.add_argument("--reason", required=True, help="why (recorded in the event)")
        cmd.add_argument("--by", help="who acts (default: cli:<login name>)")
        task = name in ("cancel", "retry")
        cmd.set_defaults(func=_task_action(name) if task else _action(name))
