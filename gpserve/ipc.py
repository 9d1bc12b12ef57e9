"""Everything that crosses between our processes: message types, framing, connections.

Wire layout of every message on the Unix sockets between our processes::

    uint32 little-endian length | marshal of (tag, fields as plain tuples)

``marshal`` of plain tuples, not pickle: it is several times cheaper per message (this
is the per-request overhead of the whole server), and it cannot run code. Peers are
also checked (``SO_PEERCRED``): only processes of the server's own user may connect.
Messages are NamedTuples, turned into plain tuples and back by field name (``_NESTED``
says which fields hold other messages).

Messages carry descriptors (``TensorRef``: segment path, offset, type, shape): tensor
bytes stay in shared memory and are never pickled; only a numeric tensor of at most
``shm.INLINE_MAX`` bytes travels in the message (``shm.Inline``). Who sends what:

    front  -> worker : Hello, Submit, Release   (Release: output regions copied out)
    worker -> front  : Hello, Done              (outputs in the worker's arena, or an error)

Each front connects to every worker: a request costs two hops, front -> worker ->
front. Each worker listens on an abstract Unix socket named after the supervisor's pid
and its index, so a restarted front or worker finds its peers by name and nothing is
left on disk.
"""
from __future__ import annotations

import asyncio
import logging
import marshal
import os
import socket
import struct
from typing import Any, NamedTuple, Protocol

from .shm import Inline, TensorRef

_LEN = struct.Struct("<I")
log = logging.getLogger("gpserve.ipc")


def worker_address(run_id: str, name: str) -> str:
    """A worker's listening address (``name``: ``worker0``, or ``m1-worker0`` for the
    run's second model's)."""
    return f"\0gpserve-{run_id}-{name}"


class Hello(NamedTuple):
    role: str     # "front" or "worker"
    index: int    # type: ignore[assignment]  # shadows tuple.index, which nothing calls
    pid: int
    about: str = ""       # a worker: what it runs, on which device (for GET /)


class Submit(NamedTuple):
    """One request's rows, for a worker's queue."""

    req_id: int
    inputs: tuple[TensorRef | Inline, ...]   # to a worker in its front: the arrays
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    config: str
    rows: int | None      # rows along dim 0, or None: run alone (unbatchable)
    key: tuple            # requests share a batch only when their keys are equal
    deadline: float       # time.monotonic() (CLOCK_MONOTONIC is system-wide on Linux)


class OutputSlice(NamedTuple):
    ref: Any              # the whole batch output: a TensorRef (a local worker: the array),
                          # or this request's rows of it (Inline; start 0, stop None)
    start: int            # this request's rows; (0, None) means the whole tensor
    stop: int | None


class Done(NamedTuple):
    """A request's outputs, or why there are none."""

    req_id: int
    outputs: tuple[OutputSlice, ...]
    error: tuple[int, str] | None    # (GraphPipe error code, message)
    token: int | None     # region to Release in the worker's arena, once copied out


class Release(NamedTuple):
    tokens: tuple[int, ...]


_MESSAGES = (Hello, Submit, Done, Release)          # the index is the wire tag
_TAGS = {cls: tag for tag, cls in enumerate(_MESSAGES)}
_SUBMIT, _DONE = _TAGS[Submit], _TAGS[Done]
_make_ref, _make_inline = TensorRef._make, Inline._make


def _descriptor(fields: tuple):
    """A tensor's descriptor, rebuilt: a TensorRef has 4 fields, an Inline 3."""
    return _make_ref(fields) if len(fields) == 4 else _make_inline(fields)


# Messages go over the wire as marshal'd tuples of plain values, field by field in
# order. The two that nest NamedTuples (a Submit's input refs; a Done's output slices
# and their refs) are flattened and rebuilt by hand: namedtuple's generic _replace made
# them a measurable share of every request through a worker (docs/benchmarks.md,
# "Figures behind design choices").
def _plain(message) -> tuple:
    kind = type(message)
    if kind is Submit:
        return (message[0], tuple(map(tuple, message[1])), *message[2:])
    if kind is Done:
        return (message[0], tuple((tuple(o[0]), o[1], o[2]) for o in message[1]),
                message[2], message[3])
    return tuple(message)


def _rebuild(tag: int, fields: tuple):
    if tag == _SUBMIT:
        return Submit(fields[0], tuple(map(_descriptor, fields[1])), *fields[2:])
    if tag == _DONE:
        return Done(fields[0], tuple([OutputSlice(_descriptor(ref), start, stop)
                                      for ref, start, stop in fields[1]]),
                    fields[2], fields[3])
    return _MESSAGES[tag]._make(fields)


def frame(*messages) -> bytes:
    """One frame holding ``messages``: one ``marshal`` call for everything a link sends in
    an event-loop turn (a frame per message cost each side a call and a length more)."""
    payload = marshal.dumps([(_TAGS[type(m)], _plain(m)) for m in messages])
    return _LEN.pack(len(payload)) + payload


class FrameBuffer:
    """Accumulates bytes from a stream socket and yields the messages of its whole frames."""

    __slots__ = ("_buf",)

    def __init__(self):
        self._buf = bytearray()

    def feed(self, data: bytes) -> list:
        buf = self._buf
        buf += data
        out = []
        pos, end = 0, len(buf)
        while end - pos >= 4:
            (size,) = _LEN.unpack_from(buf, pos)
            if end - pos - 4 < size:
                break
            out += [_rebuild(tag, fields)
                    for tag, fields in marshal.loads(buf[pos + 4:pos + 4 + size])]
            pos += 4 + size
        if pos:
            del buf[:pos]
        return out


_PEERCRED = struct.Struct("3i")   # struct ucred: pid, uid, gid


def same_user(sock: socket.socket) -> bool:
    """Whether the process at the other end of a Unix socket runs as our user."""
    try:
        _, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                     _PEERCRED.size))
    except OSError:
        return False
    return uid == os.getuid()


class End(Protocol):
    """Where a worker's answers go, as the worker uses it: :class:`Link` (a front's
    connection, every request it sends) or
    :class:`gpserve.workers.delivery.Caller` (one request of the front a worker runs in,
    made directly)."""

    @property
    def peer(self) -> Hello | None: ...
    @property
    def open(self) -> bool: ...
    def send(self, message: Any) -> None: ...
    def release(self, token: int) -> None: ...


class Owner(Protocol):
    """What a link calls on its side's owner (a front's Dispatcher, a Worker); an owner
    may also have ``on_peer(link)``, called when the peer's Hello arrives."""

    def on_message(self, link: Any, message: Any) -> None: ...
    def on_lost(self, link: Any) -> None: ...


class Link(asyncio.Protocol):
    """One connection between two of our processes (a front and a worker), either end.

    Refuses peers of other users, introduces itself (``Hello``) and learns who the peer
    is, turns bytes into messages for its owner, and sends everything queued in one
    event-loop turn in one write: fewer syscalls and wake-ups on the hot path. Release
    tokens are coalesced into one ``Release`` per turn. The owner implements
    ``on_message(link, message)`` and ``on_lost(link)``, and may implement
    ``on_peer(link)`` (called when the peer's Hello arrives).
    """

    def __init__(self, owner: Owner, hello: Hello):
        self.owner, self.hello = owner, hello
        self.frames = FrameBuffer()
        self.transport: asyncio.WriteTransport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.peer: Hello | None = None
        self.outbox: list = []               # messages, framed together by flush()
        self.releases: list[int] = []
        self.flush_scheduled = False

    def connection_made(self, transport) -> None:
        if not same_user(transport.get_extra_info("socket")):
            log.warning("refused an IPC connection from another user's process")
            transport.close()
            return
        self.transport = transport
        self.loop = asyncio.get_running_loop()     # once: see Dispatcher.loop
        self.send(self.hello)

    def data_received(self, data: bytes) -> None:
        for message in self.frames.feed(data):
            if type(message) is Hello:
                self.peer = message
                on_peer = getattr(self.owner, "on_peer", None)
                if on_peer is not None:
                    on_peer(self)
            else:
                self.owner.on_message(self, message)

    def connection_lost(self, exc) -> None:
        if self.transport is not None:
            self.owner.on_lost(self)

    @property
    def open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def send(self, message) -> None:
        self._schedule_flush()
        self.outbox.append(message)

    def release(self, token: int) -> None:
        """Tell the peer we are done with one of its output regions (sent this turn)."""
        self._schedule_flush()
        self.releases.append(token)

    def _schedule_flush(self) -> None:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            (self.loop or asyncio.get_running_loop()).call_soon(self.flush)

    def flush(self) -> None:
        """Write everything queued now (it is also done at the end of the turn)."""
        self.flush_scheduled = False
        if self.releases:
            self.outbox.append(Release(tuple(self.releases)))
            self.releases = []
        if self.outbox and self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(*self.outbox))
        self.outbox = []


def listening_socket(address: str) -> socket.socket:
    """A Unix socket listening on an abstract address (made here: uvloop's ``path=``
    does not take abstract names)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(address)
    sock.listen(256)
    sock.setblocking(False)
    return sock


async def connect(address: str, link: Link) -> Link:
    """Connect ``link`` to an abstract Unix address; raises OSError if nobody listens."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, address)
        if not same_user(sock):
            raise PermissionError(f"the process listening on {address!r} is another user's")
    except OSError:
        sock.close()
        raise
    await loop.create_unix_connection(lambda: link, sock=sock)
    return link
