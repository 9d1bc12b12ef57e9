"""Requests in flight in a front process: body to shared memory, cache, submit, results.

Per request: the body is decoded where it arrived (one ASGI message) or after streaming
into this front's shared-memory arena (1 copy), validated against the model, its
tensors placed in shared memory when a worker needs them (0 copies if they are already
there, else 1), and submitted to the batcher as descriptors. The worker's outputs are
read from its arena and encoded into the response (1 copy). See docs/architecture.md.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import time

import numpy as np

from gpserve.cache.keys import row_keys

from . import __version__, ipc, metrics
from . import protocol as P
from .config import Config
from .connections import NOTES
from .errors import (
    BadConfig, BodyTooLarge, DeadlineExceeded, ProtocolError, QueueFull, RequestTimeout,
    TooManyRows, Unavailable, from_code,
)
from .modelspec import ModelSpec
from .protocol.messages import type_of
from .shm import Arena, Segments, segment_path

log = logging.getLogger("gpserve.front")
ABANDONED_GRACE_S = 60.0


class _Pending:
    __slots__ = ("future", "regions", "deadline", "abandoned")

    def __init__(self, future, regions, deadline):
        self.future, self.regions, self.deadline, self.abandoned = future, regions, deadline, False


class _Link(ipc.Link):
    """A connection to the batcher or from a worker; messages go to the FrontState."""

    def __init__(self, state: "FrontState", role: str):
        super().__init__()
        self.state, self.role = state, role
        self.releases: list[int] = []
        self.peer: tuple[int, int] | None = None    # a worker's (index, pid), from its Hello

    def on_connect(self) -> None:
        self.send(ipc.Hello("front", self.state.index, os.getpid()))
        if self.role == "worker":
            self.state.worker_links += 1

    def on_message(self, message) -> None:
        if isinstance(message, ipc.Hello):
            self.peer = (message.index, message.pid)
            return
        self.state.on_message(self, message)

    def on_disconnect(self) -> None:
        self.state.on_lost(self)

    def release(self, token: int) -> None:
        """Tell the worker we are done with an output region (sent with this turn's write)."""
        self.schedule_flush()
        self.releases.append(token)

    def before_flush(self) -> None:
        if self.releases:
            self.outbox.append(ipc.frame(ipc.Release(tuple(self.releases))))
            self.releases = []


class FrontState:
    """Everything one front process holds: arena, links, the requests it waits on."""

    def __init__(self, cfg: Config, spec: ModelSpec, index: int):
        self.cfg, self.spec, self.index = cfg, spec, index
        self.arena = Arena(segment_path(cfg.run_id, f"front{index}-{os.getpid()}"),
                           cfg.arena_bytes)
        self.arena_view = memoryview(self.arena.mm)
        self.segments = Segments()
        self.segments.adopt(self.arena)
        self.counters = ipc.Counters(segment_path(cfg.run_id, "counters"))
        self.batcher: _Link | None = None
        self.pending: dict[int, _Pending] = {}
        self.ids = itertools.count(1)
        self.pid = os.getpid()
        self.timeout = cfg.timeout_ms / 1000.0
        self.server = None          # the uvicorn Server, for draining state
        self.metadata_body = bytes(P.encode_metadata_response(
            spec.metadata(server=f"gpserve {__version__}", version=__version__)))
        self.tasks: list[asyncio.Task] = []
        self.worker_links = 0
        self.unfilled = 0           # arena bytes reserved for bodies not yet arrived
        # String elements a request may hold: each becomes a Python object, so they are
        # bounded before any is decoded; none at all for a model that takes no String.
        takes_strings = spec.echo or any(s.dtype == object for s in spec.inputs)
        self.string_limit = ((cfg.max_strings, "--max-strings") if takes_strings else
                             (0, f"the model takes no String inputs, only "
                                 f"{', '.join(s.describe() for s in spec.inputs)}"))
        if spec.batch_probe:
            metrics.BATCH_DIFFERENCE.set(spec.batch_probe["max_difference"])
        self.cache = None
        if cfg.cache:
            from gpserve.cache.store import RowCache, environment_path
            self.cache = RowCache(environment_path(cfg.cache_dir, spec.name, cfg.model_path),
                                  cfg.cache_size_mb, self.counters, index)

    # -- links -------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.worker_server = await loop.create_unix_server(
            lambda: _Link(self, "worker"),
            sock=ipc.listening_socket(ipc.front_address(self.cfg.run_id, self.index)))
        self.tasks.append(asyncio.create_task(self._keep_batcher()))
        self.tasks.append(asyncio.create_task(self._sweep_abandoned()))

    async def _keep_batcher(self) -> None:
        while True:
            if self.batcher is None:
                try:
                    _, self.batcher = await ipc.connect(ipc.batcher_address(self.cfg.run_id),
                                                        lambda: _Link(self, "batcher"))
                except OSError:
                    pass
            await asyncio.sleep(0.05)

    async def _sweep_abandoned(self) -> None:
        """Free the memory of timed-out requests whose answer will never come."""
        while True:
            await asyncio.sleep(5)
            now = time.monotonic()
            for req_id, p in list(self.pending.items()):
                if p.abandoned and now > p.deadline + ABANDONED_GRACE_S:
                    self._finish(req_id)

    def on_lost(self, link: _Link) -> None:
        if link.role == "worker":
            self.worker_links -= 1
            if link.peer is not None:     # unmap its arena once no answer views it
                index, pid = link.peer
                self.segments.forget(segment_path(self.cfg.run_id, f"worker{index}-{pid}"))
        if link is self.batcher:
            self.batcher = None
            log.warning("lost the batcher; reconnecting")

    def on_message(self, link: _Link, message) -> None:
        if isinstance(message, (ipc.Done, ipc.Reject)):
            p = self.pending.get(message.req_id)
            if p is None or p.abandoned:
                self._finish(message.req_id)
                if isinstance(message, ipc.Done) and message.token is not None:
                    link.release(message.token)
            elif not p.future.done():
                p.future.set_result((link, message))

    def _release_regions(self, regions: list) -> None:
        for offset, nbytes in regions:
            self.arena.release(offset, nbytes)
        regions.clear()

    def _finish(self, req_id: int) -> None:
        p = self.pending.pop(req_id, None)
        if p is not None:
            self._release_regions(p.regions)

    @property
    def ready(self) -> bool:
        draining = self.server is not None and self.server.should_exit
        return (not draining and self.batcher is not None and self.worker_links > 0
                and self.counters.slots[ipc.Counters.READY_WORKERS] > 0)

    # -- one request -------------------------------------------------------------------
    async def read_body(self, scope, receive) -> tuple[memoryview | bytes, list]:
        """The request body and the arena regions it occupies.

        A body that arrives in one ASGI message is used as it is (0 copies here; tensors
        go to shared memory only if a worker needs them, 1 copy, in ``place``). A longer
        one streams into the arena chunk by chunk (1 copy), so its tensors are already in
        shared memory when decoded. uvicorn's ``receive`` has copied each chunk twice on
        its side before we see it.

        A body that stops arriving for ``--body-timeout-s`` is answered 408. A streamed
        body reserves its whole length in the arena before its bytes come, so the bytes
        reserved and not yet arrived, over all of this front's connections, may take at
        most half the arena: idle clients that announce large bodies cannot shut others
        out."""
        limit = self.cfg.max_body_bytes
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        size = None
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                raise ProtocolError(f"Content-Length {length!r} is not a number") from None
            if size > limit:
                raise BodyTooLarge(f"the body is {size} bytes, over --max-body-mb "
                                   f"{self.cfg.max_body_mb:g} MiB ({limit} bytes)")
        patience = self.cfg.body_timeout_s
        got = [0]                                   # bytes received, for the 408's message
        try:
            async with asyncio.timeout(patience) as timer:
                chunk, more = await _receive_chunk(receive)
                got[0] = len(chunk)
                if not more:
                    if size is not None and len(chunk) != size:
                        raise ProtocolError(f"the body has {len(chunk)} bytes, its "
                                            f"Content-Length says {size}")
                    if len(chunk) > limit:
                        raise self._too_large()
                    return chunk, []
                if size is None:
                    return await self._gather(chunk, receive, timer, got), []
                return await self._stream(chunk, size, receive, timer, got)
        except TimeoutError:
            NOTES.acted("body_timeout", f"answered 408 to requests whose body stopped "
                                        f"arriving for --body-timeout-s {patience:g}")
            raise RequestTimeout(
                f"the body stopped arriving: no bytes for {patience:g} s (--body-timeout-s) "
                f"after {got[0]} of {size if size is not None else '?'} bytes") from None

    async def _gather(self, chunk, receive, timer, got: list) -> bytes:
        """A chunked transfer (no Content-Length): joined in memory, then decoded."""
        limit, patience = self.cfg.max_body_bytes, self.cfg.body_timeout_s
        loop, chunks, more = asyncio.get_running_loop(), [chunk], True
        while more:
            timer.reschedule(loop.time() + patience)
            chunk, more = await _receive_chunk(receive)
            got[0] += len(chunk)
            if got[0] > limit:
                raise self._too_large()
            chunks.append(chunk)
        return b"".join(chunks)

    async def _stream(self, chunk, size: int, receive, timer, got: list):
        """A body of known size in several pieces, written into the arena as they come
        (1 copy); its reservation counts as unfilled until its bytes are there."""
        patience, loop = self.cfg.body_timeout_s, asyncio.get_running_loop()
        offset = self._reserve(size)
        mm, pos, end = self.arena.mm, offset, offset + size
        self.unfilled += size
        more = True                  # the first piece came with more to follow
        try:
            while True:
                if pos + len(chunk) > end:
                    raise ProtocolError(f"the body is longer than its Content-Length {size}")
                mm[pos:pos + len(chunk)] = chunk                  # -> shared memory: 1 copy
                pos += len(chunk)
                self.unfilled -= len(chunk)
                got[0] = pos - offset
                if not more:
                    break
                timer.reschedule(loop.time() + patience)
                chunk, more = await _receive_chunk(receive)
            if pos != end:
                raise ProtocolError(f"the body ended after {pos - offset} of {size} bytes")
        except BaseException:
            self.arena.release(offset, size)
            raise
        finally:
            self.unfilled -= end - pos
        return self.arena_view[offset:end], [(offset, size)]

    def _arena_full(self) -> QueueFull:
        return QueueFull(f"this front's shared memory ({self.arena.size >> 20} MiB) is full "
                         "of requests in flight; retry later or raise --shm-mb")

    def _too_large(self) -> BodyTooLarge:
        return BodyTooLarge(f"the body is over --max-body-mb {self.cfg.max_body_mb:g} MiB "
                            f"({self.cfg.max_body_bytes} bytes)")

    def _reserve(self, size: int) -> int:
        """Arena space for a body of ``size`` bytes that is still to arrive."""
        if self.unfilled + size > self.arena.size // 2:
            NOTES.acted("memory_held_by_slow_bodies",
                        "refused bodies: half of this front's shared memory is reserved for "
                        "bodies still arriving")
            raise QueueFull(
                f"this front's shared memory is held by bodies still arriving "
                f"({self.unfilled} bytes announced and not yet received; at most half of "
                f"{self.arena.size >> 20} MiB); retry later")
        offset = self.arena.alloc(size)
        if offset is None:
            raise self._arena_full()
        return offset

    def place(self, arr: np.ndarray, regions: list) -> "ipc.TensorRef":
        """A descriptor for a decoded tensor: its own bytes when they already sit aligned
        in the arena (0 copies), else a copy into a new region (1 copy)."""
        if arr.dtype != object:
            offset = self.arena.offset_of(arr)
            if offset is not None and arr.flags.c_contiguous and arr.flags.aligned:
                return ipc.TensorRef(self.arena.path, offset, type_of(arr.dtype), arr.shape)
        placed = self.arena.put(arr)
        if placed is None:
            raise self._arena_full()
        ref, offset, nbytes = placed
        regions.append((offset, nbytes))
        return ref

    async def infer(self, req: P.InferRequest, regions: list) -> memoryview:
        names, outputs, rows = self.spec.check(list(req.inputs), list(req.input_names),
                                               list(req.output_names))
        if rows is not None and rows > self.cfg.max_queue:
            raise TooManyRows(f"the request has {rows} rows, more than the queue holds "
                              f"(--max-queue {self.cfg.max_queue}); split it into requests "
                              f"of at most {self.cfg.max_queue} rows")
        options = request_options(req.config)
        alone = not options["batch"]
        tensors = list(req.inputs)
        if self.cache is not None and rows and options["cache"]:
            return await self._infer_cached(tensors, names, outputs, req.config, rows, regions,
                                            alone)
        refs = tuple(self.place(a, regions) for a in tensors)
        async with self._compute(refs, names, outputs, req.config, rows, regions,
                                 alone) as arrays:
            return self._encode(arrays)

    @staticmethod
    def _encode(arrays: list[np.ndarray]) -> memoryview:
        """The response from output rows (1 copy: shared memory -> response buffer)."""
        started = time.perf_counter()
        body = P.encode_response(P.InferResponse(arrays))
        metrics.RESPONSE_BUILD_SECONDS.observe(time.perf_counter() - started)
        return body

    async def _infer_cached(self, tensors, names, outputs, config, rows, regions,
                            alone: bool) -> memoryview:
        """Answer the rows the cache knows, compute only the others, merge in row order."""
        keys = row_keys(self.cfg.fingerprint, config, names, tensors)
        cached = self.cache.lookup(keys, outputs)
        missing = [i for i, found in enumerate(cached) if found is None]
        metrics.ROWS.labels("cache").inc(rows - len(missing))
        if not missing:                                   # never reaches the batcher
            self._release_regions(regions)
            return self._encode([np.stack([found[k] for found in cached])
                                 for k in range(len(outputs))])
        if len(missing) == rows:
            refs = tuple(self.place(t, regions) for t in tensors)
        else:
            refs = tuple(self.place_rows(t, missing, regions) for t in tensors)
        async with self._compute(refs, names, outputs, config, len(missing), regions,
                                 alone) as computed:
            merged = computed
            if len(missing) < rows:
                hit = [i for i in range(rows) if cached[i] is not None]
                merged = []
                for k, rows_k in enumerate(computed):
                    out = np.empty((rows,) + rows_k.shape[1:], rows_k.dtype)
                    out[missing] = rows_k
                    out[hit] = np.stack([cached[i][k] for i in hit])
                    merged.append(out)
            body = self._encode(merged)
            # The writer thread needs rows that outlive the worker's shared memory: 1 copy.
            self.cache.store([keys[i] for i in missing], outputs,
                             [np.array(a, copy=True) for a in computed])
            return body

    @contextlib.asynccontextmanager
    async def _compute(self, refs, names, outputs, config, rows, regions, alone=False):
        """Submit to the batcher, wait, and yield the output arrays (views of the worker's
        shared memory, valid inside the block); release everything afterwards. ``alone``
        (or ``--batching off``, or a model that cannot batch) runs the request by itself."""
        if self.batcher is None:
            raise Unavailable("the server is starting or restarting its batcher; try again")
        served_rows = rows if rows is not None else 1
        if alone or self.cfg.batching == "off" or not self.spec.batchable:
            rows = None
        key = (tuple(names), tuple((r.ttype, r.shape[1:]) for r in refs), tuple(outputs),
               config) if rows is not None else ("alone", next(self.ids))
        req_id = next(self.ids)
        deadline = time.monotonic() + self.timeout
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        pending = self.pending[req_id] = _Pending(future, regions, deadline)
        self.batcher.send(ipc.Submit(req_id, self.index, self.pid, refs, tuple(names),
                                     tuple(outputs), config, rows, key, deadline))
        timer = loop.call_later(self.timeout, _expire, future)   # cheaper than wait_for
        try:
            link, message = await future
        except asyncio.TimeoutError:
            # A worker may still read this memory: the abandoned request keeps it (freed
            # when the answer comes) and the caller's list is emptied, so the caller can
            # always release what it holds.
            pending.abandoned, pending.regions = True, regions[:]
            regions.clear()
            raise DeadlineExceeded(f"no result within --timeout-ms {self.cfg.timeout_ms:g}")
        finally:
            timer.cancel()
        try:
            if isinstance(message, ipc.Reject):
                raise from_code(message.code, message.message)
            if message.error is not None:
                raise from_code(*message.error)
            metrics.ROWS.labels("model").inc(served_rows)
            arrays = []
            for sl in message.outputs:
                arr = self.segments.view(sl.ref)   # the worker's arena, or ours for echo
                arrays.append(arr if sl.stop is None else arr[sl.start:sl.stop])
            yield arrays
        finally:
            if isinstance(message, ipc.Done) and message.token is not None:
                link.release(message.token)
            self._finish(req_id)

    def place_rows(self, arr: np.ndarray, rows: list[int], regions: list) -> ipc.TensorRef:
        """Some rows of a tensor, gathered straight into shared memory (1 copy)."""
        if arr.dtype == object:
            return self.place(arr[rows], regions)
        shape = (len(rows),) + arr.shape[1:]
        nbytes = int(np.prod(shape)) * arr.itemsize
        offset = self.arena.alloc(nbytes)
        if offset is None:
            raise self._arena_full()
        regions.append((offset, nbytes))
        dst = self.arena.buf[offset:offset + nbytes].view(arr.dtype).reshape(shape)
        np.take(arr, rows, axis=0, out=dst)
        return ipc.TensorRef(self.arena.path, offset, type_of(arr.dtype), shape)

async def _receive_chunk(receive) -> tuple[bytes, bool]:
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ProtocolError("the client went away while sending the body")
    return message.get("body", b""), message.get("more_body", False)


def request_options(config: str) -> dict[str, bool]:
    """The options gpserve reads from a request's ``config`` (other text goes to the model
    unchanged): ``cache=on|off`` (the row cache) and ``batch=on|off`` (``off`` runs the
    request alone: its answer cannot depend on other requests' rows)."""
    options = {"cache": True, "batch": True}
    if "=" not in config:
        return options
    for token in re.split(r"[;,\s]+", config):
        key, _, value = token.partition("=")
        if key in options:
            if value not in ("on", "off"):
                raise BadConfig(f"config {token!r}: {key} takes 'on' or 'off'")
            options[key] = value == "on"
    return options


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(asyncio.TimeoutError())
