"""The shared memory one request holds in its front's arena, freed exactly once.

A request's body (when it streamed in) and the tensors placed for a worker live in
regions of the front's arena. They must outlive the worker's reading of them: freed
when the answer is in, or, if the front stopped waiting (deadline), when the worker's
answer or its death says nobody reads them any more (:class:`gpserve.dispatch.Waiting`
takes them over through :meth:`Regions.hand_over`).
"""
from __future__ import annotations

import numpy as np

from .errors import QueueFull
from .shm import INLINE_MAX, Arena, Inline, Region, TensorRef, code_of, inline


class Regions:
    __slots__ = ("arena", "held")

    def __init__(self, arena: Arena):
        self.arena = arena
        self.held: list[Region] = []

    def hold(self, region: Region) -> None:
        self.held.append(region)

    def place(self, arr: np.ndarray) -> TensorRef | Inline:
        """A descriptor for a decoded tensor: its own bytes when they already sit aligned
        in the arena (0 copies); a small numeric one, itself (1 copy, into the message);
        else a copy into a new region (1 copy)."""
        arena = self.arena
        if arr.dtype != object:
            offset = arena.offset_of(arr)
            if offset is not None and arr.flags.c_contiguous and arr.flags.aligned:
                return TensorRef(arena.path, offset, code_of(arr.dtype), arr.shape)
            if arr.nbytes <= INLINE_MAX:
                return inline(arr)
        placed = arena.put(arr)
        if placed is None:
            raise arena_full(arena)
        ref, region = placed
        self.held.append(region)
        return ref

    def alloc(self, nbytes: int) -> memoryview:
        """A new region of ``nbytes`` for this request to fill (a tensor read from a
        client's shared memory lands here: where a worker reads it)."""
        region = self._alloc(nbytes)
        return memoryview(self.arena.buf[region.offset:region.offset + nbytes])  # type: ignore[arg-type]  # ndarray exports the buffer protocol (no 3.11 stub)

    def place_rows(self, arr: np.ndarray, rows: list[int]) -> TensorRef | Inline:
        """Some rows of a tensor, gathered straight into shared memory (1 copy)."""
        if arr.dtype == object:
            return self.place(arr[rows])
        shape = (len(rows),) + arr.shape[1:]
        region = self._alloc(int(np.prod(shape)) * arr.itemsize)
        np.take(arr, rows, axis=0, out=region.array(arr.dtype, shape))
        return region.ref(code_of(arr.dtype), shape)

    def _alloc(self, nbytes: int) -> Region:
        region = self.arena.alloc(nbytes)
        if region is None:
            raise arena_full(self.arena)
        self.held.append(region)
        return region

    def release(self) -> None:
        """Free every region (again: nothing)."""
        if not self.held:
            return
        held, self.held = self.held, []
        for region in held:
            region.release()

    def hand_over(self):
        """Give the regions to someone who frees them later (returns the function that
        does); this request then holds none."""
        taken = Regions(self.arena)
        taken.held, self.held = self.held, []
        return taken.release


def arena_full(arena: Arena) -> QueueFull:
    return QueueFull(f"this front's shared memory ({arena.size >> 20} MiB) is full of "
                     "requests in flight; retry later or raise --shm-mb")
