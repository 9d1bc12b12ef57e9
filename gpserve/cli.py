"""The ``gpserve`` command."""
from __future__ import annotations

import argparse
import sys

from . import __version__
from .config import add_serve_arguments, from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gpserve", description="A GraphPipe inference server.",
        epilog="Every flag also reads a GP_* environment variable, shown in brackets.")
    parser.add_argument("--version", action="version", version=f"gpserve {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="serve one model over HTTP",
                                description="Serve one model over HTTP (GraphPipe).")
    add_serve_arguments(serve)
    args = parser.parse_args(argv)
    if args.command == "serve":
        from .supervisor import serve as run
        return run(from_args(args))
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
