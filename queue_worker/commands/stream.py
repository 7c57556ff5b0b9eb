"""``queue-worker audit | tail | replay | stream-info | list``: the operator's look at the
stream and the task index."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from queue_worker.config import Settings

if TYPE_CHECKING:
    from queue_worker.streams.store import EventStore

ENV = (
    "Reads REDIS_URL (with rediss://, REDIS_CA_FILE, REDIS_CERT_FILE and REDIS_KEY_FILE) "
    "and STREAM_PREFIX."
)


def _whole(text: str) -> int:
    """A whole number from 1 to 100000 (argparse says which argument when it is not)."""
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 100_000:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to 100000, got {text!r}")
    return int(text)


def on_stream(settings: Settings, work: Callable[[EventStore], Awaitable[int]]) -> int:
    """Run ``work`` on the store of the settings' stream (``REDIS_URL``, its TLS files,
    ``STREAM_PREFIX``); its exit code."""
    from queue_worker.streams import operate
    from queue_worker.streams.connection import RedisTls

    tls = RedisTls(settings.redis_ca_file, settings.redis_cert_file, settings.redis_key_file)
    return asyncio.run(
        operate.with_store(
            settings.redis_url, settings.redacted_redis_url(), settings.stream_prefix, work, tls
        )
    )


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    """The command that runs ``queue_worker.streams.operate.<name>`` on the stream."""

    def run(args: argparse.Namespace) -> int:
        from queue_worker.streams import operate

        work = getattr(operate, name)
        return on_stream(Settings.from_env(), lambda store: work(args, store))

    return run


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``audit``, ``tail``, ``replay``, ``stream-info`` and ``list`` commands."""
    audit = subparsers.add_parser(
        "audit",
        help="print one evaluation's history from the stream",
        description="Print every stream event of one evaluation, oldest first, with the time "
        f"between steps. Exits 1 when there is none. {ENV}",
    )
    audit.add_argument("eval_id", metavar="EVAL_ID")
    audit.add_argument("--json", action="store_true", help="print the entries as JSON")
    audit.set_defaults(func=_command("audit"))
    _register_tail(subparsers)
    replay = subparsers.add_parser(
        "replay",
        help="rebuild the status view from the stream and print it as JSON",
        description="Fold the stream (from its start, --from ID or --since TIME) into the status "
        f"view, as the worker does on start, and print it as JSON. {ENV}",
    )
    start = replay.add_mutually_exclusive_group()
    start.add_argument("--from", dest="from_id", metavar="ID", help="first stream id to fold")
    start.add_argument(
        "--since", metavar="ISO-TIME", help="fold entries from this time on (UTC unless given)"
    )
    replay.set_defaults(func=_command("replay"))
    info = subparsers.add_parser(
        "stream-info",
        help="the streams' length, first and last entry, consumer groups with pending and lag",
        description="Describe the event stream and the outcome stream (the publisher's and "
        f"the reporter's groups read it), each with its consumer groups. {ENV}",
    )
    info.add_argument("--json", action="store_true", help="print as JSON")
    info.set_defaults(func=_command("show_stream_info"))
    listing = subparsers.add_parser(
        "list",
        help="tasks in one state from the task index, latest first",
        description="List the tasks in a state (waiting, in_flight, completed, failed), the "
        f"latest to enter it first, from the task index the worker keeps. {ENV}",
    )
    listing.add_argument(
        "--state", required=True, choices=("waiting", "in_flight", "completed", "failed")
    )
    listing.add_argument("--executor", help="only tasks last on this executor (its URL)")
    listing.add_argument("--since", metavar="ISO-TIME", help="entered the state at or after")
    listing.add_argument("--limit", type=_whole, default=50, metavar="N", help="at most N (50)")
    listing.add_argument("--json", action="store_true", help="print each task as one JSON line")
    listing.set_defaults(func=_command("list_tasks"))


def _register_tail(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tail = subparsers.add_parser(
        "tail",
        help="follow the event stream live, one line per entry",
        description=f"Follow the event stream (XREAD BLOCK) and print each entry. {ENV}",
    )
    tail.add_argument(
        "--type",
        action="append",
        metavar="TYPE",
        help="only this event type; a glob like 'task.*' works; repeat for several",
    )
    tail.add_argument("--executor", help="only events about this executor (its URL or part of it)")
    tail.add_argument("--eval-id", help="only events of this evaluation")
    tail.add_argument(
        "--from-start", action="store_true", help="start at the first entry, not the next one"
    )
    tail.add_argument("--count", type=int, metavar="N", help="stop after N matching entries")
    tail.add_argument(
        "--last", type=_whole, metavar="N", help="first show the last N entries, then follow"
    )
    tail.add_argument("--json", action="store_true", help="print each entry as one JSON line")
    tail.set_defaults(func=_command("tail"))
