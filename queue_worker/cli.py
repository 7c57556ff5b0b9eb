"""``queue-worker``: run the service, the demo, or operator commands.

The commands and their options are in ``queue_worker/commands/``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from queue_worker import __version__, commands
from queue_worker.config import ENVIRONMENT
from queue_worker.errors import ConfigError, QueueWorkerError


def _environment_help() -> str:
    width = max(len(name) for name, _, _ in ENVIRONMENT)
    rows = [
        f"  {name:<{width}}  {meaning} (default: {default})"
        for name, default, meaning in ENVIRONMENT
    ]
    return "environment variables:\n" + "\n".join(rows)


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
    commands.register(sub, _environment_help())
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        for variable, problem in exc.problems:
            print(f"queue-worker: configuration error: {variable}: {problem}", file=sys.stderr)
        return 2
    except QueueWorkerError as exc:
        print(f"queue-worker: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code
