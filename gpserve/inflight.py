"""One model as a front serves it, and its requests in flight: validation, the row cache,
a worker's answer, the response.

Per request: the body (see :mod:`gpserve.body`) is decoded, validated against the
model, its tensors placed in shared memory when a worker needs them (0 copies if they
are already there, else 1; :mod:`gpserve.regions`), and sent as descriptors to a
worker (:mod:`gpserve.dispatch`). The worker's outputs are read from its arena and
encoded into the response (1 copy). See docs/architecture.md.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from gpserve.cache.keys import row_keys

from . import __version__, metrics
from . import protocol as P
from .config import Config
from .counters import Counters
from .dispatch import Dispatcher
from .errors import BadConfig, TooManyRows, from_code
from .modelspec import ModelSpec
from .regions import Regions
from .request import Request
from .shm import segment_path

if TYPE_CHECKING:                       # lmdb is imported only with --cache
    from gpserve.cache.store import RowCache
    from gpserve.workers.worker import Worker

    from .front_state import FrontState

log = logging.getLogger("gpserve.front")


class ModelState:
    """One model version as a front serves it: its links to its workers (or the instance
    this front hosts), its checks, its row cache and its counters."""

    def __init__(self, front: FrontState, cfg: Config, spec: ModelSpec, hosted=None):
        """``hosted``: this front's instance of the model, loaded already (a model that
        runs in the fronts, added while serving: loaded off the event loop)."""
        self.front, self.cfg, self.spec, self.index = front, cfg, spec, front.index
        self.name = spec.name
        self.counters = front.counters if not cfg.slot else Counters(
            segment_path(cfg.run_id, cfg.scoped("counters")))
        self.segments = front.segments
        # the model's instance in this front (``--placement fronts``), called directly;
        # else the links to its worker processes
        self.hosted: Worker | None = hosted
        self.workers: Dispatcher | None = None
        if cfg.placement == "fronts":
            if hosted is None:
                self.hosted = hosted_instance(cfg, self.index)
            self.counters.set_pid("worker", self.index, os.getpid())
        else:
            self.workers = Dispatcher(cfg.run_id, self.index, cfg.workers, self.counters,
                                      self.segments, cfg.timeout_ms / 1000.0, cfg.scoped(""))
        self.tasks: list[asyncio.Task] = []
        self.ids = itertools.count(1)
        self.metadata_body = bytes(P.encode_metadata_response(
            spec.metadata(server=f"gpserve {__version__}", version=__version__)))
        # String elements a request may hold: each becomes a Python object, so they are
        # bounded before any is decoded; none at all for a model that takes no String.
        takes_strings = spec.echo or any(s.dtype == object for s in spec.inputs)
        self.string_limit = ((cfg.max_strings, "--max-strings") if takes_strings else
                             (0, f"the model takes no String inputs, only "
                                 f"{', '.join(s.describe() for s in spec.inputs)}"))
        self.model_metrics = metrics.ModelMetrics.of(spec.name, cfg.version)
        if spec.batch_probe:
            self.model_metrics.batch_difference.set(spec.batch_probe["max_difference"])
        self.cache: RowCache | None = None
        self.compute_s = 0.0            # a request's rows computed, lately (cached models)
        if cfg.cache:
            from gpserve.cache.environment import environment_path
            from gpserve.cache.store import RowCache
            shared = None
            if cfg.cache_shared:
                from gpserve.cache.shared import SharedTier
                shared = SharedTier(cfg.cache_shared, cfg.cache_shared_timeout_ms,
                                    cfg.cache_shared_ttl_s, self.counters, self.index,
                                    self.model_metrics)
            self.cache = RowCache(environment_path(cfg.cache_dir, spec.name, cfg.model_path),
                                  cfg.cache_size_mb, self.counters, self.index,
                                  self.model_metrics, shared)

    async def start(self) -> None:
        if self.cache is not None and self.cache.shared is not None:
            self.cache.shared.start()
        if self.hosted is not None:
            await self.hosted.start()
        if self.workers is not None:
            self.tasks.append(asyncio.create_task(self.workers.sweep_abandoned()))
            self.tasks.append(asyncio.create_task(self.workers.keep_connected()))

    def close(self) -> None:
        """Retired (no request holds it any more): its links, tasks and instance go."""
        for task in self.tasks:
            task.cancel()
        if self.workers is not None:
            self.workers.close()
        if self.hosted is not None:
            self.hosted.close()
        if self.cache is not None:
            self.cache.close()

    @property
    def version(self) -> str:
        return str(self.cfg.version)

    @property
    def ready(self) -> bool:
        """Not draining, and its instance here warm, or linked to every worker that is
        up (and at least one)."""
        if self.front.draining:
            return False
        if self.workers is None:
            return self.counters.worker_is_ready(self.index)
        return self.workers.ready

    def linked(self) -> list[dict]:
        """The workers that run this model for this front, as they describe themselves
        (``GET /``): its instance here, or its worker processes."""
        if self.hosted is not None:
            hello = self.hosted.hello
            return [{"index": hello.index, "pid": hello.pid, "runs": hello.about}]
        assert self.workers is not None, "a model runs here or in workers"
        return self.workers.about()

    async def infer(self, req: P.InferRequest, request: Request) -> memoryview:
        """A GraphPipe request's response body."""
        _, arrays = await self.run(list(req.inputs), list(req.input_names),
                                   list(req.output_names), req.config, request)
        started = time.perf_counter()
        body = P.encode_response(P.InferResponse(arrays))    # 1 copy: -> response
        metrics.RESPONSE_BUILD_SECONDS.observe(time.perf_counter() - started)
        return body

    async def run(self, tensors: list[np.ndarray], input_names: list[str],
                  output_names: list[str], config: str, request: Request):
        """Validate, answer from the cache what it knows, run the rest on a worker.

        The protocol-neutral core of a request, whichever protocol decoded it: returns
        (output names, output arrays). The arrays may be views of a worker's shared
        memory, valid until the request closes: encode them before."""
        started, ok = time.perf_counter_ns(), False
        try:
            names, outputs, rows = self.spec.check(tensors, input_names, output_names)
            if rows is not None and rows > self.cfg.max_queue:
                raise TooManyRows(f"the request has {rows} rows, more than the queue "
                                  f"holds (--max-queue {self.cfg.max_queue}); split it into "
                                  f"requests of at most {self.cfg.max_queue} rows")
            options = request_options(config)
            alone = not options.batch
            if self.cache is not None and rows and options.cache:
                arrays = await self._run_cached(tensors, names, outputs, config, rows,
                                                request, alone)
            else:
                refs = tuple([self._for_worker(request.regions, t) for t in tensors])
                arrays = await self._compute(tensors, refs, names, outputs, config, rows,
                                             request, alone)
            ok = True
            return outputs, arrays
        finally:            # Triton's statistics: success or fail, and how long it took
            self.counters.front_inference(self.index, ok, time.perf_counter_ns() - started,
                                          time.time_ns() // 1_000_000)

    async def _run_cached(self, tensors, names, outputs, config, rows, request: Request,
                          alone: bool):
        """Answer the rows the cache knows, compute only the others, merge in row order."""
        cache = self.cache
        assert cache is not None, "called with the cache on"
        started = time.perf_counter_ns()
        keys = row_keys(self.cfg.fingerprint, config, names, tensors)
        cached = cache.lookup(keys, outputs)
        missing = [i for i, found in enumerate(cached) if found is None]
        self.model_metrics.rows_cache.inc(rows - len(missing))
        if missing and cache.shared is not None:       # the shared tier: one round trip
            found, sound = await cache.shared.lookup([keys[i] for i in missing], outputs,
                                                     self.compute_s)
            for i, rows_i in zip(missing, found):
                cached[i] = rows_i
            cache.put(sound)                           # to LMDB, as they are
            self.model_metrics.rows_shared.inc(len(sound))
            missing = [i for i in missing if cached[i] is None]
        looked_up = time.perf_counter_ns() - started
        if not missing:                                   # never reaches a worker
            self.counters.front_cache(self.index, True, looked_up)
            request.close()
            return [np.stack([found[k] for found in cached]) for k in range(len(outputs))]
        refs = tuple(self._for_worker(request.regions, t,
                                      None if len(missing) == rows else missing)
                     for t in tensors)
        computing = time.perf_counter()
        computed = await self._compute(tensors, refs, names, outputs, config, len(missing),
                                       request, alone)
        # what computing takes now (a moving average): the shared tier may wait as long
        self.compute_s += 0.1 * (time.perf_counter() - computing - self.compute_s)
        merged = computed
        if len(missing) < rows:
            hit = [i for i in range(rows) if cached[i] is not None]
            merged = []
            for k, rows_k in enumerate(computed):
                out = np.empty((rows,) + rows_k.shape[1:], rows_k.dtype)
                out[missing] = rows_k
                out[hit] = np.stack([cached[i][k] for i in hit])
                merged.append(out)
        # The writer thread needs rows that outlive the worker's shared memory: 1 copy.
        stored = time.perf_counter_ns()
        cache.store([keys[i] for i in missing], outputs,
                    [np.array(a, copy=True) for a in computed])
        self.counters.front_cache(self.index, False,
                                  looked_up + time.perf_counter_ns() - stored)
        return merged

    def _for_worker(self, regions: Regions, tensor: np.ndarray, rows: list[int] | None = None):
        """What a worker is sent of a tensor (or of some of its rows): the array itself
        for the worker in this process (0 copies; 1 for some rows), else a descriptor of
        shared memory (0 copies if the tensor is already there, else 1)."""
        if self.hosted is not None:
            return tensor if rows is None else tensor[rows]
        return regions.place(tensor) if rows is None else regions.place_rows(tensor, rows)

    def _compute(self, tensors, refs, names, outputs, config, rows, request: Request,
                 alone=False) -> Awaitable[Sequence[np.ndarray]]:
        """Run ``refs`` (what the model is given of ``tensors``, or of some of their rows)
        on the model's instance here or on a worker: what to await for the output arrays
        (a worker's: views of its shared memory, given back when the request closes).
        ``alone`` (or ``--batching off``, or a model that cannot batch) runs the request
        by itself. Not a coroutine: the instance here is awaited directly."""
        if alone or self.cfg.batching == "off" or not self.spec.batchable:
            rows = None
        key = ("alone", next(self.ids)) if rows is None else (   # requests of a key batch
            tuple(names), tuple([(t.dtype.str, t.shape[1:]) for t in tensors]),
            tuple(outputs), config)
        if self.hosted is not None:
            # the answer is the output arrays themselves. Nothing to hand over at a
            # deadline: no other process reads the request's memory, and the model reads
            # it only for this request's own answer (a merged batch runs on rows gathered
            # into memory of its own).
            return self.hosted.call(refs, tuple(names), tuple(outputs), config, rows, key)
        return self._on_worker(refs, tuple(names), tuple(outputs), config, rows, key,
                               request)

    async def _on_worker(self, refs, names: tuple, outputs: tuple, config: str,
                         rows: int | None, key: tuple, request: Request) -> list[np.ndarray]:
        assert self.workers is not None, "a model runs here or in workers"
        link, done = await self.workers.run(refs, names, outputs, config, rows, key,
                                            request.hand_over)
        request.answered(link, done.token)
        if done.error is not None:
            raise from_code(*done.error)
        arrays = []
        for sl in done.outputs:         # a view of the worker's arena (or of ours, for echo)
            arr = self.segments.view(sl.ref)
            arrays.append(arr if sl.stop is None else arr[sl.start:sl.stop])
        return arrays


def hosted_instance(cfg: Config, index: int):
    """This front's own instance of a model that runs in the fronts (loaded here)."""
    from gpserve.workers.worker import Worker
    return Worker(cfg, index, local=True)


class Options(NamedTuple):
    """The options gpserve reads from a request's ``config``."""

    cache: bool = True      # cache=on|off: the row cache
    batch: bool = True      # batch=on|off: off runs the request alone


DEFAULT_OPTIONS = Options()


def request_options(config: str) -> Options:
    """The options gpserve reads from a request's ``config`` (other text goes to the model
    unchanged): ``cache=on|off`` (the row cache) and ``batch=on|off`` (``off`` runs the
    request alone: its answer cannot depend on other requests' rows). A config with no
    ``=`` (most) costs one search."""
    if "=" not in config:
        return DEFAULT_OPTIONS
    options = DEFAULT_OPTIONS._asdict()
    for token in re.split(r"[;,\s]+", config):
        key, _, value = token.partition("=")
        if key in options:
            if value not in ("on", "off"):
                raise BadConfig(f"config {token!r}: {key} takes 'on' or 'off'")
            options[key] = value == "on"
    return Options(**options)
