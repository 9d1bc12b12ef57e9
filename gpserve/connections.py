"""Guards on a front's HTTP connections that uvicorn lacks: a header timeout, and a log
line and a count when a guard acts.

uvicorn bounds idle keep-alive connections (``timeout_keep_alive``) and open
connections (``limit_concurrency``: past it, requests get 503), but a client that opens
a connection and sends its headers slowly, or never, holds a file descriptor for as
long as it likes. Here a connection must send a request's headers within
``--header-timeout-s`` of opening or of its first byte; otherwise it gets ``408`` and is
closed. Each guard that acts is counted in ``gpserve_connections_refused_total`` and
logged at most once every ``LOG_EVERY_S`` per front with how many times it acted.

Both clocks (the header timeout, and uvicorn's keep-alive timeout, taken over here) are
read by one sweep per front every eighth of the shorter timeout, not by a timer per
request: arming and cancelling a timer costs about 1.7 us in uvloop, and uvicorn armed
one per response, this guard one per request (two of a front's 60 us per small
request). A connection is closed at most a sweep's interval (1/8 of its timeout) late.
"""
from __future__ import annotations

import logging
import time

from . import metrics

log = logging.getLogger("gpserve.front")
LOG_EVERY_S = 10.0
_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\n"
                     b"content-length: 0\r\n\r\n")


class _Notes:
    """Rate-limited warnings: the first at once, then one summary per LOG_EVERY_S."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.last: dict[str, float] = {}

    def acted(self, reason: str, message: str) -> None:
        metrics.CONNECTIONS_REFUSED.labels(reason).inc()
        self.counts[reason] = self.counts.get(reason, 0) + 1
        now = time.monotonic()
        last = self.last.get(reason)
        if last is None or now - last >= LOG_EVERY_S:
            if last is None:
                log.warning("%s", message)
            else:
                log.warning("%s (%d times in the last %.0f s)", message, self.counts[reason],
                            now - last)
            self.counts[reason], self.last[reason] = 0, now


NOTES = _Notes()
FIRST_REQUEST_GRACE_S = 1.0


class OneWrite:
    """A response's view of its connection: the head (the first write of a response) is
    held and leaves with the first write of the body. uvicorn writes them apart: two
    system calls and two TCP segments for every small response, a tenth of a front's
    time on small requests. A small body is joined to the head (1 copy of it); a large
    one follows it at once."""

    __slots__ = ("transport", "head", "started")
    JOIN_BELOW = 64 * 1024

    def __init__(self, transport):
        self.transport, self.head, self.started = transport, None, False

    def write(self, data) -> None:
        head = self.head
        if head is not None:
            self.head = None
            if len(data) < self.JOIN_BELOW:
                self.transport.write(head + data)
            else:
                self.transport.writelines((head, data))
        elif not self.started and data != CONTINUE:       # the response's head
            self.started, self.head = True, data
        else:
            self.transport.write(data)

    def close(self) -> None:
        if self.head is not None:                          # a response cut short
            self.transport.write(self.head)
            self.head = None
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def sweep_interval(header_timeout_s: float, keepalive_timeout_s: float) -> float:
    """How often a front's connections are checked: an eighth of the shorter timeout."""
    return min(max(min(header_timeout_s, keepalive_timeout_s) / 8, 0.01), 1.0)


def guarded_protocol(header_timeout_s: float, on_count=None):
    """uvicorn's httptools protocol with a header timeout, and its keep-alive timeout
    kept by the same sweep, for ``uvicorn.Config(http=...)`` (uvicorn is imported here,
    in the front that runs it, not by whoever imports us). ``on_count(n)`` hears this
    front's number of open connections when it changes."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        header_due: float | None = None   # loop time: the request's headers must be in
        idle_due: float | None = None     # loop time: an idle connection is closed
        sweeping = False                  # this front's sweep is scheduled (class-wide)

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.header_due = self.loop.time() + header_timeout_s
            if not GuardedHttpToolsProtocol.sweeping:
                GuardedHttpToolsProtocol.sweeping = True
                self.loop.call_later(self._interval(), self._sweep, self.loop,
                                     self.connections)
            if on_count is not None:
                on_count(len(self.connections))

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self.header_due is None:
                self.header_due = self.loop.time() + header_timeout_s

        def on_headers_complete(self) -> None:
            self.header_due = None
            limit = self.limit_concurrency
            if limit is not None and (len(self.connections) >= limit
                                      or len(self.tasks) >= limit):
                NOTES.acted("connection_limit",
                            f"--max-connections {limit} reached: requests get 503")
            super().on_headers_complete()
            cycle = self.cycle
            if (cycle is not None and type(cycle.transport) is not OneWrite
                    and cycle.scope["method"] != "HEAD"):     # HEAD: no body write follows
                cycle.transport = OneWrite(cycle.transport)

        def _unset_keepalive_if_required(self) -> None:
            self.idle_due = None               # uvicorn's: data came, or the end

        def on_response_complete(self) -> None:
            """uvicorn's, with the keep-alive clock read by the sweep, not a timer."""
            self.server_state.total_requests += 1
            if self.transport.is_closing():
                return
            self.idle_due = None
            self.flow.resume_reading()
            if self.pipeline:
                cycle, app = self.pipeline.pop()
                self._start_asgi_task(cycle, app)
            else:
                self.idle_due = self.loop.time() + self.timeout_keep_alive

        def connection_lost(self, exc) -> None:
            self.header_due = None
            super().connection_lost(exc)
            if on_count is not None:
                on_count(len(self.connections))

        def shutdown(self) -> None:
            """The drain: uvicorn closes every connection not in a request, but one that
            was just accepted has its first request on the way (closing it with those
            bytes unread resets it). It gets FIRST_REQUEST_GRACE_S to arrive; answered,
            the connection then closes."""
            if self.cycle is None and not self.transport.is_closing():
                self.loop.call_later(FIRST_REQUEST_GRACE_S, super().shutdown)
                return
            super().shutdown()

        def _interval(self) -> float:
            return sweep_interval(header_timeout_s, self.timeout_keep_alive)

        @classmethod
        def _sweep(cls, loop, connections) -> None:
            """Close the connections past a deadline; again in an interval while any
            connection is open."""
            now = loop.time()
            interval = None
            for conn in list(connections):
                interval = conn._interval()
                if conn.header_due is not None and now >= conn.header_due:
                    conn._too_slow()
                elif conn.idle_due is not None and now >= conn.idle_due:
                    conn.idle_due = None
                    conn.timeout_keep_alive_handler()
            if interval is None:
                cls.sweeping = False
            else:
                loop.call_later(interval, cls._sweep, loop, connections)

        def _too_slow(self) -> None:
            self.header_due = None
            if not self.transport.is_closing():
                NOTES.acted("header_timeout",
                            f"closed connections that sent no complete request headers "
                            f"within --header-timeout-s {header_timeout_s:g}")
                self.transport.write(_TIMEOUT_RESPONSE)
                self.transport.close()

    return GuardedHttpToolsProtocol
