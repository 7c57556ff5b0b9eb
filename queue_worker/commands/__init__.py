"""Every command of ``queue-worker``, each registered here with its options.

A command imports what it runs only when it runs: building the parser (for
``--help``, or to run ``tail``) loads neither the service nor the devstack.
"""

from __future__ import annotations

import argparse

from queue_worker.commands import control, devstack, openapi, service, stream


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], environment_help: str
) -> None:
    """Add every command; ``environment_help`` is the epilog of the service commands."""
    service.register(subparsers, environment_help)
    devstack.register(subparsers)
    openapi.register(subparsers)
    stream.register(subparsers)
    control.register(subparsers)
