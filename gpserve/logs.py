"""Logging setup shared by every process: one line per event, tagged with the process role."""
from __future__ import annotations

import logging
import sys


def setup(verbose: int, role: str) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    if role == "supervisor" and verbose <= 0:
        level = logging.INFO
    logging.basicConfig(
        level=level, stream=sys.stderr, force=True,
        format=f"%(asctime)s %(levelname)s {role} %(name)s: %(message)s")
