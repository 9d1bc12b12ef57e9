"""Guards on a front's HTTP connections that uvicorn lacks: a header timeout, bounds on
a request's head, and a log line and a count when a guard acts; and the fast path's
hand-off (its pieces: :mod:`gpserve.fastpath`).

(Over 350 lines on purpose: :class:`GuardedProtocol` is one subclass of uvicorn's
protocol whose overrides share the parser's state; split, each part would reach into
the others' attributes. Every uvicorn member it touches is named in
``tests/test_uvicorn_contract.py``.)

uvicorn bounds idle keep-alive connections (``timeout_keep_alive``) and open
connections (``limit_concurrency``: past it, requests get 503), but a client that opens
a connection and sends its headers slowly, or never, holds a file descriptor for as
long as it likes. Here a connection must send a request's headers within
``--header-timeout-s`` of opening or of its first byte; otherwise it gets ``408`` and is
closed. Each guard that acts is counted in ``gpserve_connections_refused_total`` and
logged at most once every ``logs.LOG_EVERY_S`` per front with how many times it acted.

Transfer codings: ``chunked`` alone is served; any other (``gzip, chunked``, which the
parser would read as plain chunked) is ``501``. An ``Upgrade`` (``h2c``, ``websocket``)
is ignored, as RFC 9110 lets a server do, and the request answered: the parser stops at
an upgrade's end of headers, so such a request's body is read here by its length and
the connection closes after the answer. A client that half-closes after its request
(``shutdown(SHUT_WR)``) is still answered, then the connection closes.

A request's head is bounded as nginx bounds it (uvicorn and httptools bound nothing: one
connection's 100 MiB of header lines took a front to 1.5 GiB): its request line to
``MAX_REQUEST_LINE`` bytes (else ``414``), each header line to ``MAX_HEADER_LINE``, its
header lines to ``MAX_HEADERS``, and the whole head to ``--max-header-kb`` (else
``431``). The parser hands over a header only once it is whole, so the bytes read while
a head is incomplete are counted too: a front holds at most the bound plus one read.

Both clocks (the header timeout, and uvicorn's keep-alive timeout, taken over here) are
read by one sweep per front every eighth of the shorter timeout, not by a timer per
request: uvicorn armed a timer per response, this guard one per request, and arming
and cancelling them was a measurable share of a small request (docs/benchmarks.md,
"Figures behind design choices"). A connection is closed at most a sweep's interval
(1/8 of its timeout) late.
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .answer import Answer
from .fastpath import RESPONSE_HEAD, Answering, OneWrite, fast_path_takes
from .logs import NOTES

log = logging.getLogger("gpserve.front")
_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\n"
                     b"content-length: 0\r\n\r\n")


FIRST_REQUEST_GRACE_S = 1.0
MAX_REQUEST_LINE = 8 * 1024     # bytes of the method, target and version (nginx: 8 KiB)
MAX_HEADER_LINE = 8 * 1024      # bytes of one header's name and value (nginx: 8 KiB)
MAX_HEADERS = 100               # header lines in one request (Apache's LimitRequestFields)


class Refusal:
    """A request refused from its head (a bound passed, a transfer coding not served):
    answered with ``status`` and the connection closed once the parser returns (the
    parser's callbacks drop everything meanwhile: an exception raised in one reaches
    uvicorn as a bad request, answered 400)."""

    __slots__ = ("status", "reason", "message")

    def __init__(self, status: int, reason: str, message: str):
        self.status, self.reason, self.message = status, reason, message

    def response(self) -> bytes:
        body = self.message.encode()
        return b"HTTP/1.1 %d %s\r\nconnection: close\r\ncontent-type: text/plain; " \
               b"charset=utf-8\r\ncontent-length: %d\r\n\r\n%s" % (
                   self.status, HTTPStatus(self.status).phrase.encode(), len(body), body)


def sweep_interval(header_timeout_s: float, keepalive_timeout_s: float) -> float:
    """How often a front's connections are checked: an eighth of the shorter timeout."""
    return min(max(min(header_timeout_s, keepalive_timeout_s) / 8, 0.01), 1.0)


def _unserved_coding(headers: list, upgrade: bool) -> Refusal | None:
    """A transfer coding this server does not implement: anything but ``chunked`` alone
    (the parser reads ``gzip, chunked`` as plain chunked, garbling the body), or a
    chunked body behind an ignored upgrade (read only by its length)."""
    for name, value in headers:
        if name == b"transfer-encoding":
            if value.strip().lower() != b"chunked":
                return Refusal(501, "transfer_coding",
                               f"Transfer-Encoding {value.decode('latin-1')!r} is not "
                               "implemented: send the body with a Content-Length, or "
                               "'chunked' alone (Content-Encoding gzip or deflate compresses "
                               "it)")
            if upgrade:
                return Refusal(501, "transfer_coding", "a chunked body with an Upgrade "
                               "header is not implemented: drop the Upgrade")
    return None


@dataclass(frozen=True)
class ConnectionSettings:
    """What one front's connections are set up with (see :class:`GuardedProtocol`)."""

    header_timeout_s: float
    on_count: Callable[[int], None] | None = None    # hears the front's open connections
    fast_post: Callable[..., Awaitable[Answer]] | None = None   # the fast path, if any
    fast_limit: int = 0                              # the fast path's largest body
    max_head_bytes: int = 32 * 1024                  # --max-header-kb


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the guards above, a header timeout, its
    keep-alive timeout kept by the same sweep, and a fast path for small GraphPipe
    requests. ``settings`` is set per front by :func:`guarded_protocol`, which makes the
    subclass uvicorn instantiates (``uvicorn.Config(http=...)``).

    The fast path: a ``POST /`` whose whole body (at most ``settings.fast_limit`` bytes)
    came in the same read as its headers, on a connection answering nothing else, is
    answered by ``await settings.fast_post(body, client, url, headers) -> Answer``
    and written here: no ASGI scope, messages, receive or send (uvicorn's side of a
    small request was a quarter of a front's time). Anything else, or a request whose
    body has not all come by the end of the read, goes through uvicorn and the ASGI app
    as before (the latter is handed its headers and body so far)."""

    settings: ConnectionSettings
    header_due: float | None = None   # loop time: the request's headers must be in
    idle_due: float | None = None     # loop time: an idle connection is closed
    sweeping = False                  # this front's sweep is scheduled (class-wide)
    fast_body: list | None = None     # a fast-path request's body pieces, this read
    reading_head = True               # the next bytes belong to a request's head
    head_fed = 0                      # bytes read since the head began (an upper bound)
    head_bytes = 0                    # bytes of the head the parser has handed over
    refusal: Refusal | None = None   # refused from its head: nothing more is taken
    raw_body_left = 0                 # an ignored upgrade's body, read without the parser
    draining = False                  # the front is stopping: answers close the connection
    ended = False                     # the client half-closed: close after the answer

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.header_due = self.loop.time() + self.settings.header_timeout_s
        if not type(self).sweeping:
            type(self).sweeping = True
            interval = sweep_interval(self.settings.header_timeout_s, self.timeout_keep_alive)
            self.loop.call_later(interval, self._sweep, self.loop, self.connections,
                                 interval)
        if self.settings.on_count is not None:
            self.settings.on_count(len(self.connections))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_bytes = 0
        if self.header_due is None:
            self.header_due = self.loop.time() + self.settings.header_timeout_s

    # -- bounds on the head ----------------------------------------------------------
    def on_url(self, url: bytes) -> None:
        self.head_bytes += len(url)
        if self.refusal is None and len(self.url) + len(url) > MAX_REQUEST_LINE:
            self.refusal = Refusal(
                414, "request_line_too_long",
                f"the request target is over {MAX_REQUEST_LINE} bytes")
        if self.refusal is None:
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        self.head_bytes += size + 4                      # ": " and CRLF
        if self.refusal is not None:
            return
        if size > MAX_HEADER_LINE:
            why = f"a header line is over {MAX_HEADER_LINE} bytes"
        elif len(self.headers) >= MAX_HEADERS:
            why = f"more than {MAX_HEADERS} header lines"
        elif self.head_bytes > self.settings.max_head_bytes:
            why = (f"the request's headers are over {self.settings.max_head_bytes} bytes "
                   "(--max-header-kb)")
        else:
            super().on_header(name, value)
            return
        self.refusal = Refusal(431, "header_too_large", why)

    def _refuse_head(self) -> None:
        e = self.refusal
        assert e is not None, "called once a refusal is set"
        NOTES.acted(e.reason, f"refused requests (HTTP {e.status}): {e.message}")
        if not self.transport.is_closing():
            self.transport.write(e.response())
            self.transport.close()

    # -- reading: the guards, then the parser (uvicorn's, but for an upgrade) ---------
    def data_received(self, data: bytes) -> None:
        if self.refusal is not None:
            return                               # answered: the rest is not read
        if self.raw_body_left:
            self._raw_body(data)
            return
        if self.reading_head:
            self.head_fed += len(data)
        self.idle_due = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._upgrade_ignored(data[e.args[0]:])
        except httptools.HttpParserError:
            NOTES.acted("malformed_http", "answered 400 to requests that are not HTTP/1.1")
            self.send_400_response("Invalid HTTP request received.")
            return
        if self.refusal is None and self.reading_head \
                and self.head_fed > self.settings.max_head_bytes + MAX_REQUEST_LINE:
            self.refusal = Refusal(         # a line the parser still holds
                431, "header_too_large", "the request's head is over "
                f"{self.settings.max_head_bytes} bytes (--max-header-kb), or one of its "
                f"lines over {MAX_HEADER_LINE}")
        if self.refusal is not None:
            self._refuse_head()
            return
        if self.fast_body is not None:
            if self.parser is None or self.transport.is_closing():
                self.fast_body = None                   # a bad request, answered 400
            else:
                self._to_uvicorn()      # its body is still on the way: the usual path

    def on_headers_complete(self) -> None:
        self.header_due = None
        self.reading_head, self.head_fed = False, 0
        if self.refusal is None:
            self.refusal = _unserved_coding(self.headers, self.parser.should_upgrade())
        if self.refusal is not None:
            return                               # refused: never reaches the app
        parser, cycle = self.parser, self.cycle
        if (self.settings.fast_post is not None and (cycle is None or cycle.response_complete)
                and not self.pipeline and not parser.should_upgrade()
                and fast_path_takes(parser.get_method(), self.url,
                                    parser.get_http_version(),
                                    parser.should_keep_alive(), self.headers,
                                    self.expect_100_continue, self.settings.fast_limit)
                and not self._over_limit()):
            self.fast_body = []
            return
        self._to_asgi()

    def on_body(self, body: bytes) -> None:
        if self.fast_body is not None:
            self.fast_body.append(body)
        elif self.refusal is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self.reading_head, self.head_fed = True, 0
        if self.refusal is not None:
            return
        pieces = self.fast_body
        if pieces is None:
            super().on_message_complete()
            return
        self.fast_body = None
        answering = Answering()
        self.cycle = answering  # type: ignore[assignment]  # stands in for uvicorn's cycle
        task = self.loop.create_task(self._answer(      # url, headers: this request's
            answering, pieces[0] if len(pieces) == 1 else b"".join(pieces), self.url,
            self.headers))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    # -- upgrades ignored, half-closed clients ---------------------------------------
    def _upgrade_ignored(self, rest: bytes) -> None:
        """The parser stopped at an upgrade's end of headers, after telling uvicorn's
        cycle the message was complete with no body: the body (by its length) is
        read here instead, and the connection closes after the answer (the parser is
        spent: it would take whatever follows as the other protocol's bytes)."""
        length = next((int(v) for k, v in self.headers if k == b"content-length"), 0)
        cycle = self.cycle
        if cycle is None or type(cycle) is Answering:
            return
        cycle.keep_alive = False
        if length:
            cycle.more_body = True
            self.raw_body_left = length
            self._raw_body(rest)

    def _raw_body(self, data: bytes) -> None:
        piece = data[:self.raw_body_left]
        self.raw_body_left -= len(piece)
        if piece:
            super().on_body(piece)
        if not self.raw_body_left:
            super().on_message_complete()

    def eof_received(self) -> bool | None:  # type: ignore[override]  # asyncio's signature
        """The client half-closed: a request it sent whole is still answered (True
        keeps the transport open for writing), then the connection closes."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete or self.fast_body is not None \
                or getattr(cycle, "more_body", False):     # nothing whole to answer
            return None
        self.ended = True
        return True

    def _to_uvicorn(self) -> None:
        """A fast-path request whose body did not all come in one read: handed to
        uvicorn with what came (its headers are still the parser's)."""
        pieces, self.fast_body = self.fast_body or [], None
        self._to_asgi()
        for piece in pieces:
            super().on_body(piece)

    async def _answer(self, answering: Answering, body: bytes, url: bytes,
                      headers: list) -> None:
        headers_out = None
        try:
            assert self.settings.fast_post is not None, "only the fast path answers here"
            answer = await self.settings.fast_post(body, self.client, url, headers)
            status, response, headers_out = answer.status, answer.body, answer.headers
        except Exception:
            log.exception("internal error answering a request")
            status, response = 500, b""
            answering.keep_alive = False
        if self.flow.write_paused and not answering.disconnected:
            await self.flow.drain()            # the client reads slower than it asks
        if answering.disconnected or self.transport.is_closing():
            return
        if self.draining:
            answering.keep_alive = False
        data = RESPONSE_HEAD(status, len(response), self.server_state.default_headers,
                             answering.keep_alive, headers_out)
        if len(response) < OneWrite.JOIN_BELOW:
            self.transport.write(data + response)          # 1 copy of a small body
        else:
            self.transport.writelines((data, response))
        answering.response_complete = True
        if not answering.keep_alive or self.ended:
            self.transport.close()
        self.on_response_complete()

    # -- uvicorn's path -------------------------------------------------------------
    def _over_limit(self) -> bool:
        limit = self.limit_concurrency
        return limit is not None and (len(self.connections) >= limit
                                      or len(self.tasks) >= limit)

    def _to_asgi(self) -> None:
        limit = self.limit_concurrency
        if self._over_limit():
            NOTES.acted("connection_limit",
                        f"--max-connections {limit} reached: requests get 503")
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is None or type(cycle) is Answering:
            return
        if self.draining and not self.pipeline:  # came during the drain: then close
            cycle.keep_alive = False             # (a pipelined one: once it runs)
        if type(cycle.transport) is not OneWrite and cycle.scope["method"] != "HEAD":
            cycle.transport = OneWrite(  # type: ignore[assignment]  # a Transport's write
                cycle.transport)                   # HEAD: no body write follows

    def _unset_keepalive_if_required(self) -> None:
        self.idle_due = None               # uvicorn's: data came, or the end

    def on_response_complete(self) -> None:
        """uvicorn's, with the keep-alive clock read by the sweep, not a timer."""
        self.server_state.total_requests += 1
        if self.ended:
            self.transport.close()               # half-closed: nothing more will come
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
        if self.settings.on_count is not None:
            self.settings.on_count(len(self.connections))

    def shutdown(self) -> None:
        """The drain: uvicorn closes every connection not in a request at once, but
        one just accepted may have its first request on the way, and an idle
        keep-alive one its next (closing it with those bytes unread resets them). It
        gets FIRST_REQUEST_GRACE_S for them to arrive; such a request is answered
        with ``connection: close``, then the connection closes. A request in flight
        is answered the same way (uvicorn's)."""
        self.draining = True
        cycle = self.cycle
        if (cycle is None or cycle.response_complete) and not self.transport.is_closing():
            self.loop.call_later(FIRST_REQUEST_GRACE_S, super().shutdown)
            return
        super().shutdown()

    @classmethod
    def _sweep(cls, loop, connections, interval: float) -> None:
        """Close the connections past a deadline; again in ``interval`` while any
        connection is open."""
        now = loop.time()
        for conn in list(connections):
            if type(conn) is not cls:     # not ours (uvicorn's WebSocket protocol, if
                continue                  # ever served): no clocks to read
            if conn.header_due is not None and now >= conn.header_due:
                conn._too_slow()
            elif conn.idle_due is not None and now >= conn.idle_due:
                conn.idle_due = None
                conn.timeout_keep_alive_handler()
        if connections:
            loop.call_later(interval, cls._sweep, loop, connections, interval)
        else:
            cls.sweeping = False

    def _too_slow(self) -> None:
        self.header_due = None
        if not self.transport.is_closing():
            NOTES.acted("header_timeout",
                        f"closed connections that sent no complete request headers "
                        f"within --header-timeout-s {self.settings.header_timeout_s:g}")
            self.transport.write(_TIMEOUT_RESPONSE)
            self.transport.close()


def guarded_protocol(header_timeout_s: float, on_count=None, fast_post=None,
                     fast_limit: int = 0, max_head_bytes: int = 32 * 1024
                     ) -> type[GuardedProtocol]:
    """The protocol class for one front's ``uvicorn.Config(http=...)``: a subclass of
    :class:`GuardedProtocol` holding this front's settings (and its own sweep flag)."""
    settings = ConnectionSettings(header_timeout_s, on_count, fast_post, fast_limit,
                                  max_head_bytes)
    return type("GuardedProtocol", (GuardedProtocol,), {"settings": settings,
                                                        "sweeping": False})

