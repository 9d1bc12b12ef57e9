"""A worker process: owns one model instance, its batch queue, and a pipeline that keeps
the device busy.

Fronts connect to every worker and send requests straight here (front -> worker ->
front: two hops). The worker's event loop takes requests and releases, asks the
pipeline (:mod:`.pipeline`, over the batching policy of :mod:`.batch_policy`) what to
do, gathers each batch's rows (:mod:`.gather`) and answers (:mod:`.delivery`); the
model runs in a compute thread (:mod:`.compute`; runtimes release the GIL while they
run), so while batch n computes, batch n+1 is gathered and batch n-1's outputs are
written out and answered. Echo, and on the CPU a batch expected to take under 1 ms,
run inline on the loop: a hand-off to the thread would cost more (:meth:`Worker._cheap`).

A model that runs in the fronts (``--placement fronts``) is a Worker too, one in each
front (``local``): the front calls it (:meth:`Worker.call`), no link between them.

Before it takes traffic a worker runs every batch size it will form (``--batch-sizes``;
a batch is padded up to the next of them), so no request pays a runtime's first run
of a new shape, and those runs fit the cost model the policy holds batches by.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

from gpserve import heap, ipc, metrics
from gpserve.config import Config
from gpserve.counters import HEARTBEAT_S, Counters
from gpserve.errors import DeadlineExceeded, InternalError, QueueFull
from gpserve.ipc import End
from gpserve.shm import Arena, Segments, segment_path

from .backend import Backend, load
from .batch_policy import BatchQueue, BatchSizes
from .compute import LiveCheck, Model
from .delivery import Caller, Delivery, Leases, answer_error
from .devices import worker_device
from .gather import Batch, Gather
from .pipeline import Pipeline

log = logging.getLogger("gpserve.worker")
INLINE_BELOW_S = 0.001     # on the CPU, a batch expected to take less runs on the loop


class Worker:
    loop: asyncio.AbstractEventLoop     # set by start(); see Dispatcher.loop

    def __init__(self, cfg: Config, index: int, local: bool = False,
                 backend: Backend | None = None):
        """``local``: the worker runs in its front's process (``--placement fronts``):
        requests carry their arrays, not descriptors of shared memory, and answers
        carry the output arrays (0 copies either way, no regions to release).
        ``backend``: one already loaded (tests), else the model is loaded here."""
        self.cfg, self.index, self.local = cfg, index, local
        started = time.perf_counter()
        self.device = worker_device(cfg.device, index)
        self.backend = backend or load(cfg, self.device, cfg.threads)
        self.model_metrics = metrics.ModelMetrics.of(cfg.model_name, cfg.version)
        self.model_metrics.load_seconds.set(time.perf_counter() - started)
        spec = self.backend.spec
        self.segments = Segments()
        self.arena = None                        # local: nothing to share with a front
        if not local:
            self.arena = Arena(segment_path(cfg.run_id, cfg.scoped(f"worker{index}-{os.getpid()}")),
                               cfg.arena_bytes)
            self.segments.adopt(self.arena)
        self.counters = Counters(segment_path(cfg.run_id, cfg.scoped("counters")))
        max_batch = cfg.max_batch if cfg.batching != "off" and spec.batchable else 1
        on_gpu = self.device.startswith("cuda")
        self.sizes = BatchSizes.parse(cfg.batch_sizes, max_batch, on_gpu)
        # a GPU's batches all run in the compute thread (see _cheap); so do those of the
        # stand-in for one (workers/standin.py), which sleeps as a device runs
        self.device_like = on_gpu or spec.backend == "standin"
        self.queue = BatchQueue(max_batch, cfg.max_delay_ms / 1000, cfg.max_queue, self.sizes)
        self.pipeline = Pipeline(self.queue)
        self.gather = Gather(self.arena, self.segments, self.sizes, max_batch, spec.batchable,
                             self.model_metrics)
        check = (LiveCheck(cfg.batch_check_every, self.counters, index, self.model_metrics)
                 if cfg.batch_check_every else None)
        self.model = Model(self.backend, self.queue.costs, self.gather, check)
        self.leases = Leases()
        self.delivery = Delivery(self.arena, self.leases, self._count_answered)
        self.inline = spec.echo                  # nothing to overlap: no thread hand-off
        self.compute_thread = ThreadPoolExecutor(1, thread_name_prefix="compute")
        self.hello = ipc.Hello("worker", index, os.getpid(),
                               f"{spec.description} (device {self.device})")
        self.running: Batch | None = None        # in the compute thread
        self.staged: Batch | None = None         # gathered, next to run
        self.timer: asyncio.TimerHandle | None = None
        self.pump_scheduled = False
        self.rows_answered = self.model_metrics.rows_model
        self.warmed: list[int] = []
        self.call_ids = itertools.count(1)       # local: its front's requests
        self.timeout_s = cfg.timeout_ms / 1000
        self.deadline_timer: asyncio.TimerHandle | None = None   # local: see
        self.deadline_at = math.inf                                # _expire_in_pipeline

    # -- start -------------------------------------------------------------------------
    async def start(self) -> None:
        """Warm up (off the event loop), then say so in the shared counters."""
        self.loop = asyncio.get_running_loop()
        if not self.local:
            self._beat()
        await self.loop.run_in_executor(self.compute_thread, self.warm_up)
        self.counters.worker_ready(self.index, True, self.warmed)

    def warm_up(self) -> None:
        if self.inline or not self.backend.spec.batchable:
            return
        on_run = None if self.local else (
            lambda took: self.counters.worker_busy(self.index, None, took))
        self.warmed = self.model.warm_up(self.sizes.warm_up(), on_run)
        log.info("worker %d warmed batch sizes %s (fixed cost per batch %.2f ms)",
                 self.index, self.warmed, 1e3 * self.queue.costs.fixed_s)

    def close(self) -> None:
        """An instance in a front whose model was retired: its compute thread goes (the
        model with it, once nothing refers to it)."""
        self.compute_thread.shutdown(wait=False)

    def _beat(self) -> None:
        """The heartbeat the supervisor watches (see gpserve/supervisor.py: hangs)."""
        self.counters.worker_beat(self.index, time.monotonic())
        self.loop.call_later(HEARTBEAT_S, self._beat)

    async def serve(self) -> None:
        """A worker process: take fronts' connections on this worker's address."""
        await self.start()
        heap.settle()                            # the model and its warm-up stay put
        self.flusher = asyncio.create_task(metrics.flush_periodically())
        address = ipc.worker_address(self.cfg.run_id, self.cfg.scoped(f"worker{self.index}"))
        server = await self.loop.create_unix_server(
            lambda: ipc.Link(self, self.hello), sock=ipc.listening_socket(address))
        async with server:
            await server.serve_forever()

    # -- requests: from links (ipc.Link), or called by the front it runs in ------------
    def on_message(self, link, message) -> None:
        if type(message) is ipc.Submit:
            self.take(message, link, time.monotonic())
        elif type(message) is ipc.Release:
            self.leases.give_back(link, message.tokens)

    def take(self, item: ipc.Submit, owner: End, now: float) -> None:
        """A request for the queue; its answer goes to ``owner``."""
        refused = self.queue.add(item, owner, now)
        if refused is not None:
            self.counters.count_queue_full(self.index)
            owner.send(ipc.Done(item.req_id, (), (QueueFull.code, refused), None))
        elif not self.pump_scheduled:       # once every request of this turn is in
            self.pump_scheduled = True
            self.loop.call_soon(self.pump)

    def call(self, inputs: tuple, input_names: tuple, output_names: tuple, config: str,
             rows: int | None, key: tuple) -> asyncio.Future:
        """A request of the front this worker runs in (``local``), made directly: no
        message, no link. The future's result is the request's output arrays (0 copies);
        its exception, why there are none."""
        now = time.monotonic()
        caller = Caller(self.loop.create_future())
        self.take(ipc.Submit(next(self.call_ids), inputs, input_names, output_names, config,
                             rows, key, now + self.timeout_s), caller, now)
        return caller.future

    def on_lost(self, link) -> None:
        """A front went away: forget its queued requests and the outputs it held."""
        self.queue.drop_owner(link)
        self.leases.forget(link)
        if link.peer is not None:
            self.segments.forget_prefix(
                segment_path(self.cfg.run_id, f"front{link.peer.index}-{link.peer.pid}"))
        self._publish_load()

    def _publish_load(self) -> None:
        rows = self.queue.rows
        if self.running is not None:
            rows += self.running.rows
        if self.staged is not None:
            rows += self.staged.rows
        self.counters.worker_load(self.index, rows)
        self.model_metrics.queue_rows.set(self.queue.rows)

    # -- the pipeline ------------------------------------------------------------------
    def pump(self) -> None:
        """Carry out the pipeline's steps until one says there is nothing more to do
        now (see :mod:`.pipeline`)."""
        self.pump_scheduled = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        while True:
            now = time.monotonic()
            step = self.pipeline.step(now, self.staged, self.running is not None)
            for q in step.expired:
                answer_error(q, DeadlineExceeded(
                    "the request's deadline passed while it waited in the queue "
                    f"(--timeout-ms {self.cfg.timeout_ms:g})"))
            if step.take:
                waits = self.staged is not None or self.running is not None
                if self.staged is None:
                    self.staged = Batch([])
                waited, observe = 0.0, self.model_metrics.queue_wait.observe
                for q in step.take:
                    observe(now - q.arrived)
                    waited += now - q.arrived
                self.staged.waited_ns += int(waited * 1e9)
                started = time.perf_counter_ns()
                self.gather.add(self.staged, step.take, copy_now=waits)
                self.staged.gather_ns += time.perf_counter_ns() - started
            if step.held_s is not None:
                self.model_metrics.batch_hold.observe(step.held_s)
            if step.start:
                self._start_staged()           # inline: done by now, and this loop goes on
            if step.done:
                if step.wait is not None:
                    self.timer = self.loop.call_later(step.wait, self.pump)
                break
        self._publish_load()

    def _start_staged(self) -> None:
        batch, self.staged = self.staged, None
        self.running = batch
        if batch is None:
            return
        started = time.perf_counter_ns()
        self.gather.close(batch)
        batch.gather_ns += time.perf_counter_ns() - started
        if self.inline or self._cheap(batch):
            self.model.compute(batch)
            self._finished(batch, then_pump=False)     # pump()'s own loop takes the next
            return
        loop = self.loop

        def run() -> None:
            self.model.compute(batch)
            loop.call_soon_threadsafe(self._finished, batch)
        if not self.local:
            self.counters.worker_busy(self.index, time.monotonic())
        elif batch.entries[0].item.deadline < self.deadline_at:
            self._expire_in_pipeline()
        self.compute_thread.submit(run)

    def _cheap(self, batch: Batch) -> bool:
        """On the CPU, a batch the cost model expects to take under ``INLINE_BELOW_S``
        runs on the event loop. Handing it to the compute thread and back costs two
        wake-ups and the GIL passed twice, more than such a batch (a small ONNX model:
        1.6x the requests/s in a front, 1.25x in a worker process, docs/benchmarks.md);
        longer ones keep the thread, so that the loop takes and gathers the next batch
        meanwhile and never stalls long. On a GPU every batch keeps the thread, the
        pipeline's overlap of gathering with the device (unmeasured there without it)."""
        if self.device_like:
            return False
        expected = self.queue.costs.expected(batch.size)
        return expected is not None and expected < INLINE_BELOW_S

    def _expire_in_pipeline(self) -> None:
        """Local: fail the front's requests whose deadline passed in a batch that runs or
        waits for the device (a slow or stuck model; queued ones expire in the queue),
        then look again at the next deadline. One timer, armed as a batch starts. (A
        worker in its own process needs none: its front keeps the deadlines.)"""
        if self.deadline_timer is not None:
            self.deadline_timer.cancel()
        self.deadline_timer, self.deadline_at = None, math.inf
        now, soonest = time.monotonic(), None
        for batch in (self.running, self.staged):
            for q in batch.entries if batch is not None else ():
                if not q.owner.open:
                    continue
                if q.item.deadline <= now:
                    answer_error(q, DeadlineExceeded(
                        f"no result within --timeout-ms {self.cfg.timeout_ms:g}: the model "
                        "was still running the batch it is in, or the one before"))
                elif soonest is None or q.item.deadline < soonest:
                    soonest = q.item.deadline
        if soonest is not None:
            self.deadline_at = soonest
            self.deadline_timer = self.loop.call_later(soonest - now,
                                                       self._expire_in_pipeline)

    def _finished(self, batch: Batch, then_pump: bool = True) -> None:
        self.running = None
        if not self.local and not self.inline:
            self.counters.worker_busy(self.index, None, batch.took or 0.0)
        self.queue.device_free(time.monotonic(), batch.rows)
        if then_pump:
            self.pump()                      # the device first, then the answers
        self.model_metrics.batch_rows.observe(batch.rows)
        if batch.took is not None:              # tallied here: the event loop's thread
            self.model_metrics.model_seconds.observe(batch.took)
        started = time.perf_counter_ns()
        try:
            self.delivery.deliver(batch)
        except Exception as e:
            log.exception("internal error delivering a batch")
            err = InternalError(f"internal server error: {type(e).__name__}: {e}")
            for q in batch.entries:
                answer_error(q, err)
        self.counters.worker_batch(
            self.index, len(batch.entries), batch.rows, batch.size, batch.waited_ns,
            None if batch.took is None else       # not run as one execution
            (batch.gather_ns, int(batch.took * 1e9), time.perf_counter_ns() - started))

    def _count_answered(self, batch: Batch) -> None:
        """``gpserve_rows_total{source="model"}``: once per batch (not per request, 2% of
        a front's time on small requests), before any answer leaves, so that a client
        holding its answer sees its rows counted."""
        answered = batch.rows
        for q, outcome in zip(batch.entries, batch.outcomes):
            if outcome.error is not None:
                answered -= q.item.rows if q.item.rows is not None else batch.rows
        if answered > 0:
            self.rows_answered.inc(answered)


def main(cfg: Config, index: int) -> None:
    from gpserve.logs import setup
    setup(cfg.verbose, f"worker{index}" + (f"[{cfg.model_name}:{cfg.version}]" if cfg.slot
                                          else ""), cfg.log_format)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    worker = Worker(cfg, index)
    log.info("worker %d ready: %s (pid %d)", index, worker.backend.spec.description, os.getpid())
    asyncio.run(worker.serve())
