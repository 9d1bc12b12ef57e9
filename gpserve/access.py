"""One request's metrics and access-log line, for every door of a front (GraphPipe,
the Open Inference Protocol's REST and gRPC): the same fields whichever it came by."""
from __future__ import annotations

import logging

from . import metrics

access_log = logging.getLogger("gpserve.access")


class AccessLog:
    """``--access-log``: the level of the line logged for every request (or off)."""

    def __init__(self, level: str):
        self.level = None if level == "off" else logging.getLevelName(level.upper())

    def record(self, client: str | None, method: str, path: str, status: int, kind: str,
               size: int, sent: int, seconds: float) -> None:
        """Metrics, and the access-log line, for one request. ``client``: its address."""
        metrics.REQUESTS.labels(str(status), kind).inc()
        metrics.REQUEST_SECONDS.observe(seconds)
        if self.level is not None and access_log.isEnabledFor(self.level):
            host = client or "-"
            access_log.log(self.level, '%s "%s %s" %d %s in=%d out=%d %.2fms',
                           host, method, path, status, kind, size, sent, seconds * 1e3,
                           extra={"fields": {"client": host, "method": method,
                                             "path": path, "status": status,
                                             "kind": kind, "bytes_in": size, "bytes_out": sent,
                                             "ms": round(seconds * 1e3, 3)}})
