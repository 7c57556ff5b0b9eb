"""``queue-worker openapi``: print the OpenAPI document without starting anything."""

from __future__ import annotations

import argparse
import sys


def show(args: argparse.Namespace) -> int:
    from queue_worker.http.docs import build_spec
    from queue_worker.openapi.spec import dump_json, dump_yaml

    spec = build_spec(server_url=args.server_url)
    sys.stdout.write(dump_yaml(spec) if args.yaml else dump_json(spec))
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``openapi`` command."""
    parser = subparsers.add_parser(
        "openapi",
        help="print the OpenAPI document of the HTTP API (JSON, or YAML with --yaml)",
        description="Print the OpenAPI 3.1 document of the HTTP API, the event stream and the "
        "pub/sub messages. Starts nothing and needs neither Redis nor the network.",
    )
    parser.add_argument("--yaml", action="store_true", help="print YAML instead of JSON")
    parser.add_argument("--server-url", metavar="URL", help="list URL as the API's server")
    parser.set_defaults(func=show)
