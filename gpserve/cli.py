"""The ``gpserve`` command."""
from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .config import Config
from .flags import add_serve_arguments, from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gpserve", description="A GraphPipe inference server.",
        epilog="Every flag also reads a GP_* environment variable, shown in brackets.")
    parser.add_argument("--version", action="version", version=f"gpserve {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="serve one model over HTTP",
                                description="Serve one model over HTTP (GraphPipe).")
    add_serve_arguments(serve)
    cache = commands.add_parser("cache", help="look at or empty the row cache",
                                description="Row caches: one LMDB environment per model.")
    cache.add_argument("action", choices=["stats", "clear"])
    cache.add_argument("--cache-dir", default=os.environ.get("GP_CACHE_DIR") or Config.cache_dir,
                       help="the folder given to gpserve serve --cache-dir [GP_CACHE_DIR]")
    cache.add_argument("--model", help="clear only this model's cache (its name)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        from .supervisor import serve as run
        return run(from_args(args))
    if args.command == "cache":
        from gpserve.cache import admin
        return admin.show(args.cache_dir) if args.action == "stats" else admin.clear(
            args.cache_dir, args.model)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
