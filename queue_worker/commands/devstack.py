"""``queue-worker devstack``: run the reference Queue Service or a simulated executor."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from queue_worker.devstack.modes import EXECUTE_MODES, HEALTH_MODES


def _announce(what: str, host: str, port: int) -> Callable[..., None]:
    """A ``print`` replacement for ``web.run_app`` that writes one line."""

    def announce(*_: Any, **__: Any) -> None:
        print(f"devstack {what} listening on http://{host}:{port} (Ctrl+C to stop)", flush=True)

    return announce


def _run_queue(args: argparse.Namespace) -> int:
    from aiohttp import web

    from queue_worker.devstack.queue import create_queue_app

    app = create_queue_app(api_key=args.api_key)
    web.run_app(app, host=args.host, port=args.port, print=_announce("queue", args.host, args.port))
    return 0


def _run_executor(args: argparse.Namespace) -> int:
    from aiohttp import web

    from queue_worker.devstack.executor import create_executor_app

    try:
        app = create_executor_app(
            args.id,
            latency_s=args.latency_ms / 1000,
            failure_rate=args.failure_rate,
            capacity=args.capacity,
            health=args.health,
            execute=args.execute,
            seed=args.seed,
        )
    except ValueError as exc:
        print(f"devstack executor: {exc}", file=sys.stderr)
        return 2
    announce = _announce(f"executor {args.id}", args.host, args.port)
    web.run_app(app, host=args.host, port=args.port, print=announce)
    return 0


def _add_bind(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, default=port, help="TCP port (default: %(default)s)")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``devstack`` command (``queue`` and ``executor`` subcommands)."""
    devstack = subparsers.add_parser(
        "devstack",
        help="run a reference Queue Service or a simulated executor",
        description="Local stand-ins for the services the queue worker talks to.",
    )
    commands = devstack.add_subparsers(dest="devstack_command", required=True, metavar="SERVICE")
    _register_queue(commands)
    _register_executor(commands)


def _register_queue(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    queue = commands.add_parser(
        "queue",
        help="in-memory Queue Service (GET /tasks/next, POST /tasks/{id}/complete|fail)",
        description="Reference Queue Service with an in-memory priority queue. "
        "Also serves POST /tasks to enqueue, GET /stats, POST /_inject (the next answer of "
        "GET /tasks/next) and POST /_expire/{eval_id} (a lease runs out now) for tests.",
    )
    _add_bind(queue, 8081)
    queue.add_argument(
        "--api-key", default=None, help="require this X-API-Key header on /tasks* (default: none)"
    )
    queue.set_defaults(func=_run_queue)


def _register_executor(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    executor = commands.add_parser(
        "executor",
        help="simulated executor (never runs the submitted code)",
        description="Simulated Executor Service: answers POST /execute after a delay with a "
        "canned result. Code containing SIMULATE_FAIL or SIMULATE_TIMEOUT gets a failed or "
        "timeout result. Behaviour can be changed at runtime with POST /_control.",
    )
    _add_bind(executor, 8083)
    executor.add_argument(
        "--id", default="executor-1", help="executor id reported in answers (default: %(default)s)"
    )
    executor.add_argument(
        "--latency-ms",
        type=float,
        default=50,
        help="simulated execution time in milliseconds (default: %(default)s)",
    )
    executor.add_argument(
        "--failure-rate",
        type=float,
        default=0.0,
        help="probability in [0, 1] that an execution fails (default: %(default)s)",
    )
    executor.add_argument(
        "--capacity",
        type=int,
        default=None,
        help="max concurrent executions; more get 503 'executor busy' (default: unlimited)",
    )
    executor.add_argument(
        "--health",
        choices=HEALTH_MODES,
        default="healthy",
        help="GET /health behaviour (default: %(default)s)",
    )
    executor.add_argument(
        "--execute",
        choices=EXECUTE_MODES,
        default="normal",
        help="POST /execute behaviour (default: %(default)s)",
    )
    executor.add_argument(
        "--seed", type=int, default=None, help="seed for the failure draws (default: random)"
    )
    executor.set_defaults(func=_run_executor)
