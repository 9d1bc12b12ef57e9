"""Everything that crosses a process boundary: message types, framing, addresses, counters.

Wire layout of every message on the Unix sockets between our processes::

    uint32 little-endian length | marshal of (tag, fields as plain tuples)

``marshal`` of plain tuples, not pickle: it is several times cheaper per message (this
is the per-request overhead of the whole server), and it cannot run code. Peers are
also checked (``SO_PEERCRED``): only processes of the server's own user may connect.

Messages carry descriptors only (``TensorRef``: segment path, offset, type, shape);
tensor bytes stay in shared memory and are never pickled. Who sends what:

    front   -> batcher : Hello, Submit
    batcher -> front   : Reject                 (queue full, deadline passed, worker died)
    batcher -> worker  : Batch
    worker  -> batcher : Hello, Finished        (the worker is idle again)
    worker  -> front   : Hello, Done            (one per request; outputs in the worker's arena)
    front   -> worker  : Release                (output regions the front has copied out)

Sockets are Linux abstract Unix sockets named after the supervisor's pid, so a
restarted process reconnects by name and nothing is left on disk.
"""
from __future__ import annotations

import asyncio
import logging
import marshal
import socket
import struct
from typing import NamedTuple

import numpy as np

from .shm import TensorRef

_LEN = struct.Struct("<I")
log = logging.getLogger("gpserve.ipc")


def batcher_address(run_id: str) -> str:
    return f"\0gpserve-{run_id}-batcher"


def front_address(run_id: str, index: int) -> str:
    return f"\0gpserve-{run_id}-front{index}"


class Hello(NamedTuple):
    role: str     # "front" or "worker"
    index: int
    pid: int


class Submit(NamedTuple):
    """One request's rows, queued in the batcher."""

    req_id: int
    front: int            # front index
    front_pid: int        # ...and incarnation, so stale results never reach a new front
    inputs: tuple[TensorRef, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    config: str
    rows: int | None      # rows along dim 0, or None: run alone (unbatchable)
    key: tuple            # requests share a batch only when their keys are equal
    deadline: float       # time.monotonic() (CLOCK_MONOTONIC is system-wide on Linux)


class Batch(NamedTuple):
    batch_id: int
    items: tuple[Submit, ...]


class Finished(NamedTuple):
    batch_id: int
    rows: int


class OutputSlice(NamedTuple):
    ref: TensorRef        # the whole batch output
    start: int            # this request's rows; (0, None) means the whole tensor
    stop: int | None


class Done(NamedTuple):
    req_id: int
    outputs: tuple[OutputSlice, ...]
    error: tuple[int, str] | None
    token: int | None     # region to Release in the worker's arena, once copied out


class Release(NamedTuple):
    tokens: tuple[int, ...]


class Reject(NamedTuple):
    req_id: int
    code: int
    message: str


def _plain_submit(m: Submit) -> tuple:
    return (m[0], m[1], m[2], tuple(map(tuple, m[3])), *m[4:])


def _submit(t) -> Submit:
    return Submit(t[0], t[1], t[2], tuple(TensorRef._make(r) for r in t[3]), *t[4:])


# (message type, to plain tuples, from plain tuples); the index in this list is the tag.
_CODECS = [
    (Hello, tuple, Hello._make),
    (Submit, _plain_submit, _submit),
    (Batch, lambda m: (m[0], tuple(map(_plain_submit, m[1]))),
     lambda t: Batch(t[0], tuple(map(_submit, t[1])))),
    (Finished, tuple, Finished._make),
    (Done, lambda m: (m[0], tuple((tuple(o[0]), o[1], o[2]) for o in m[1]), m[2], m[3]),
     lambda t: Done(t[0], tuple(OutputSlice(TensorRef._make(o[0]), o[1], o[2]) for o in t[1]),
                    t[2], t[3])),
    (Release, tuple, Release._make),
    (Reject, tuple, Reject._make),
]
_ENCODERS = {cls: (tag, plain) for tag, (cls, plain, _) in enumerate(_CODECS)}
_DECODERS = [rebuild for _, _, rebuild in _CODECS]


def frame(message) -> bytes:
    tag, plain = _ENCODERS[type(message)]
    payload = marshal.dumps((tag, plain(message)))
    return _LEN.pack(len(payload)) + payload


class FrameBuffer:
    """Accumulates bytes from a stream socket and yields the whole messages in them."""

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
            tag, fields = marshal.loads(buf[pos + 4:pos + 4 + size])
            out.append(_DECODERS[tag](fields))
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
    import os
    return uid == os.getuid()


class Counters:
    """Server-wide counters in one small shared segment (int64 slots; one writer each).

    The batcher writes batch statistics, the supervisor writes restarts; fronts read
    them for ``GET /`` and readiness. Slots are fixed here, in one place.
    """

    MAX_PROCESSES = 64         # workers, and fronts: each has slots of its own
    READY_WORKERS, BATCHES, ROWS, MAX_BATCH_ROWS, QUEUED_ROWS, WORKER_RESTARTS, \
        FRONT_RESTARTS, BATCHER_RESTARTS, REJECTED_QUEUE_FULL, _UNUSED = range(10)
    BATCHER_PID = 10
    HIST_START = 16            # batch-size histogram: slot HIST_START + min(rows, 64) - 1
    HIST_BINS = 64
    WORKER_PIDS = HIST_START + HIST_BINS          # one slot per worker, then per front
    FRONT_PIDS = WORKER_PIDS + MAX_PROCESSES
    CACHE_START = FRONT_PIDS + MAX_PROCESSES      # per front: hits, misses, writes, ...
    CACHE_HITS, CACHE_MISSES, CACHE_WRITES, CACHE_EVICTIONS, CACHE_ERRORS, \
        CACHE_ROTATIONS = range(6)
    CACHE_FIELDS = 6
    CHECK_START = CACHE_START + MAX_PROCESSES * CACHE_FIELDS  # per worker: batching checks
    CHECKS, CHECKS_CHANGED, CHECK_ABS, CHECK_REL = range(4)   # the last two are float64
    CHECK_FIELDS = 4
    ERRORS_START = CHECK_START + MAX_PROCESSES * CHECK_FIELDS  # per front: answers by code
    ERROR_CODES = 32
    SLOTS = ERRORS_START + MAX_PROCESSES * ERROR_CODES

    def cache_slot(self, front_index: int) -> int:
        """First of this front's cache slots (each front writes only its own)."""
        return self.CACHE_START + self.CACHE_FIELDS * front_index

    def cache_totals(self) -> dict:
        per = self.slots[self.CACHE_START:self.CHECK_START].reshape(-1, self.CACHE_FIELDS)
        per = per.sum(axis=0).tolist()
        return dict(zip(("hits", "misses", "writes", "evictions", "errors", "rotations"), per))

    def __init__(self, path: str, create: bool = False):
        import mmap
        import os
        self.path = path
        size = 8 * self.SLOTS
        if create:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
            os.ftruncate(fd, size)
        else:
            fd = os.open(path, os.O_RDWR)
        try:
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.slots = np.frombuffer(self._mm, dtype=np.int64)
        self.floats = np.frombuffer(self._mm, dtype=np.float64)   # the same slots, as floats

    def record_check(self, worker_index: int, absolute: float, relative: float,
                     changed: bool) -> None:
        """A worker re-ran one request of a merged batch alone (see batch_check.py)."""
        at = self.CHECK_START + self.CHECK_FIELDS * worker_index
        self.slots[at + self.CHECKS] += 1
        self.slots[at + self.CHECKS_CHANGED] += int(changed)
        f = self.floats
        f[at + self.CHECK_ABS] = max(f[at + self.CHECK_ABS], absolute)
        f[at + self.CHECK_REL] = max(f[at + self.CHECK_REL], relative)

    def batch_checks(self) -> dict:
        """Checks on live traffic, all workers together."""
        per = self.slots[self.CHECK_START:self.ERRORS_START].reshape(-1, self.CHECK_FIELDS)
        floats = per.view(np.float64)
        return {"checks": int(per[:, self.CHECKS].sum()),
                "changed": int(per[:, self.CHECKS_CHANGED].sum()),
                "max_difference": float(floats[:, self.CHECK_ABS].max()),
                "relative": float(floats[:, self.CHECK_REL].max())}

    def add_batch(self, rows: int) -> None:
        s = self.slots
        s[self.BATCHES] += 1
        s[self.ROWS] += rows
        if rows > s[self.MAX_BATCH_ROWS]:
            s[self.MAX_BATCH_ROWS] = rows
        s[self.HIST_START + min(max(rows, 1), self.HIST_BINS) - 1] += 1

    def count_error(self, front_index: int, code: int) -> None:
        """A front answered a request with this error code (each front writes its own)."""
        self.slots[self.ERRORS_START + self.ERROR_CODES * front_index
                   + min(max(code, 0), self.ERROR_CODES - 1)] += 1

    def errors(self) -> dict:
        """Requests answered with an error, by the error's name, all fronts together."""
        from .errors import BY_CODE
        per = self.slots[self.ERRORS_START:self.SLOTS].reshape(-1, self.ERROR_CODES)
        totals = per.sum(axis=0).tolist()
        return {(BY_CODE[c].__name__ if c in BY_CODE else f"code{c}"): n
                for c, n in enumerate(totals) if n}

    def snapshot(self) -> dict:
        errors = self.errors()
        s = self.slots.tolist()
        hist = {str(i + 1) if i + 1 < self.HIST_BINS else f"{self.HIST_BINS}+": n
                for i, n in enumerate(s[self.HIST_START:self.HIST_START + self.HIST_BINS]) if n}
        return {
            "ready_workers": s[self.READY_WORKERS], "batches": s[self.BATCHES],
            "batched_rows": s[self.ROWS], "max_batch_rows": s[self.MAX_BATCH_ROWS],
            "mean_batch_rows": round(s[self.ROWS] / s[self.BATCHES], 3) if s[self.BATCHES] else 0,
            "queued_rows": s[self.QUEUED_ROWS], "rejected_queue_full": s[self.REJECTED_QUEUE_FULL],
            "expired": errors.get("DeadlineExceeded", 0), "errors": errors,
            "worker_restarts": s[self.WORKER_RESTARTS],
            "front_restarts": s[self.FRONT_RESTARTS],
            "batcher_restarts": s[self.BATCHER_RESTARTS], "batch_size_histogram": hist,
        }

    def pids(self, workers: int, fronts: int) -> dict:
        s = self.slots.tolist()
        return {"supervisor": int(self.path.rsplit("gpserve-", 1)[1].split("-")[0]),
                "batcher": s[self.BATCHER_PID],
                "workers": s[self.WORKER_PIDS:self.WORKER_PIDS + workers],
                "fronts": s[self.FRONT_PIDS:self.FRONT_PIDS + fronts]}


class Link(asyncio.Protocol):
    """The asyncio end of a connection between our processes (fronts, batcher).

    Refuses peers of other users, turns bytes into messages for ``on_message``, and
    sends everything queued in one event-loop turn in one write (fewer syscalls and
    wake-ups on the hot path). Subclasses implement ``on_connect``, ``on_message`` and
    ``on_disconnect``, and may add to a turn's write in ``before_flush``.
    """

    def __init__(self):
        self.frames = FrameBuffer()
        self.transport = None
        self.outbox: list[bytes] = []
        self.flush_scheduled = False

    def connection_made(self, transport) -> None:
        if not same_user(transport.get_extra_info("socket")):
            log.warning("refused an IPC connection from another user's process")
            transport.close()
            return
        self.transport = transport
        self.on_connect()

    def data_received(self, data: bytes) -> None:
        for message in self.frames.feed(data):
            self.on_message(message)

    def connection_lost(self, exc) -> None:
        if self.transport is not None:
            self.on_disconnect()

    def send(self, message) -> None:
        self.schedule_flush()
        self.outbox.append(frame(message))

    def schedule_flush(self) -> None:
        """Make sure this event-loop turn ends with one write of everything queued."""
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        self.before_flush()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self.outbox))
        self.outbox = []

    def before_flush(self) -> None:
        """A last chance to add messages to this turn's write."""

    def on_connect(self) -> None:
        """Called once the peer is accepted."""

    def on_message(self, message) -> None:
        """Called for every message received."""

    def on_disconnect(self) -> None:
        """Called when an accepted connection closes."""


def listening_socket(address: str) -> socket.socket:
    """A Unix socket listening on an abstract address (made here: uvloop's ``path=``
    does not take abstract names)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(address)
    sock.listen(256)
    sock.setblocking(False)
    return sock


async def connect(address: str, protocol_factory):
    """Connect an asyncio protocol to an abstract Unix address; raises OSError if nobody listens."""
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
    return await loop.create_unix_connection(protocol_factory, sock=sock)
