"""A worker process: takes batches from the batcher, runs the model, sends results to fronts.

Copies on this leg: the rows of a batch are gathered into one contiguous array per
input (1 copy; 0 when the batch holds a single request, which the model reads straight
from the front's shared memory); each output is written once into this worker's arena
(1 copy; 0 when an output *is* an input of a one-request batch, as with echo, whose
output then points back at the front's own shared memory).
"""
from __future__ import annotations

import logging
import os
import selectors
import socket
import time
from collections import Counter

import numpy as np

from gpserve import ipc, metrics
from gpserve.config import Config
from gpserve.errors import DeadlineExceeded, GraphPipeError, ModelError
from gpserve.shm import Arena, Segments, pid_alive, segment_path

from .backend import load
from .batch_check import compare
from .devices import worker_device

log = logging.getLogger("gpserve.worker")
RECONNECT_S = 0.1


class _Conn:
    """A stream socket with framing, to the batcher or to one front."""

    def __init__(self, sock: socket.socket, peer_pid: int = 0):
        self.sock, self.frames, self.peer_pid = sock, ipc.FrameBuffer(), peer_pid

    def send(self, message) -> bool:
        try:
            self.sock.sendall(ipc.frame(message))
            return True
        except OSError:
            return False


def _connect(address: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        return None
    if not ipc.same_user(sock):
        log.warning("%r is held by another user's process; not connecting", address)
        sock.close()
        return None
    return sock


class Worker:
    def __init__(self, cfg: Config, index: int):
        self.cfg, self.index = cfg, index
        started = time.perf_counter()
        self.backend = load(cfg, worker_device(cfg.device, index), cfg.threads)
        metrics.MODEL_LOAD_SECONDS.set(time.perf_counter() - started)
        self.arena = Arena(segment_path(cfg.run_id, f"worker{index}-{os.getpid()}"),
                           cfg.arena_bytes)
        self.segments = Segments()
        self.sel = selectors.DefaultSelector()
        self.batcher: _Conn | None = None
        self.fronts: dict[int, _Conn] = {}
        # output regions: token -> [regions, requests that have not released it yet]
        self.outstanding: dict[int, list] = {}
        self.held_by_front: dict[int, Counter] = {}
        # frames for each front, sent in one write per front when a batch is done
        self.outbox: dict[int, list] = {}
        self.counters = ipc.Counters(segment_path(cfg.run_id, "counters"))
        self.merged_batches = 0       # for --batch-check-every
        self.largest_difference = 0.0
        self.told_changed = False     # the warning below, once per worker

    # -- connections -------------------------------------------------------------------
    def _reconnect(self) -> None:
        if self.batcher is None:
            sock = _connect(ipc.batcher_address(self.cfg.run_id))
            if sock is not None:
                self.batcher = _Conn(sock)
                self.batcher.send(ipc.Hello("worker", self.index, os.getpid()))
                self.sel.register(sock, selectors.EVENT_READ, ("batcher", None))
        for i in range(self.cfg.fronts):
            if i not in self.fronts:
                self._connect_front(i)

    def _connect_front(self, i: int, wait_s: float = 0.0) -> _Conn | None:
        """Connect to front ``i`` and read its Hello (its pid), retrying up to ``wait_s``."""
        give_up = time.monotonic() + wait_s
        while True:
            sock = _connect(ipc.front_address(self.cfg.run_id, i))
            if sock is not None:
                conn = _Conn(sock)
                conn.send(ipc.Hello("worker", self.index, os.getpid()))
                sock.settimeout(2.0)
                try:
                    while not conn.peer_pid:
                        data = sock.recv(1 << 16)
                        if not data:
                            raise OSError("front closed the connection")
                        for message in conn.frames.feed(data):
                            if isinstance(message, ipc.Hello):
                                conn.peer_pid = message.pid
                except OSError:
                    sock.close()
                else:
                    sock.settimeout(None)
                    self.fronts[i] = conn
                    self.sel.register(sock, selectors.EVENT_READ, ("front", i))
                    return conn
            if time.monotonic() >= give_up:
                return None
            time.sleep(0.02)

    def _front(self, i: int, pid: int) -> _Conn | None:
        """The link to the front incarnation ``pid`` of index ``i``, connecting if needed."""
        conn = self.fronts.get(i)
        if conn is not None and conn.peer_pid != pid and pid_alive(conn.peer_pid):
            return None                         # that request's front is gone
        if conn is None or conn.peer_pid != pid:
            if conn is not None:
                self._drop("front", i)
            conn = self._connect_front(i, wait_s=2.0)
        return conn if conn is not None and conn.peer_pid == pid else None

    def _drop(self, role: str, index: int | None) -> None:
        conn = self.batcher if role == "batcher" else self.fronts.pop(index)
        self.sel.unregister(conn.sock)
        conn.sock.close()
        if role == "batcher":
            self.batcher = None
            return
        for token, count in self.held_by_front.pop(index, Counter()).items():
            self._release(token, count)
        self.segments.forget_prefix(segment_path(self.cfg.run_id, f"front{index}-"))

    def serve_forever(self) -> None:
        last_try = 0.0
        while True:
            now = time.monotonic()
            if now - last_try > RECONNECT_S and (self.batcher is None or
                                                 len(self.fronts) < self.cfg.fronts):
                self._reconnect()
                last_try = now
            for key, _ in self.sel.select(timeout=RECONNECT_S):
                role, index = key.data
                for message in self._read(role, index):
                    self._handle(message, index)

    def _read(self, role: str, index: int | None) -> list:
        """The whole messages waiting on one connection ([] and dropped when it closed)."""
        conn = self.batcher if role == "batcher" else self.fronts.get(index)
        if conn is None:
            return []
        try:
            data = conn.sock.recv(1 << 16)
        except OSError:
            data = b""
        if not data:
            self._drop(role, index)
            return []
        return conn.frames.feed(data)

    def _handle(self, message, front_index: int | None) -> None:
        if isinstance(message, ipc.Batch):
            rows = self._run_batch(message)
            if self.batcher is not None:   # first, so the next batch can be on its way
                self.batcher.send(ipc.Finished(message.batch_id, rows))
            self._flush()
        elif isinstance(message, ipc.Release):
            held = self.held_by_front.get(front_index)
            for token in message.tokens:
                if held is not None and held[token] > 0:
                    held[token] -= 1
                    if not held[token]:
                        del held[token]
                self._release(token, 1)

    def _release(self, token: int, count: int) -> None:
        entry = self.outstanding.get(token)
        if entry is None:
            return
        entry[1] -= count
        if entry[1] <= 0:
            for offset, nbytes in entry[0]:
                self.arena.release(offset, nbytes)
            del self.outstanding[token]

    # -- running a batch ---------------------------------------------------------------
    def _run_batch(self, batch: ipc.Batch) -> int:
        now = time.monotonic()
        live = []
        for item in batch.items:
            if item.deadline <= now:
                self._fail(item, DeadlineExceeded(
                    "the request's deadline passed before a worker could run it"))
            else:
                live.append(item)
        if not live:
            return 0
        try:
            outputs, single = self._compute(live)
        except Exception as e:  # the model's own error, reported to the caller
            if len(live) > 1:   # find the request that broke the batch; run each alone
                return sum(self._run_batch(ipc.Batch(batch.batch_id, (item,))) for item in live)
            err = e if isinstance(e, GraphPipeError) else ModelError(
                f"the model failed: {type(e).__name__}: {e}")
            self._fail(live[0], err)
            return 0
        if len(live) > 1 and self.cfg.batch_check_every:
            # the 1st merged batch, then every Nth; before delivery, while the request's
            # inputs are surely still in the front's shared memory
            if self.merged_batches % self.cfg.batch_check_every == 0:
                self._check_batching(live[0], outputs)
            self.merged_batches += 1
        self._deliver(batch.batch_id, live, outputs, single)
        return sum(item.rows or 1 for item in live)

    def _check_batching(self, item: ipc.Submit, outputs: list) -> None:
        """Re-run the batch's first request alone and compare it with its rows of the
        batch: does batching change this model's answers (on this device)?"""
        feed = dict(zip(item.input_names, (self.segments.view(r) for r in item.inputs)))
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

    def _compute(self, live: list[ipc.Submit]) -> tuple[list, list | None]:
        """The model's outputs, and the input views when the batch is one request."""
        first = live[0]
        started = time.perf_counter()
        views = [[self.segments.view(ref) for ref in item.inputs] for item in live]
        if len(live) == 1:
            feed = dict(zip(first.input_names, views[0]))            # 0 copies
        else:
            feed = {name: np.concatenate([v[k] for v in views])     # the gather: 1 copy
                    for k, name in enumerate(first.input_names)}
        assembled = time.perf_counter()
        outputs = self.backend.run(feed, list(first.output_names), first.config)
        metrics.BATCH_ASSEMBLY_SECONDS.observe(assembled - started)
        metrics.MODEL_SECONDS.observe(time.perf_counter() - assembled)
        metrics.BATCH_ROWS.observe(sum(item.rows or 1 for item in live))
        if first.rows is not None:
            total = sum(item.rows for item in live)
            for name, out in zip(first.output_names, outputs):
                if np.ndim(out) == 0 or len(out) != total:
                    raise ModelError(f"output {name!r} has shape {list(np.shape(out))} for a "
                                     f"batch of {total} rows; a batchable model must return "
                                     "one row per input row")
        return outputs, views[0] if len(live) == 1 else None

    def _deliver(self, batch_id: int, live: list[ipc.Submit], outputs, single) -> None:
        refs, regions = [], []
        for k, out in enumerate(outputs):
            out = out if isinstance(out, np.ndarray) else np.asarray(out)
            reused = None
            if single is not None:
                reused = next((ref for ref, arr in zip(live[0].inputs, single) if arr is out),
                              None)
            if reused is not None:
                refs.append(reused)                                  # echo: 0 copies
                continue
            placed = self._place(out)
            if placed is None:
                for offset, nbytes in regions:
                    self.arena.release(offset, nbytes)
                err = ModelError(
                    f"the batch's outputs do not fit in the worker's shared memory "
                    f"({self.cfg.arena_bytes >> 20} MiB); raise --shm-mb")
                for item in live:
                    self._fail(item, err)
                return
            ref, offset, nbytes = placed
            refs.append(ref)
            regions.append((offset, nbytes))
        token = batch_id if regions else None
        if regions:
            self.outstanding[token] = [regions, len(live)]
        start = 0
        for item in live:
            if item.rows is None:
                slices = tuple(ipc.OutputSlice(ref, 0, None) for ref in refs)
            else:
                slices = tuple(ipc.OutputSlice(ref, start, start + item.rows) for ref in refs)
                start += item.rows
            if self._to_front(item, ipc.Done(item.req_id, slices, None, token)):
                if token is not None:
                    self.held_by_front.setdefault(item.front, Counter())[token] += 1
            elif token is not None:
                self._release(token, 1)   # that front is gone: nobody will read these rows

    def _place(self, out: np.ndarray):
        """Write an output into the arena (1 copy), waiting briefly for fronts to release."""
        give_up = time.monotonic() + 1.0
        while True:
            placed = self.arena.put(out)
            if placed is not None or time.monotonic() > give_up:
                return placed
            for key, _ in self.sel.select(timeout=0.01):   # take Release messages meanwhile
                role, index = key.data
                if role == "front":                        # fronts send only Releases
                    for message in self._read(role, index):
                        self._handle(message, index)

    def _fail(self, item: ipc.Submit, err: GraphPipeError) -> None:
        self._to_front(item, ipc.Done(item.req_id, (), (err.code, err.message), None))

    def _to_front(self, item: ipc.Submit, message) -> bool:
        """Queue a message for the request's front; False if that front is gone."""
        if self._front(item.front, item.front_pid) is None:
            return False
        self.outbox.setdefault(item.front, []).append(ipc.frame(message))
        return True

    def _flush(self) -> None:
        """One write per front for everything a batch produced."""
        for index, frames in self.outbox.items():
            conn = self.fronts.get(index)
            if conn is not None:
                try:
                    conn.sock.sendall(b"".join(frames))
                except OSError:
                    pass     # the front died; its requests' regions go when we see EOF
        self.outbox = {}


def main(cfg: Config, index: int) -> None:
    from gpserve.logs import setup
    setup(cfg.verbose, f"worker{index}", cfg.log_format)
    worker = Worker(cfg, index)
    log.info("worker %d ready: %s (pid %d)", index, worker.backend.spec.description, os.getpid())
    worker.serve_forever()
