"""A batch's inputs: the requests' rows gathered into one array per input, padded up to
a batch size the worker warmed.

Copies: 1 per real row (into this worker's arena, so that an output that *is* an input
can be answered by pointing at it), done as each request joins a staged batch, so the
gather overlaps the batch running before it; 0 when the batch is one request that needs
no padding (the model reads the front's shared memory, or, in a front, the request's
own arrays). String tensors, a full arena and a worker hosted in a front gather into
private memory when the batch closes (1 copy, ``np.concatenate``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from gpserve import metrics
from gpserve.errors import GraphPipeError
from gpserve.shm import Arena, Region, Segments, TensorRef, code_of

from .batch_policy import BatchSizes, Queued


@dataclass(slots=True)
class Outcome:
    """One request's result in a batch: outputs and where its rows start in them (None:
    the outputs are its own, run alone), or an error."""

    outputs: list | None = None
    start: int | None = None
    error: GraphPipeError | None = None


@dataclass(slots=True)
class Batch:
    """A batch on its way through the pipeline: staged (taking rows while the device
    runs the one before), computed, delivered."""

    entries: list[Queued]
    rows: int = 0                     # real rows (1 per unbatchable request)
    size: int = 0                     # rows the model runs (padded up), once closed
    views: list[list[np.ndarray]] = field(default_factory=list)  # per entry: its inputs
    buffers: list[tuple[np.ndarray, TensorRef]] = field(default_factory=list)  # per input
    copied: int = 0                   # entries whose rows are in ``buffers`` (-1: none can be)
    feed: dict[str, np.ndarray] = field(default_factory=dict)
    regions: list[Region] = field(default_factory=list)    # arena regions of ``buffers``
    region_of: dict[int, TensorRef] = field(default_factory=dict)  # id(input) -> its ref
    outcomes: list[Outcome] = field(default_factory=list)   # one per entry
    took: float | None = None         # seconds in the model, once run as one batch
    gather_ns: int = 0                # time gathering and padding its inputs
    waited_ns: int = 0                # its requests' time in the queue, added up

    @property
    def batchable(self) -> bool:
        return self.entries[0].item.rows is not None

    @property
    def key(self) -> tuple:
        return self.entries[0].item.key

    @property
    def arrived(self) -> float:
        return self.entries[0].arrived

    def release(self) -> None:
        """Free the gathered inputs' regions (none is an answer's)."""
        regions, self.regions = self.regions, []
        for region in regions:
            region.release()


class Gather:
    def __init__(self, arena: Arena | None, segments: Segments, sizes: BatchSizes,
                 max_batch: int, model_batchable: bool,
                 model_metrics: metrics.ModelMetrics | None = None):
        """``arena`` None: the worker runs in its front, whose requests carry their
        arrays (nothing to share, nothing to release)."""
        self.arena, self.segments, self.sizes = arena, segments, sizes
        self.assembly = (model_metrics or metrics.ModelMetrics.of("", 1)).batch_assembly
        self.max_batch, self.model_batchable = max_batch, model_batchable

    def array(self, ref) -> np.ndarray:
        """A request's input: the array itself from a front in this process, else a view
        of the shared memory its descriptor points at (0 copies)."""
        return ref if self.arena is None else self.segments.view(ref)

    def add(self, batch: Batch, entries: list[Queued], copy_now: bool) -> None:
        """Requests join the batch. ``copy_now`` (the batch waits for the device): from
        its second request on, rows are copied into the batch's buffers as they join, so
        the gather is done by the time the device frees."""
        for q in entries:
            batch.entries.append(q)
            batch.views.append([self.array(ref) for ref in q.item.inputs])
            batch.rows += q.item.rows or 0    # unbatchable: its rows are set on close
        if copy_now and batch.batchable and len(batch.entries) > 1:
            self.copy_in(batch)

    def copy_in(self, batch: Batch, capacity: int | None = None) -> bool:
        """Copy the rows of the entries not copied yet into the batch's buffers in this
        worker's arena, allocated on first use for ``capacity`` rows (``max_batch``
        while the batch may still grow); False if they cannot be there (no room, a
        worker in its front, String inputs)."""
        if not batch.buffers and not self._allocate(
                batch, self.max_batch if capacity is None else capacity):
            return False
        started = time.perf_counter()
        row = sum(q.item.rows or 0 for q in batch.entries[:batch.copied])
        for q, views in zip(batch.entries[batch.copied:], batch.views[batch.copied:]):
            rows = q.item.rows or 0           # a batchable request's: never None here
            for (out, _), part in zip(batch.buffers, views):
                out[row:row + rows] = part                                # the gather: 1 copy
            row += rows
        batch.copied = len(batch.entries)
        self.assembly.observe(time.perf_counter() - started)
        return True

    def _allocate(self, batch: Batch, capacity: int) -> bool:
        if batch.copied < 0 or self.arena is None:
            return False
        for part in batch.views[0]:
            region = None
            if part.dtype != object:
                shape = (capacity,) + part.shape[1:]
                region = self.arena.alloc(math.prod(shape) * part.dtype.itemsize)
            if region is None:
                batch.release()
                batch.buffers, batch.copied = [], -1
                return False
            batch.buffers.append((region.array(part.dtype, shape),
                                  region.ref(code_of(part.dtype), shape)))
            batch.regions.append(region)
        return True

    def close(self, batch: Batch) -> None:
        """Set ``batch.feed``: the model's inputs at the size the batch runs as (padded
        up to a warmed size; a padding row repeats the last real row, a valid input)."""
        entries, first = batch.entries, batch.entries[0].item
        if batch.batchable:
            batch.size = self.sizes.pad(batch.rows) if batch.rows else 0
        else:                   # run alone, at its own size: its rows if it has a dim 0
            shape = first.inputs[0].shape if first.inputs else ()
            batch.rows = batch.size = shape[0] if shape and self.model_batchable else 1
        size, rows = batch.size, batch.rows
        if len(entries) == 1 and size == rows and not batch.buffers:    # 0 copies
            batch.feed = dict(zip(first.input_names, batch.views[0]))
            batch.region_of = {id(v): ref for v, ref in zip(batch.views[0], first.inputs)
                               if type(ref) is TensorRef}     # not an Inline's bytes
            return
        if self.copy_in(batch, capacity=size):      # in the arena: outputs may point in
            for (out, ref), name in zip(batch.buffers, first.input_names):
                if size > rows:
                    out[rows:size] = out[rows - 1:rows]
                view = out[:size]
                batch.region_of[id(view)] = ref._replace(shape=view.shape)
                batch.feed[name] = view
            return
        started = time.perf_counter()     # String tensors, a full arena, or a local worker
        for k, name in enumerate(first.input_names):
            parts = [v[k] for v in batch.views]
            if size > rows:                       # padding: the last real row again
                last = next(p for p in reversed(parts) if len(p))[-1:]
                parts += [last] * (size - rows)
            batch.feed[name] = np.concatenate(parts)     # the gather and padding: 1 copy
        self.assembly.observe(time.perf_counter() - started)
