"""``queue-worker run`` (the service) and ``queue-worker demo`` (the whole stack locally)."""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import sys
from collections.abc import Callable

from queue_worker.config import Settings
from queue_worker.logs import configure_logging


def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer from ``minimum`` on."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(
                f"expected a whole number from {minimum} on, got {text!r}"
            )
        return value

    return parse


def duration_ms(text: str) -> float:
    """An argparse type: a finite number of milliseconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number of milliseconds >= 0, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if args.port is not None:
        settings = settings.with_(port=args.port)
    if args.host is not None:
        settings = settings.with_(host=args.host)
    configure_logging(settings.log_level, settings.log_format)
    from queue_worker.http.app import create_app
    from queue_worker.http.serve import listen, serve, tls_context
    from queue_worker.http.state import FATE

    tls = None
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        tls = tls_context(settings.tls_cert_file, settings.tls_key_file)
    # Listening first: a port in use fails here, before the worker records or starts anything.
    sockets = listen(settings.host, settings.port)
    try:
        # A worker that cannot go on (a loop kept failing, a peer took it over) stops the
        # way SIGTERM stops it, and exits non-zero so that its orchestrator restarts it.
        app = create_app(settings, exit=lambda: signal.raise_signal(signal.SIGTERM))
        grace_s = settings.shutdown_grace_s + 5
        asyncio.run(serve(app, sockets, shutdown_timeout_s=grace_s, tls=tls))
    finally:
        for sock in sockets:
            sock.close()
    reason = app[FATE].reason
    if reason is not None:
        print(f"queue-worker: stopped: {reason}", file=sys.stderr)
        return 1
    return 0


def demo(args: argparse.Namespace) -> int:
    configure_logging("ERROR", "console")
    from queue_worker.devstack import demo

    return demo.main(args.tasks, args.latency_ms, args.capacity, keep=args.keep)


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], environment_help: str
) -> None:
    """Add the ``run`` and ``demo`` commands."""
    service = subparsers.add_parser(
        "run",
        help="run the worker service (configured by environment variables)",
        description="Run the worker: the router, its projectors and the HTTP API "
        "(/health, /status, /docs), over HTTPS when TLS_CERT_FILE and TLS_KEY_FILE are set. "
        "The HTTP address (HOST, PORT) is listened on first: "
        "when it is in use, the command exits 1 before anything starts. SIGTERM or SIGINT "
        "stop it gracefully (exit 0). A worker that cannot go on (a background loop that "
        "keeps failing, or a peer that took it over) stops the same way and exits 1, so "
        "that its orchestrator restarts it.",
        epilog=environment_help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    service.add_argument("--port", type=int, help="HTTP API port; wins over PORT")
    service.add_argument("--host", help="HTTP API address; wins over HOST")
    service.set_defaults(func=run)

    stack = subparsers.add_parser(
        "demo",
        help="run the whole stack locally (own Redis, reference queue, 3 executors) "
        "and route sample tasks",
        description="Start a private redis-server, the reference queue, three simulated "
        "executors and the worker on loopback; enqueue sample tasks, show progress, then "
        "print a summary and the event history of two evaluations.",
    )
    stack.add_argument(
        "--tasks", type=whole_number(1), default=30,
        help="tasks to enqueue, 1 or more (default: 30)",
    )  # fmt: skip
    stack.add_argument(
        "--latency-ms", type=duration_ms, default=200.0,
        help="simulated execution time, 0 or more (default: 200)",
    )  # fmt: skip
    stack.add_argument(
        "--capacity", type=whole_number(1), default=2,
        help="concurrent tasks per executor, 1 or more (default: 2)",
    )  # fmt: skip
    stack.add_argument(
        "--keep",
        action="store_true",
        help="then keep the stack running with a trickle of tasks until Ctrl+C, and print the "
        "dashboard's address and its admin token",
    )
    stack.set_defaults(func=demo)
