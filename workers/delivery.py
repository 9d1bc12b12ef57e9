"""A batch's answers: each request's rows of each output, written where its front reads
them, and the output memory lent to the fronts until they give it back.

Copies: each output's real rows are written once into this worker's arena (1 copy); an
output that *is* an input (echo, an identity) is answered by pointing at the gathered
rows, or back at the front's own shared memory (0 copies). A batch whose every answer is
small (each request's rows of its outputs at most ``shm.INLINE_MAX`` bytes, numeric) is
answered with those rows in the messages (1 copy each, nothing lent, no ``Release``).
A worker hosted in its front answers with the arrays themselves (0 copies).

The regions an answer points into are *lent*: the worker frees them once every front
that was answered from them said it has copied them out (``ipc.Release``), or is gone.
"""
from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from gpserve import ipc
from gpserve.errors import GraphPipeError, ModelError, from_code
from gpserve.shm import INLINE_MAX, Arena, Region, TensorRef, inline

from .batch_policy import Queued
from .gather import Batch, Outcome


@dataclass(slots=True)
class Lease:
    """Output regions lent to fronts, and how many answers still point into them."""

    regions: list[Region]
    holders: int


class Leases:
    def __init__(self) -> None:
        self.lent: dict[int, Lease] = {}
        self.held_by: dict[object, Counter[int]] = {}      # link -> token -> answers
        self._tokens = itertools.count(1)

    def lend(self, regions: list[Region], holders: list) -> int:
        """Lend ``regions`` to the links in ``holders`` (one per answer); the token the
        answers carry."""
        token = next(self._tokens)
        self.lent[token] = Lease(regions, len(holders))
        for link in holders:
            held = self.held_by.get(link)
            if held is None:
                held = self.held_by[link] = Counter()
            held[token] += 1
        return token

    def give_back(self, link, tokens) -> None:
        """A front is done with the answers of ``tokens``."""
        held = self.held_by.get(link)
        for token in tokens:
            if held is None or held[token] <= 0:
                continue                 # not lent to this link: nothing to free
            held[token] -= 1
            if not held[token]:
                del held[token]
            self._drop(token, 1)

    def forget(self, link) -> None:
        """A front is gone: nothing it held is read any more."""
        for token, count in self.held_by.pop(link, Counter()).items():
            self._drop(token, count)

    def _drop(self, token: int, count: int) -> None:
        lease = self.lent.get(token)
        if lease is None:
            return
        lease.holders -= count
        if lease.holders <= 0:
            del self.lent[token]
            for region in lease.regions:
                region.release()


class Caller:
    """A request of the front this worker runs in (``local``), as the worker answers it:
    its future's result is its output arrays themselves (0 copies), its exception why
    there are none. The end of a link for one request, with no link."""

    __slots__ = ("future",)
    peer = None

    def __init__(self, future: asyncio.Future):
        self.future = future

    @property
    def open(self) -> bool:
        """Still waiting: not answered, failed by its deadline, or cancelled."""
        return not self.future.done()

    def answer(self, outputs: tuple) -> None:
        if not self.future.done():
            self.future.set_result(outputs)

    def send(self, done: ipc.Done) -> None:
        """An error (the queue full, the deadline passed, the model failed)."""
        if not self.future.done():
            assert done.error is not None, "a local request's outputs come by answer()"
            self.future.set_exception(from_code(*done.error))

    def release(self, token: int) -> None:
        """Nothing is lent to a local request."""


def answer_error(q: Queued, err: GraphPipeError) -> None:
    if q.owner.open:
        q.owner.send(ipc.Done(q.item.req_id, (), (err.code, err.message), None))


class Delivery:
    def __init__(self, arena: Arena | None, leases: Leases,
                 on_answered: Callable[[Batch], None]):
        """``arena`` None: the worker runs in its front (answers carry arrays).
        ``on_answered``: counts a batch's answers before the first leaves (a client
        holding its answer sees its rows counted)."""
        self.arena, self.leases, self.on_answered = arena, leases, on_answered

    def deliver(self, batch: Batch) -> None:
        """Answer each request of a computed batch (one write per front, at the end of
        the event loop's turn)."""
        if self.arena is None:
            self.on_answered(batch)
            for q, outcome in zip(batch.entries, batch.outcomes):
                if outcome.error is not None:
                    answer_error(q, outcome.error)
                else:                                       # the arrays: 0 copies
                    cast(Caller, q.owner).answer(_slices(q, outcome, _rows))
            return
        if _small(batch):
            self.on_answered(batch)
            for q, outcome in zip(batch.entries, batch.outcomes):
                self._answer(q, outcome, _carried)          # the rows themselves: 1 copy
            batch.release()                                 # the gathered inputs
            return
        try:
            refs, regions = self._share(batch)
        except ModelError as e:
            for q in batch.entries:
                answer_error(q, e)
            return
        self.on_answered(batch)
        answered = []
        for q, outcome in zip(batch.entries, batch.outcomes):
            if outcome.error is None and q.owner.open:
                answered.append(q)
        token = self.leases.lend(regions, [q.owner for q in answered]) \
            if regions and answered else None
        if regions and not answered:
            for region in regions:
                region.release()
        where = lambda out, start, stop: ipc.OutputSlice(refs[id(out)], start, stop)
        for q, outcome in zip(batch.entries, batch.outcomes):
            self._answer(q, outcome, where, token)

    def _share(self, batch: Batch) -> tuple[dict[int, TensorRef], list[Region]]:
        """Where each output is shared (id(output) -> ref), and the regions those refs
        point into: new ones for outputs written here, the gathered inputs' that an
        output is (the others freed). All freed if an output does not fit."""
        refs: dict[int, TensorRef] = {}
        regions: list[Region] = []
        assert self.arena is not None
        try:
            for outcome in batch.outcomes:
                for out in outcome.outputs or ():
                    if id(out) in refs:
                        continue
                    ref = batch.region_of.get(id(out))
                    if ref is None:
                        out = np.asarray(out)
                        real = out[:batch.rows] if batch.size != batch.rows else out
                        placed = self.arena.put(real)                   # 1 copy
                        if placed is None:
                            raise ModelError(
                                f"the batch's outputs do not fit in the worker's shared "
                                f"memory ({self.arena.size >> 20} MiB); raise --shm-mb")
                        ref, region = placed
                        regions.append(region)
                    refs[id(out)] = ref                                 # else 0 copies
        except ModelError:
            for region in regions:
                region.release()
            batch.release()
            raise
        used = {ref.offset for ref in refs.values() if ref.path == self.arena.path}
        for region in batch.regions:       # gathered inputs: kept if an output is one
            (regions.append if region.offset in used else Region.release)(region)
        batch.regions = []
        return refs, regions

    @staticmethod
    def _answer(q: Queued, outcome: Outcome, where: Callable[[Any, int, int | None], Any],
                token: int | None = None) -> None:
        if outcome.error is not None:
            answer_error(q, outcome.error)
        elif q.owner.open:
            q.owner.send(ipc.Done(q.item.req_id, _slices(q, outcome, where), None, token))


def _rows(out, start: int, stop: int | None):
    """A request's rows of an output, as a view (a local answer)."""
    return out if stop is None else out[start:stop]


def _carried(out: np.ndarray, start: int, stop: int | None) -> ipc.OutputSlice:
    """A request's rows of an output, in its Done (1 copy)."""
    return ipc.OutputSlice(inline(out[start:stop]), 0, None)


def _small(batch: Batch) -> bool:
    """Whether every answer of the batch may carry its rows (numeric, each request's
    rows of its outputs at most INLINE_MAX bytes in all)."""
    for q, outcome in zip(batch.entries, batch.outcomes):
        if outcome.error is not None:
            continue
        nbytes = 0
        for out in outcome.outputs or ():
            if not isinstance(out, np.ndarray) or out.dtype == object:
                return False
            rows = q.item.rows
            nbytes += (out.nbytes if rows is None or outcome.start is None or not len(out)
                       else out.nbytes // len(out) * rows)
        if nbytes > INLINE_MAX:
            return False
    return True


def _slices(q: Queued, outcome: Outcome, where) -> tuple:
    """A request's rows of each output, as ``where(output, start, stop)`` gives them (the
    array itself, a descriptor, or the rows carried): all of it, (0, None), for a
    request that ran alone."""
    outputs = outcome.outputs or ()
    start = outcome.start
    if q.item.rows is None or start is None:
        return tuple(where(out, 0, None) for out in outputs)
    stop = start + q.item.rows
    return tuple(where(out, start, stop) for out in outputs)
