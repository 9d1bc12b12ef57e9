"""A worker process: owns one model instance, its batch queue, and a pipeline that keeps
the device busy.

Fronts connect to every worker and send requests straight here (front -> worker ->
front: two hops). The worker's event loop takes requests and releases, decides batches
(:mod:`gpserve.batch_policy`), gathers each batch's rows, and delivers outputs; the
model runs in a compute thread (runtimes release the GIL while they run), so while
batch n computes, batch n+1 is gathered and batch n-1's outputs are written out and
answered. Echo, which costs nothing, runs inline on the loop.

Before it takes traffic a worker runs every batch size it will form (``--batch-sizes``;
a batch is padded up to the next of them), so no request pays a runtime's first run
of a new shape, and those runs fit the cost model the policy holds batches by.

Copies on this leg: the rows of a batch are gathered into one array per input in this
worker's arena (1 copy; 0 when the batch is one request and needs no padding: the
model reads the front's shared memory); each output's rows are written once into the
arena (1 copy; 0 when an output *is* an input, as with echo, whose output then points
at the gathered rows or back at the front's own shared memory).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from gpserve import heap, ipc, metrics
from gpserve.batch_policy import BatchQueue, BatchSizes, Decision, Queued
from gpserve.config import Config
from gpserve.counters import Counters
from gpserve.errors import (
    DeadlineExceeded,
    GraphPipeError,
    InternalError,
    ModelError,
    QueueFull,
)
from gpserve.shm import Arena, Segments, code_of, segment_path

from .backend import load
from .batch_check import compare, made_up_rows
from .devices import worker_device

log = logging.getLogger("gpserve.worker")
HEARTBEAT_S = 0.1             # the event loop writes its heartbeat this often


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
    rows: int                         # real rows (1 per unbatchable request)
    size: int = 0                     # rows the model runs (padded up), once closed
    views: list = field(default_factory=list)         # per entry: its inputs' arrays
    buffers: list = field(default_factory=list)       # per input: (array, ref) of capacity
    copied: int = 0                   # entries whose rows are in ``buffers`` (-1: none can be)
    feed: dict = field(default_factory=dict)
    regions: list = field(default_factory=list)       # arena regions of gathered inputs
    region_of: dict = field(default_factory=dict)     # id(gathered array) -> its ref
    outcomes: list[Outcome] = field(default_factory=list)   # one per entry
    started: float = 0.0
    took: float | None = None         # seconds in the model, once run as one batch

    @property
    def batchable(self) -> bool:
        return self.entries[0].item.rows is not None


class Worker:
    def __init__(self, cfg: Config, index: int, local: bool = False):
        """``local``: the worker runs in its front's process (``--placement fronts``):
        requests carry their arrays, not descriptors of shared memory, and answers
        carry the output arrays (0 copies either way, no regions to release)."""
        self.cfg, self.index, self.local = cfg, index, local
        started = time.perf_counter()
        self.device = worker_device(cfg.device, index)
        self.backend = load(cfg, self.device, cfg.threads)
        metrics.MODEL_LOAD_SECONDS.set(time.perf_counter() - started)
        spec = self.backend.spec
        self.segments = Segments()
        self.arena = None                        # local: nothing to share with a front
        if not local:
            self.arena = Arena(segment_path(cfg.run_id, f"worker{index}-{os.getpid()}"),
                               cfg.arena_bytes)
            self.segments.adopt(self.arena)
        self.counters = Counters(segment_path(cfg.run_id, "counters"))
        max_batch = cfg.max_batch if cfg.batching != "off" and spec.batchable else 1
        self.sizes = BatchSizes.parse(cfg.batch_sizes, max_batch,
                                      self.device.startswith("cuda"))
        self.queue = BatchQueue(max_batch, cfg.max_delay_ms / 1000, cfg.max_queue, self.sizes)
        self.inline = spec.echo                  # nothing to overlap: no thread hand-off
        self.compute_thread = ThreadPoolExecutor(1, thread_name_prefix="compute")
        self.hello = ipc.Hello("worker", index, os.getpid(),
                               f"{spec.description} (device {self.device})")
        self.running: Batch | None = None        # in the compute thread
        self.staged: Batch | None = None         # gathered, next to run
        self.timer: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None   # see Dispatcher.loop
        self.held_since: float | None = None     # the idle device waits for more rows
        self.pump_scheduled = False
        # output regions: token -> [regions, requests that have not released it yet]
        self.outstanding: dict[int, list] = {}
        self.held_by: dict[ipc.Link, Counter] = {}
        self.tokens = iter(range(1, 1 << 62))
        self.merged_batches = 0                  # for --batch-check-every
        self.rows_answered = metrics.ROWS.labels("model")
        self.largest_difference = 0.0
        self.told_changed = False
        self.warmed: list[int] = []

    # -- start -------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Run every batch size this worker will form, twice (the second run is timed
        for the cost model); the model's made-up rows are those of the batching probe."""
        spec = self.backend.spec
        if self.inline or not spec.batchable:
            return
        outputs = [s.name for s in spec.outputs]
        prepare = getattr(self.backend, "prepare_batch_size", None)
        for size in self.sizes.warm_up():
            if prepare is not None:
                prepare(size)
            feed = made_up_rows(spec, size)
            if feed is None:
                log.warning("no warm-up: the model takes String inputs, so no rows can be "
                            "made up; the first batch of each size will be slow")
                return
            try:
                self.backend.run(feed, outputs, "")
                t0 = time.perf_counter()
                self.backend.run(feed, outputs, "")
                took = time.perf_counter() - t0
                self.queue.costs.observe(size, took)
                if not self.local:
                    self.counters.worker_busy(self.index, None, took)
            except Exception as e:
                log.warning("warm-up at batch size %d failed (%s: %s); the first batch of "
                            "each size will be slow", size, type(e).__name__, str(e)[:200])
                return
            self.warmed.append(size)
        log.info("worker %d warmed batch sizes %s (fixed cost per batch %.2f ms)",
                 self.index, self.warmed, 1e3 * self.queue.costs.fixed_s)

    async def start(self) -> None:
        """Warm up (off the event loop), then say so in the shared counters."""
        self.loop = asyncio.get_running_loop()
        if not self.local:
            self._beat()
        await self.loop.run_in_executor(self.compute_thread, self.warm_up)
        self.counters.worker_ready(self.index, True, self.warmed)

    def _beat(self) -> None:
        """The heartbeat the supervisor watches (see gpserve/supervisor.py: hangs)."""
        self.counters.worker_beat(self.index, time.monotonic())
        self.loop.call_later(HEARTBEAT_S, self._beat)

    async def serve(self) -> None:
        """A worker process: take fronts' connections on this worker's address."""
        await self.start()
        heap.settle()                            # the model and its warm-up stay put
        self.flusher = asyncio.create_task(metrics.flush_periodically())
        server = await self.loop.create_unix_server(
            lambda: ipc.Link(self, self.hello),
            sock=ipc.listening_socket(ipc.worker_address(self.cfg.run_id, self.index)))
        async with server:
            await server.serve_forever()

    # -- links (ipc.Link calls these) --------------------------------------------------
    def on_message(self, link: ipc.Link, message) -> None:
        if type(message) is ipc.Submit:
            refused = self.queue.add(message, link, time.monotonic())
            if refused is not None:
                self.counters.count_queue_full(self.index)
                link.send(ipc.Done(message.req_id, (), (QueueFull.code, refused), None))
            elif not self.pump_scheduled:       # once every message read this turn is in
                self.pump_scheduled = True
                self.loop.call_soon(self.pump)
        elif type(message) is ipc.Release:
            held = self.held_by.get(link)
            for token in message.tokens:
                if held is not None and held[token] > 0:
                    held[token] -= 1
                    if not held[token]:
                        del held[token]
                self._release(token, 1)

    def on_lost(self, link: ipc.Link) -> None:
        """A front went away: forget its queued requests and the outputs it held."""
        self.queue.drop_owner(link)
        for token, count in self.held_by.pop(link, Counter()).items():
            self._release(token, count)
        if link.peer is not None:
            self.segments.forget_prefix(
                segment_path(self.cfg.run_id, f"front{link.peer.index}-{link.peer.pid}"))
        self._publish_load()

    def _release(self, token: int, count: int) -> None:
        entry = self.outstanding.get(token)
        if entry is None:
            return
        entry[1] -= count
        if entry[1] <= 0:
            for offset, nbytes in entry[0]:
                self.arena.release(offset, nbytes)
            del self.outstanding[token]

    def _publish_load(self) -> None:
        rows = self.queue.rows + sum(b.rows for b in (self.running, self.staged) if b)
        self.counters.worker_load(self.index, rows)
        metrics.QUEUE_ROWS.set(self.queue.rows)

    # -- the pipeline ------------------------------------------------------------------
    def pump(self) -> None:
        """Stage a batch if the policy says so (while the device runs, rows of its key
        keep joining it), and start it once the device is free, unless the policy holds
        a partial batch on the idle device for rows about to come."""
        self.pump_scheduled = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        while True:
            now = time.monotonic()
            fresh = self.staged is None
            if fresh:
                decision = self.queue.next(now, busy=self.running is not None)
            elif self.staged.batchable and self.staged.rows < self.queue.max_batch:
                decision = self.queue.more(self.staged.entries[0].item.key,
                                           self.queue.max_batch - self.staged.rows, now)
            else:
                decision = Decision()
            for q in decision.expired:
                self._answer_error(q, DeadlineExceeded(
                    "the request's deadline passed while it waited in the queue "
                    f"(--timeout-ms {self.cfg.timeout_ms:g})"))
            for q in decision.batch:
                metrics.QUEUE_WAIT_SECONDS.observe(now - q.arrived)
            if decision.batch:
                self._stage(decision.batch)
                if self.running is not None or not fresh:
                    continue                # the staged batch takes what is queued
            elif self.staged is None:
                self._wake_after(decision.wait)
                if decision.wait is None:
                    self.held_since = None                 # nothing waits
                elif self.held_since is None:
                    self.held_since = now                  # queued rows held (idle device)
                break
            elif self.running is not None:
                break
            elif self.staged.batchable:     # idle device, a staged batch: hold it?
                wait = self.queue.hold(self.staged.rows, self.staged.entries[0].arrived, now)
                if wait > 0:
                    if self.held_since is None:
                        self.held_since = now
                    self._wake_after(wait)
                    break
            if self.held_since is not None:
                metrics.BATCH_HOLD_SECONDS.observe(now - self.held_since)
                self.held_since = None
            self._start_staged()            # inline: done by now, and this loop goes on
        self._publish_load()

    def _wake_after(self, seconds: float | None) -> None:
        if seconds is not None:
            self.timer = self.loop.call_later(seconds, self.pump)

    def _start_staged(self) -> None:
        batch, self.staged = self.staged, None
        self.running = batch
        if batch is None:
            return
        self._close(batch)
        if self.inline:
            self._compute_safely(batch)
            self._finished(batch, then_pump=False)     # pump()'s own loop takes the next
            return
        loop = self.loop

        def run() -> None:
            self._compute_safely(batch)
            loop.call_soon_threadsafe(self._finished, batch)
        if not self.local:
            self.counters.worker_busy(self.index, time.monotonic())
        self.compute_thread.submit(run)

    def _compute_safely(self, batch: Batch) -> None:
        """A bug of ours while running a batch answers its requests; it never leaves
        them waiting for their deadline, nor the pipeline stuck."""
        try:
            self._compute(batch)
        except Exception as e:
            log.exception("internal error running a batch")
            err = InternalError(f"internal server error: {type(e).__name__}: {e}")
            batch.outcomes = [Outcome(error=err) for _ in batch.entries]

    def _finished(self, batch: Batch, then_pump: bool = True) -> None:
        self.running = None
        if not self.local and not self.inline:
            self.counters.worker_busy(self.index, None, batch.took or 0.0)
        self.queue.device_free(time.monotonic(), batch.rows)
        if then_pump:
            self.pump()                      # the device first, then the answers
        try:
            self._deliver(batch)
        except Exception as e:
            log.exception("internal error delivering a batch")
            err = InternalError(f"internal server error: {type(e).__name__}: {e}")
            for q in batch.entries:
                self._answer_error(q, err)

    def _stage(self, entries: list[Queued]) -> None:
        """Add requests to the staged batch (a new one if none). From its second request
        on, each request's rows are copied into the batch's arena buffers as it joins
        (1 copy), so the gather is done by the time the device frees (or the policy's
        hold ends). A batch formed on an idle device to run at once is gathered as it
        closes."""
        batch = self.staged
        waits = batch is not None or self.running is not None
        if batch is None:
            batch = self.staged = Batch([], 0)
        for q in entries:
            batch.entries.append(q)
            batch.views.append([self._array(ref) for ref in q.item.inputs])
            batch.rows += q.item.rows or 0    # unbatchable: its rows are set on close
        if waits and batch.batchable and len(batch.entries) > 1:
            self._copy_in(batch)

    def _copy_in(self, batch: Batch, capacity: int | None = None) -> bool:
        """Copy the rows of the batch's entries not copied yet into buffers in this
        worker's arena, allocated on first use for ``capacity`` rows (``max_batch``
        while the batch may still grow); False if the arena has no room, the worker is
        in its front, or the inputs are String tensors (then the batch is gathered into
        private memory when it closes)."""
        if not batch.buffers:
            if batch.copied < 0:
                return False
            capacity = capacity if capacity is not None else self.queue.max_batch
            for part in batch.views[0]:
                placed = (self._alloc(part.dtype, (capacity,) + part.shape[1:])
                          if part.dtype != object else None)
                if placed is None:
                    for offset, nbytes in batch.regions:
                        self.arena.release(offset, nbytes)
                    batch.buffers, batch.regions, batch.copied = [], [], -1
                    return False
                out, ref, region = placed
                batch.buffers.append((out, ref))
                batch.regions.append(region)
        started = time.perf_counter()
        row = sum(q.item.rows for q in batch.entries[:batch.copied])
        for q, views in zip(batch.entries[batch.copied:], batch.views[batch.copied:]):
            for (out, _), part in zip(batch.buffers, views):
                out[row:row + q.item.rows] = part                         # the gather: 1 copy
            row += q.item.rows
        batch.copied = len(batch.entries)
        metrics.BATCH_ASSEMBLY_SECONDS.observe(time.perf_counter() - started)
        return True

    def _close(self, batch: Batch) -> None:
        """The batch's model inputs at the size it runs as: one request's own memory (0
        copies), or its requests' rows gathered (1 copy, done as they joined if the
        batch waited), and padded up to a warmed size (a padding row repeats the last
        real row, a valid input)."""
        entries, first = batch.entries, batch.entries[0].item
        if batch.batchable:
            batch.size = self.sizes.pad(batch.rows) if batch.rows else 0
        else:                   # run alone, at its own size: its rows if it has a dim 0
            shape = first.inputs[0].shape if first.inputs else ()
            batch.rows = batch.size = (shape[0] if shape and self.backend.spec.batchable
                                       else 1)
        size, rows = batch.size, batch.rows
        if len(entries) == 1 and size == rows and not batch.buffers:
            batch.feed = dict(zip(first.input_names, batch.views[0]))
            batch.region_of = {id(v): ref for v, ref in zip(batch.views[0], first.inputs)}
            return
        if self._copy_in(batch, capacity=size):      # in the arena: outputs may point in
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
        metrics.BATCH_ASSEMBLY_SECONDS.observe(time.perf_counter() - started)

    def _array(self, ref):
        """A request's input: the array itself from a front in this process, else a view
        of the shared memory its descriptor points at."""
        return ref if self.local else self.segments.view(ref)

    def _alloc(self, dtype, shape):
        """A new array in this worker's arena: (array, descriptor, region), or None when
        the arena is full, or the worker is local (its batches are gathered into private
        memory when they close: nothing to share, nothing to release)."""
        if self.local:
            return None
        nbytes = int(np.prod(shape)) * dtype.itemsize
        offset = self.arena.alloc(nbytes)
        if offset is None:
            return None
        arr = self.arena.buf[offset:offset + nbytes].view(dtype).reshape(shape)
        return arr, ipc.TensorRef(self.arena.path, offset, code_of(dtype), shape), (offset,
                                                                                    nbytes)

    def _compute(self, batch: Batch) -> None:
        """Run the model (in the compute thread): an outcome per request. A merged batch
        that fails is re-run request by request, so one bad request fails alone."""
        first = batch.entries[0].item
        names = list(first.output_names)
        batch.started = time.perf_counter()
        try:
            outputs = self.backend.run(batch.feed, names, first.config)
            self._check_rows(outputs, names, batch)
        except Exception as e:
            if len(batch.entries) == 1:
                batch.outcomes = [Outcome(error=_model_error(e))]
                return
            batch.outcomes = [self._run_alone(q) for q in batch.entries]
            return
        took = batch.took = time.perf_counter() - batch.started
        if first.rows is not None:
            self.queue.costs.observe(batch.size, took)
        start = 0
        for q in batch.entries:
            batch.outcomes.append(Outcome(outputs, start))
            start += q.item.rows or 0          # an empty tensor adds no rows
        if len(batch.entries) > 1 and self.cfg.batch_check_every:
            if self.merged_batches % self.cfg.batch_check_every == 0:
                self._check_batching(batch.entries[0].item, outputs)
            self.merged_batches += 1

    def _run_alone(self, q: Queued) -> Outcome:
        item = q.item
        feed = dict(zip(item.input_names, (self._array(r) for r in item.inputs)))
        try:
            return Outcome(self.backend.run(feed, list(item.output_names), item.config))
        except Exception as e:
            return Outcome(error=_model_error(e))

    @staticmethod
    def _check_rows(outputs, names, batch: Batch) -> None:
        if batch.entries[0].item.rows is None:
            return
        for name, out in zip(names, outputs):
            if np.ndim(out) == 0 or len(out) != batch.size:
                raise ModelError(f"output {name!r} has shape {list(np.shape(out))} for a "
                                 f"batch of {batch.size} rows; a batchable model must return "
                                 "one row per input row")

    def _check_batching(self, item, outputs: list) -> None:
        """Re-run the batch's first request alone and compare it with its rows of the
        batch: does batching change this model's answers (on this device)?"""
        feed = dict(zip(item.input_names, (self._array(r) for r in item.inputs)))
        try:
            alone = self.backend.run(feed, list(item.output_names), item.config)
        except Exception as e:     # it ran in the batch; alone it fails: say so, carry on
            log.warning("batching check: the request failed when run alone: %s", e)
            return
        d = compare([np.asarray(o)[:item.rows] for o in outputs], alone)
        self.counters.record_check(self.index, d.absolute, d.relative, d.changed)
        metrics.BATCH_CHECKS.labels("changed" if d.changed else "same").inc()
        self.largest_difference = max(self.largest_difference, d.absolute)
        metrics.BATCH_DIFFERENCE.set(self.largest_difference)
        if d.changed and not self.told_changed:
            self.told_changed = True
            log.warning("batching changes this model's answers: a request run alone differs "
                        "from its rows in a batch by up to %.3g (%.3g of the output's "
                        "scale); serve with --batching off, or send config 'batch=off', "
                        "where bit-stable answers matter", d.absolute, d.relative)

    # -- answers -----------------------------------------------------------------------
    def _deliver(self, batch: Batch) -> None:
        """Write outputs into the arena (1 copy of the real rows; 0 for an output that is
        an input) and answer each request; one write per front, at the end of the turn."""
        self.counters.add_batch(self.index, batch.rows, batch.size)
        metrics.BATCH_ROWS.observe(batch.rows)
        if batch.took is not None:              # tallied here: the event loop's thread
            metrics.MODEL_SECONDS.observe(batch.took)
        if self.local:
            self._count_answered(batch)
            self._deliver_arrays(batch)
            return
        refs: dict[int, ipc.TensorRef] = {}     # id(output array) -> where it is shared
        regions: list[tuple[int, int]] = []     # arena regions the answers point into
        failed = None
        for outcome in batch.outcomes:
            for out in outcome.outputs or ():
                if id(out) in refs:
                    continue
                ref = batch.region_of.get(id(out))
                if ref is None:
                    out = np.asarray(out)
                    real = out[:batch.rows] if batch.size != batch.rows else out
                    placed = self.arena.put(real)                       # 1 copy
                    if placed is None:
                        failed = ModelError(
                            f"the batch's outputs do not fit in the worker's shared memory "
                            f"({self.cfg.arena_bytes >> 20} MiB); raise --shm-mb")
                        break
                    ref, offset, nbytes = placed
                    regions.append((offset, nbytes))
                refs[id(out)] = ref                                     # else 0 copies
        used = {ref.offset for ref in refs.values() if ref.path == self.arena.path}
        for offset, nbytes in batch.regions:       # gathered inputs: kept if an output
            if offset in used and not failed:
                regions.append((offset, nbytes))
            else:
                self.arena.release(offset, nbytes)
        if failed:
            for offset, nbytes in regions:
                self.arena.release(offset, nbytes)
            for q in batch.entries:
                self._answer_error(q, failed)
            return
        self._count_answered(batch)
        token = next(self.tokens) if regions else None
        answered = 0
        for q, outcome in zip(batch.entries, batch.outcomes):
            if outcome.error is not None:
                self._answer_error(q, outcome.error)
                continue
            slices = _slices(q, outcome, lambda out: refs[id(out)])
            if q.owner.open:
                q.owner.send(ipc.Done(q.item.req_id, slices, None, token))
                if token is not None:
                    self.held_by.setdefault(q.owner, Counter())[token] += 1
                    answered += 1
        if token is not None:
            if answered:
                self.outstanding[token] = [regions, answered]
            else:
                for offset, nbytes in regions:
                    self.arena.release(offset, nbytes)

    def _count_answered(self, batch: Batch) -> None:
        """``gpserve_rows_total{source="model"}``: once per batch (not per request, 2% of
        a front's time on small requests), before any answer leaves, so that a client
        holding its answer sees its rows counted."""
        failed_rows = sum(q.item.rows if q.item.rows is not None else batch.rows
                          for q, outcome in zip(batch.entries, batch.outcomes)
                          if outcome.error is not None)
        if batch.rows > failed_rows:
            self.rows_answered.inc(batch.rows - failed_rows)

    def _deliver_arrays(self, batch: Batch) -> None:
        """Answer a front in this process with the output arrays themselves (0 copies)."""
        for q, outcome in zip(batch.entries, batch.outcomes):
            if outcome.error is not None:
                self._answer_error(q, outcome.error)
                continue
            q.owner.send(ipc.Done(q.item.req_id, _slices(q, outcome, lambda out: out),
                                  None, None))

    def _answer_error(self, q: Queued, err: GraphPipeError) -> None:
        if q.owner.open:
            q.owner.send(ipc.Done(q.item.req_id, (), (err.code, err.message), None))


def _slices(q: Queued, outcome: Outcome, where) -> tuple:
    """A request's rows of each output, at ``where(output)`` (a descriptor, or the array
    itself): all of it for a request that ran alone."""
    start = outcome.start
    if q.item.rows is None or start is None:
        return tuple(ipc.OutputSlice(where(out), 0, None) for out in outcome.outputs)
    stop = start + q.item.rows
    return tuple(ipc.OutputSlice(where(out), start, stop) for out in outcome.outputs)


def _model_error(e: Exception) -> GraphPipeError:
    return e if isinstance(e, GraphPipeError) else ModelError(
        f"the model failed: {type(e).__name__}: {e}")


def main(cfg: Config, index: int) -> None:
    from gpserve.logs import setup
    setup(cfg.verbose, f"worker{index}", cfg.log_format)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    worker = Worker(cfg, index)
    log.info("worker %d ready: %s (pid %d)", index, worker.backend.spec.description, os.getpid())
    asyncio.run(worker.serve())
