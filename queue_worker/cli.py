"""``queue-worker``: run the service, the demo, or operator commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from aiohttp import web

from queue_worker import __version__
from queue_worker.config import ENVIRONMENT, Settings
from queue_worker.errors import ConfigError, QueueWorkerError
from queue_worker.logs import configure_logging


def _environment_help() -> str:
    width = max(len(name) for name, _, _ in ENVIRONMENT)
    rows = [
        f"  {name:<{width}}  {meaning} (default: {default})"
        for name, default, meaning in ENVIRONMENT
    ]
    return "environment variables:\n" + "\n".join(rows)


def _settings() -> Settings:
    return Settings.from_env()


def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings()
    if args.port is not None:
        settings = settings.with_(port=args.port)
    if args.host is not None:
        settings = settings.with_(host=args.host)
    configure_logging(settings.log_level, settings.log_format)
    from queue_worker.http.app import create_app

    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        print=None,
        access_log=None,
        shutdown_timeout=settings.shutdown_grace_s + 5,
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    configure_logging("ERROR", "console")
    from queue_worker.devstack import demo

    return demo.main(args.tasks, args.latency_ms, args.capacity)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="queue-worker",
        description="Event-sourced task router: pulls evaluation tasks from the Queue Service, "
        "routes them to healthy executors and records every state change in a Redis Stream.",
        epilog=_environment_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the worker service (configured by environment variables)",
        description="Run the worker: the router, its projectors and the HTTP API "
        "(/health, /status, /docs).",
        epilog=_environment_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--port", type=int, help="HTTP API port; wins over PORT")
    run.add_argument("--host", help="HTTP API address; wins over HOST")
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser(
        "demo",
        help="run the whole stack locally (own Redis, reference queue, 3 executors) "
        "and route sample tasks",
        description="Start a private redis-server, the reference queue, three simulated "
        "executors and the worker on loopback; enqueue sample tasks, show progress, then "
        "print a summary and the event history of two evaluations.",
    )
    demo.add_argument("--tasks", type=int, default=30, help="tasks to enqueue (default: 30)")
    demo.add_argument(
        "--latency-ms", type=float, default=200.0, help="simulated execution time (default: 200)"
    )
    demo.add_argument(
        "--capacity", type=int, default=2, help="concurrent tasks per executor (default: 2)"
    )
    demo.set_defaults(func=cmd_demo)

    from queue_worker.devstack.cli import register as register_devstack
    from queue_worker.openapi.cli import register as register_openapi
    from queue_worker.ops import register as register_ops

    register_devstack(sub)
    register_openapi(sub)
    register_ops(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"queue-worker: configuration error: {exc}", file=sys.stderr)
        return 2
    except QueueWorkerError as exc:
        print(f"queue-worker: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code
