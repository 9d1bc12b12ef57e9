"""The fast path's pieces that hold no connection state: which requests take it, the
head of its responses, the stand-in for uvicorn's request cycle while one is answered,
and the joined writes of the responses uvicorn makes (:class:`OneWrite`). The
connection that uses them is :class:`gpserve.connections.GuardedProtocol`.

A small GraphPipe ``POST /`` (or ``/models/{name}[/versions/{v}]``) or
``POST /v2/models/{name}[/versions/{v}]/infer`` with
the binary extension (an ``Inference-Header-Content-Length``) whose body came whole
with its headers is answered without ASGI: no request-cycle object, no
``receive``/``send`` messages, one write for head and body. JSON-only v2 bodies keep
uvicorn's path: they cost the JSON, not the HTTP.
"""
from __future__ import annotations

from http import HTTPStatus

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"     # uvicorn's exact bytes (its contract)


def fast_path_takes(method: bytes, url: bytes, version: str, keep_alive: bool,
                    headers: list, expect_continue: bool, limit: int) -> bool:
    """Whether a request's headers qualify it for the fast path: GraphPipe's ``POST /``
    or ``/models/...``, or a v2
    infer URL with an ``Inference-Header-Content-Length`` (binary extension), over
    HTTP/1.1 keep-alive with a Content-Length of at most ``limit`` bytes, no
    ``Transfer-Encoding``, ``Content-Encoding`` or ``Expect``. (Whether its body then
    came whole in the same read is known only after the read: see
    ``guarded_protocol``; whether a v2 URL names the model served, by the v2 routes.)"""
    if method != b"POST" or version != "1.1" or not keep_alive or expect_continue:
        return False
    v2 = url != b"/" and not (url.startswith(b"/models/") and b"?" not in url)
    if v2 and not (url.startswith(b"/v2/models/") and url.endswith(b"/infer")
                   and b"?" not in url):
        return False
    length, binary = None, False
    for name, value in headers:
        if name == b"content-length":
            if length is not None or not value.isdigit():
                return False
            length = int(value)
        elif name in (b"transfer-encoding", b"expect", b"content-encoding"):
            return False
        elif name == b"inference-header-content-length":
            binary = True
    return length is not None and length <= limit and (binary or not v2)


class _NoEvent:
    """What uvicorn sets on a lost connection's request cycle; nobody waits on it here."""

    @staticmethod
    def set() -> None:
        pass


class Answering:
    """A request answered on the fast path, in the place of uvicorn's request cycle
    (``protocol.cycle``), with what uvicorn reads and writes there: a request pipelined
    behind it waits while ``response_complete`` is false; a lost connection sets
    ``disconnected``, a drain clears ``keep_alive``."""

    __slots__ = ("response_complete", "disconnected", "keep_alive")
    message_event = _NoEvent

    def __init__(self):
        self.response_complete = self.disconnected = False
        self.keep_alive = True


class ResponseHead:
    """The head of a fast-path response: the status line, uvicorn's default headers of
    the moment (``date``, rebuilt by uvicorn once a second; cached by identity), the
    body's type and length."""

    def __init__(self, content_type: bytes):
        self.content_type = b"content-type: %s\r\n" % content_type
        self.last_headers: tuple | None = None
        self.last_typed = b""
        self.defaults: list | None = None
        self.defaults_bytes = b""
        self.status_lines: dict[int, bytes] = {}

    def __call__(self, status: int, length: int, defaults: list, keep_alive: bool,
                 headers: tuple | None = None) -> bytes:
        """``headers``: the answer's own (its type, and any other), in place of the
        content type this head was made with."""
        line = self.status_lines.get(status)
        if line is None:
            line = self.status_lines[status] = b"HTTP/1.1 %d %s\r\n" % (
                status, HTTPStatus(status).phrase.encode())
        if defaults is not self.defaults:
            self.defaults = defaults
            self.defaults_bytes = b"".join(b"%s: %s\r\n" % kv for kv in defaults)
        if headers is None:
            typed = self.content_type
        elif headers is self.last_headers:           # the same constant: cached by identity
            typed = self.last_typed
        else:
            typed = b"".join(b"%s: %s\r\n" % kv for kv in headers)
            self.last_headers, self.last_typed = headers, typed
        return b"%s%s%scontent-length: %d\r\n%s\r\n" % (
            line, self.defaults_bytes, typed, length,
            b"" if keep_alive else b"connection: close\r\n")


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


RESPONSE_HEAD = ResponseHead(b"application/octet-stream")
