"""Running the model: the warm-up, a batch (one bad request fails alone), and the live
check of whether batching changes the model's answers. All of it runs in the worker's
compute thread (runtimes release the GIL while they run), except for echo, inline."""
from __future__ import annotations

import logging
import time

import numpy as np

from gpserve import metrics
from gpserve.counters import Counters
from gpserve.errors import GraphPipeError, InternalError, ModelError

from .backend import Backend
from .batch_check import compare, made_up_rows
from .batch_policy import CostModel, Queued
from .gather import Batch, Gather, Outcome

log = logging.getLogger("gpserve.worker")


class Model:
    def __init__(self, backend: Backend, costs: CostModel, gather: Gather,
                 check: "LiveCheck | None"):
        self.backend, self.costs, self.gather, self.check = backend, costs, gather, check

    def warm_up(self, sizes: list[int], on_run=None) -> list[int]:
        """Run every batch size the worker will form, twice (the second run is timed
        for the cost model; ``on_run(seconds)`` hears it); the rows are made up as the
        batching probe's. The sizes warmed (stops at the first failure, said in logs)."""
        spec, warmed = self.backend.spec, []
        outputs = [s.name for s in spec.outputs]
        prepare = getattr(self.backend, "prepare_batch_size", None)
        for size in sizes:
            if prepare is not None:
                prepare(size)
            feed = made_up_rows(spec, size)
            if feed is None:
                log.warning("no warm-up: the model takes String inputs, so no rows can be "
                            "made up; the first batch of each size will be slow")
                break
            try:
                self.backend.run(feed, outputs, "")
                t0 = time.perf_counter()
                self.backend.run(feed, outputs, "")
                took = time.perf_counter() - t0
            except Exception as e:
                log.warning("warm-up at batch size %d failed (%s: %s); the first batch of "
                            "each size will be slow", size, type(e).__name__, str(e)[:200])
                break
            self.costs.observe(size, took)
            if on_run is not None:
                on_run(took)
            warmed.append(size)
        return warmed

    def compute(self, batch: Batch) -> None:
        """Set ``batch.outcomes``, one per request; never raises: a bug of ours answers
        the batch's requests rather than leaving them to their deadline."""
        try:
            self._compute(batch)
        except Exception as e:
            log.exception("internal error running a batch")
            err = InternalError(f"internal server error: {type(e).__name__}: {e}")
            batch.outcomes = [Outcome(error=err) for _ in batch.entries]

    def _compute(self, batch: Batch) -> None:
        """A merged batch that fails is re-run request by request, so one bad request
        fails alone."""
        first = batch.entries[0].item
        names = list(first.output_names)
        started = time.perf_counter()
        try:
            outputs = self.backend.run(batch.feed, names, first.config)
            _check_rows(outputs, names, batch)
        except Exception as e:
            if len(batch.entries) == 1:
                batch.outcomes = [Outcome(error=model_error(e))]
            else:
                batch.outcomes = [self.run_alone(q) for q in batch.entries]
            return
        took = batch.took = time.perf_counter() - started
        if first.rows is not None:
            self.costs.observe(batch.size, took)
        start = 0
        for q in batch.entries:
            batch.outcomes.append(Outcome(outputs, start))
            start += q.item.rows or 0          # an empty tensor adds no rows
        if len(batch.entries) > 1 and self.check is not None and self.check.due():
            self.check.run(first, outputs, self.run_alone(batch.entries[0]))

    def run_alone(self, q: Queued) -> Outcome:
        item = q.item
        feed = dict(zip(item.input_names, (self.gather.array(r) for r in item.inputs)))
        try:
            return Outcome(self.backend.run(feed, list(item.output_names), item.config))
        except Exception as e:
            return Outcome(error=model_error(e))


class LiveCheck:
    """Every ``every``-th merged batch, its first request is re-run alone and compared
    with its rows of the batch: does batching change this model's answers (on this
    device)? Reported in the shared counters, metrics, and once in the log."""

    def __init__(self, every: int, counters: Counters, index: int,
                 model_metrics: metrics.ModelMetrics):
        self.every, self.counters, self.index = every, counters, index
        self.model_metrics = model_metrics
        self.merged = 0
        self.largest_difference = 0.0
        self.told = False

    def due(self) -> bool:
        self.merged += 1
        return (self.merged - 1) % self.every == 0

    def run(self, item, outputs: list, alone: Outcome) -> None:
        if alone.error is not None:   # it ran in the batch; alone it fails: say so
            log.warning("batching check: the request failed when run alone: %s",
                        alone.error.message)
            return
        d = compare([np.asarray(o)[:item.rows] for o in outputs], alone.outputs or [])
        self.counters.record_check(self.index, d.absolute, d.relative, d.changed)
        self.model_metrics.checks[d.changed].inc()
        self.largest_difference = max(self.largest_difference, d.absolute)
        self.model_metrics.batch_difference.set(self.largest_difference)
        if d.changed and not self.told:
            self.told = True
            log.warning("batching changes this model's answers: a request run alone differs "
                        "from its rows in a batch by up to %.3g (%.3g of the output's "
                        "scale); serve with --batching off, or send config 'batch=off', "
                        "where bit-stable answers matter", d.absolute, d.relative)


def _check_rows(outputs, names, batch: Batch) -> None:
    if batch.entries[0].item.rows is None:
        return
    for name, out in zip(names, outputs):
        if np.ndim(out) == 0 or len(out) != batch.size:
            raise ModelError(f"output {name!r} has shape {list(np.shape(out))} for a "
                             f"batch of {batch.size} rows; a batchable model must return "
                             "one row per input row")


def model_error(e: Exception) -> GraphPipeError:
    return e if isinstance(e, GraphPipeError) else ModelError(
        f"the model failed: {type(e).__name__}: {e}")
