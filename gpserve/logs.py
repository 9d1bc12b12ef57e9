"""Logging for every process: one line per event, as text or JSON, tagged with the process.

JSON lines carry ``time``, ``level``, ``process`` (front0, worker1, ...), ``pid``,
``logger`` and ``message``, plus the structured ``fields`` a record was logged with
(the access log's status, bytes and duration, the startup summary's settings).
"""
from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                + f".{int(record.msecs):03d}Z", "level": record.levelname,
                "process": self.role, "pid": record.process, "logger": record.name,
                "message": record.getMessage()}
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup(verbose: int, role: str, fmt: str = "text") -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    if role == "supervisor" and verbose <= 0:
        level = logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(role) if fmt == "json" else logging.Formatter(
        f"%(asctime)s %(levelname)s {role} %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


LOG_EVERY_S = 10.0


class Notes:
    """Rate-limited warnings for guards that act on clients (a timeout, a bound): each
    act is counted in ``gpserve_connections_refused_total{reason}``; the first is
    logged at once, then one summary per LOG_EVERY_S, so a hostile client cannot turn
    the log into its amplifier."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.last: dict[str, float] = {}

    def acted(self, reason: str, message: str) -> None:
        from . import metrics  # not at import: a process sets up metrics first
        metrics.CONNECTIONS_REFUSED.labels(reason).inc()
        self.counts[reason] = self.counts.get(reason, 0) + 1
        now = time.monotonic()
        last = self.last.get(reason)
        if last is None or now - last >= LOG_EVERY_S:
            log = logging.getLogger("gpserve.front")
            if last is None:
                log.warning("%s", message)
            else:
                log.warning("%s (%d times in the last %.0f s)", message, self.counts[reason],
                            now - last)
            self.counts[reason], self.last[reason] = 0, now


NOTES = Notes()
