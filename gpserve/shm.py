"""Shared-memory arenas: files in /dev/shm that one process writes and others map by path.

Why plain mmap over /dev/shm files rather than ``multiprocessing.shared_memory``: on
Python 3.11 every process that attaches a SharedMemory registers it with its own
resource tracker, which unlinks or warns about it at exit. Here ownership is simple:
the supervisor names every segment ``gpserve-<supervisor pid>-...``, removes them all
on a clean stop, and removes a dead child's own arena when it restarts it.

Whether a run is alive is told by its *lock* (``gpserve-<pid>-lock``): the supervisor
and every child hold a shared ``flock`` on it for their whole life, so it is free only
once every process of the run is gone. A start removes the segments of runs whose lock
it can take, and never touches a run any of whose processes still lives (a killed
supervisor's orphans, say), nor one whose pid was reused.

A ``TensorRef`` (path, offset, GraphPipe type, shape) is what crosses processes for a
tensor; numeric data sits at ``offset`` row-major; a String tensor's region holds int64
end offsets for each element followed by the concatenated bytes. A numeric tensor of at
most ``INLINE_MAX`` bytes crosses as itself instead (``Inline``: its bytes in the
message): a region's allocation, descriptor, view and release, and the ``Release``
message that frees it, cost more than copying a few hundred bytes.
"""
from __future__ import annotations

import bisect
import logging
import mmap
import os
import shutil
from typing import NamedTuple

import numpy as np

from .protocol.messages import STRING, TYPE_TO_DTYPE, type_of

# Tensor types between processes: GraphPipe's codes, and one more for BOOL, which the
# Open Inference Protocol carries and GraphPipe lacks (never sent on GraphPipe's wire).
BOOL = 13
SHM_DTYPES: dict[int, np.dtype] = {**TYPE_TO_DTYPE, BOOL: np.dtype("?")}


def code_of(dtype: np.dtype) -> int:
    """The type code of a dtype in a :class:`TensorRef`."""
    return BOOL if dtype.kind == "b" else type_of(dtype)


# A numeric tensor (or a request's rows of an output) this small travels in the message.
INLINE_MAX = 4096


class Inline(NamedTuple):
    """A small numeric tensor in the message itself: its bytes (C order, native byte
    order), type code and shape."""

    data: bytes
    ttype: int
    shape: tuple[int, ...]


def inline(arr: np.ndarray) -> Inline:
    """A numeric array as an :class:`Inline` (1 copy, into the message)."""
    ttype = code_of(arr.dtype)
    return Inline(np.ascontiguousarray(arr, SHM_DTYPES[ttype]).tobytes(), ttype, arr.shape)


SHM_DIR = "/dev/shm"
PREFIX = "gpserve-"
ALIGN = 64


class TensorRef(NamedTuple):
    path: str
    offset: int
    ttype: int
    shape: tuple[int, ...]


def segment_path(run_id: str, name: str) -> str:
    return os.path.join(SHM_DIR, f"{PREFIX}{run_id}-{name}")


def _remove(path: str) -> bool:
    try:
        if os.path.isdir(path):
            shutil.rmtree(path)          # the run's metrics folder
        else:
            os.unlink(path)
        return True
    except (FileNotFoundError, PermissionError):
        return False


def remove_run_segments(run_id: str) -> int:
    """Remove every segment (and folder) of one server run; returns how many."""
    return sum(_remove(os.path.join(SHM_DIR, name)) for name in os.listdir(SHM_DIR)
               if name.startswith(f"{PREFIX}{run_id}-"))


def hold_run_lock(run_id: str) -> int:
    """Take a shared hold on the run's lock for this process's life; returns the fd."""
    import fcntl
    fd = os.open(segment_path(run_id, "lock"), os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def run_is_alive(run_id: str) -> bool:
    """True while any process of the run holds its lock (or, for a run without a lock,
    while its supervisor pid is alive)."""
    import fcntl
    try:
        fd = os.open(segment_path(run_id, "lock"), os.O_RDWR)
    except FileNotFoundError:
        return pid_alive(int(run_id))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def remove_stale_segments() -> tuple[int, int]:
    """Unlink segments left by servers that were killed, once every process of theirs is
    gone (see the module docstring): (segments removed, runs skipped). A run whose lock
    another user owns, or that this user cannot open, belongs to someone else (any
    local user can create a ``gpserve-*-lock`` file): it is left alone."""
    removed, foreign = 0, set()
    runs: dict[str, bool] = {}                 # run id -> its segments may be removed
    for name in os.listdir(SHM_DIR):
        if not name.startswith(PREFIX):
            continue
        run = name[len(PREFIX):].split("-", 1)[0]
        if not run.isdigit():
            continue
        if run not in runs:
            ours = _ours(run)
            if not ours:
                foreign.add(run)
            runs[run] = ours and not _alive_or_unknown(run)
        if runs[run]:
            removed += _remove(os.path.join(SHM_DIR, name))
    return removed, len(foreign)


def _ours(run_id: str) -> bool:
    """The run's lock is this user's (or the run has none)."""
    try:
        return os.lstat(segment_path(run_id, "lock")).st_uid == os.geteuid()
    except FileNotFoundError:
        return True


def _alive_or_unknown(run_id: str) -> bool:
    try:
        return run_is_alive(run_id)
    except OSError:                            # unreadable: not ours to judge
        return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Region(NamedTuple):
    """A block of an arena that ``Arena.alloc`` gave: where it is, and how to give it
    back. Every region is released exactly once, by whoever holds it last (a second
    release is refused by the arena, and logged)."""

    arena: "Arena"
    offset: int
    nbytes: int

    def release(self) -> None:
        self.arena.release(self.offset, self.nbytes)

    def array(self, dtype, shape) -> np.ndarray:
        """The region's bytes as an array of ``shape`` (0 copies; the region was allocated
        for exactly that array)."""
        return self.arena.buf[self.offset:self.offset + self.nbytes].view(dtype).reshape(shape)

    def ref(self, ttype: int, shape: tuple) -> TensorRef:
        """The descriptor another process maps this region by."""
        return TensorRef(self.arena.path, self.offset, ttype, tuple(shape))


class Arena:
    """A segment this process owns and writes, with a first-fit allocator of 64-byte blocks.

    tmpfs pages are taken on first write, so an arena costs memory only as it is used;
    first fit keeps reuse at low offsets, which keeps the resident size near the peak.
    """

    def __init__(self, path: str, size: int):
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            self.mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.path, self.size = path, size
        self.buf = np.frombuffer(self.mm, dtype=np.uint8)
        self.base = self.buf.__array_interface__["data"][0]
        self._free_starts: list[int] = [0]
        self._free_sizes: list[int] = [size]
        self.used = 0

    def alloc(self, nbytes: int) -> Region | None:
        """A new region of at least ``nbytes``, or None when the arena is full."""
        need = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        for i, free in enumerate(self._free_sizes):
            if free >= need:
                start = self._free_starts[i]
                if free == need:
                    del self._free_starts[i], self._free_sizes[i]
                else:
                    self._free_starts[i] += need
                    self._free_sizes[i] -= need
                self.used += need
                return Region(self, start, nbytes)
        return None

    def release(self, offset: int, nbytes: int) -> None:
        """Free a region ``alloc`` gave (``Region.release`` calls this). A region that
        overlaps free space (freed twice, or never allocated) is a bug of ours: it is
        logged and ignored, since taking it would let two requests share memory."""
        size = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        starts, sizes = self._free_starts, self._free_sizes
        i = bisect.bisect_left(starts, offset)
        if (offset < 0 or offset + size > self.size or offset % ALIGN
                or (i < len(starts) and starts[i] < offset + size)
                or (i > 0 and starts[i - 1] + sizes[i - 1] > offset)):
            logging.getLogger("gpserve.shm").error(
                "internal error: release of %d bytes at %d in %s, which is not an allocated "
                "region (freed twice?); ignored", nbytes, offset, self.path)
            return
        self.used -= size
        if i < len(starts) and offset + size == starts[i]:       # merge with the next
            starts[i] = offset
            sizes[i] += size
        else:
            starts.insert(i, offset)
            sizes.insert(i, size)
        if i > 0 and starts[i - 1] + sizes[i - 1] == starts[i]:  # merge with the previous
            sizes[i - 1] += sizes[i]
            del starts[i], sizes[i]

    def offset_of(self, arr: np.ndarray) -> int | None:
        """Offset of ``arr``'s data if it lies inside this arena, else None."""
        addr = arr.__array_interface__["data"][0] - self.base
        return addr if 0 <= addr and addr + arr.nbytes <= self.size else None

    def put(self, arr: np.ndarray) -> tuple[TensorRef, Region] | None:
        """Copy ``arr`` into a new region (1 copy): (its ref, the region), or None if full."""
        ttype = code_of(arr.dtype)
        if ttype == STRING:
            items = [x.encode() if isinstance(x, str) else bytes(x) for x in arr.reshape(-1)]
            ends = np.cumsum([len(x) for x in items], dtype=np.int64)
            nbytes = 8 * len(items) + (int(ends[-1]) if len(items) else 0)
            region = self.alloc(nbytes)
            if region is None:
                return None
            offset = region.offset
            self.buf[offset:offset + 8 * len(items)].view(np.int64)[:] = ends
            blob = b"".join(items)
            start = offset + 8 * len(items)
            self.buf[start:start + len(blob)] = np.frombuffer(blob, np.uint8)
        else:
            region = self.alloc(arr.nbytes)
            if region is None:
                return None
            np.copyto(region.array(SHM_DTYPES[ttype], arr.shape), arr)
        return region.ref(ttype, arr.shape), region

    def close(self) -> None:
        self.buf = None  # type: ignore[assignment]  # closed: no views of it any more
        try:
            self.mm.close()
        except BufferError:
            pass  # views still alive; the mapping goes with the process
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class Segments:
    """Read-only mappings of other processes' arenas, opened on first use and cached."""

    def __init__(self):
        self._maps: dict[str, np.ndarray] = {}

    def _buf(self, path: str) -> np.ndarray:
        buf = self._maps.get(path)
        if buf is None:
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            buf = self._maps[path] = np.frombuffer(mm, dtype=np.uint8)
        return buf

    def view(self, ref: TensorRef | Inline) -> np.ndarray:
        """The tensor a ref names: a read-only view (0 copies), or an object array for
        strings; an Inline tensor's: a view of its bytes."""
        if isinstance(ref, Inline):
            return np.frombuffer(ref.data, SHM_DTYPES[ref.ttype]).reshape(ref.shape)
        buf = self._buf(ref.path)
        count = 1
        for d in ref.shape:
            count *= d
        if ref.ttype == STRING:
            ends = buf[ref.offset:ref.offset + 8 * count].view(np.int64)
            start = ref.offset + 8 * count
            out = np.empty(count, dtype=object)
            prev = 0
            for i, end in enumerate(ends.tolist()):
                out[i] = buf[start + prev:start + end].tobytes()
                prev = end
            return out.reshape(ref.shape)
        # one array made over the mapping (a slice, view and reshape made three)
        return np.ndarray(ref.shape, SHM_DTYPES[ref.ttype], buf, ref.offset)

    def adopt(self, arena: "Arena") -> None:
        """View this process's own arena through the same ``view`` (no second mapping)."""
        self._maps[arena.path] = arena.buf

    def forget(self, path: str) -> None:
        """Drop one mapping (its memory is freed once the views of it die)."""
        self._maps.pop(path, None)

    def forget_prefix(self, prefix: str) -> None:
        """Drop mappings whose owner is gone (the memory is freed once their views die)."""
        for path in [p for p in self._maps if p.startswith(prefix)]:
            del self._maps[path]
