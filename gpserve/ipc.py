"""Everything that crosses a process boundary: message types, framing, addresses, counters.

Wire layout of every message on the Unix sockets between our processes::

    uint32 little-endian length | pickle of one of the NamedTuples below

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

import pickle
import struct
from typing import NamedTuple

import numpy as np

from .shm import TensorRef

_LEN = struct.Struct("<I")


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


def frame(message) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
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
            out.append(pickle.loads(buf[pos + 4:pos + 4 + size]))
            pos += 4 + size
        if pos:
            del buf[:pos]
        return out


class Counters:
    """Server-wide counters in one small shared segment (int64 slots; one writer each).

    The batcher writes batch statistics, the supervisor writes restarts; fronts read
    them for ``GET /`` and readiness. Slots are fixed here, in one place.
    """

    READY_WORKERS, BATCHES, ROWS, MAX_BATCH_ROWS, QUEUED_ROWS, WORKER_RESTARTS, \
        FRONT_RESTARTS, BATCHER_RESTARTS, REJECTED_QUEUE_FULL, EXPIRED = range(10)
    BATCHER_PID = 10
    HIST_START = 16            # batch-size histogram: slot HIST_START + min(rows, 64) - 1
    HIST_BINS = 64
    WORKER_PIDS = HIST_START + HIST_BINS          # one slot per worker, then per front
    FRONT_PIDS = WORKER_PIDS + 64
    SLOTS = FRONT_PIDS + 64

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

    def add_batch(self, rows: int) -> None:
        s = self.slots
        s[self.BATCHES] += 1
        s[self.ROWS] += rows
        if rows > s[self.MAX_BATCH_ROWS]:
            s[self.MAX_BATCH_ROWS] = rows
        s[self.HIST_START + min(max(rows, 1), self.HIST_BINS) - 1] += 1

    def snapshot(self) -> dict:
        s = self.slots.tolist()
        hist = {str(i + 1) if i + 1 < self.HIST_BINS else f"{self.HIST_BINS}+": n
                for i, n in enumerate(s[self.HIST_START:self.HIST_START + self.HIST_BINS]) if n}
        return {
            "ready_workers": s[self.READY_WORKERS], "batches": s[self.BATCHES],
            "batched_rows": s[self.ROWS], "max_batch_rows": s[self.MAX_BATCH_ROWS],
            "mean_batch_rows": round(s[self.ROWS] / s[self.BATCHES], 3) if s[self.BATCHES] else 0,
            "queued_rows": s[self.QUEUED_ROWS], "rejected_queue_full": s[self.REJECTED_QUEUE_FULL],
            "expired": s[self.EXPIRED], "worker_restarts": s[self.WORKER_RESTARTS],
            "front_restarts": s[self.FRONT_RESTARTS],
            "batcher_restarts": s[self.BATCHER_RESTARTS], "batch_size_histogram": hist,
        }

    def pids(self, workers: int, fronts: int) -> dict:
        s = self.slots.tolist()
        return {"supervisor": int(self.path.rsplit("gpserve-", 1)[1].split("-")[0]),
                "batcher": s[self.BATCHER_PID],
                "workers": s[self.WORKER_PIDS:self.WORKER_PIDS + workers],
                "fronts": s[self.FRONT_PIDS:self.FRONT_PIDS + fronts]}


def listening_socket(address: str) -> "socket.socket":
    """A Unix socket listening on an abstract address (made here: uvloop's ``path=``
    does not take abstract names)."""
    import socket
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(address)
    sock.listen(256)
    sock.setblocking(False)
    return sock


async def connect(address: str, protocol_factory):
    """Connect an asyncio protocol to an abstract Unix address; raises OSError if nobody listens."""
    import asyncio
    import socket
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, address)
    except OSError:
        sock.close()
        raise
    return await loop.create_unix_connection(protocol_factory, sock=sock)
