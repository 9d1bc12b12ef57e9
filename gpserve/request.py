"""One request in a front, as every door (GraphPipe, v2 REST, gRPC) holds it.

A request holds two kinds of memory: regions of the front's arena (its body, when it
streamed in, and the tensors placed for a worker: :class:`~gpserve.regions.Regions`),
and, once a worker answered, the worker's output memory its answer points into (given
back with the answer's token). A door holds the request as ``with`` around everything
from reading the body to encoding the answer; leaving the block frees both, exactly
once, however it was left (an answer, an error, a cancelled task). (A plain ``with``,
not ``async with``: freeing never waits, and an asynchronous context manager costs two
coroutine objects on every request.)

One exception, the deadline: a request that stops waiting for a worker has sent it
descriptors of its regions, which the worker may still read. :meth:`hand_over` gives
the regions to the front's record of abandoned requests (:mod:`gpserve.dispatch`),
which frees them when the late answer comes or the worker dies; the request then holds
none, and leaving the block frees nothing twice.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from .counters import Counters
from .errors import GraphPipeError, InternalError
from .regions import Regions
from .shm import Arena

log = logging.getLogger("gpserve.front")


_NO_EPOCH = [0]


class Request:
    __slots__ = ("regions", "_lease", "_counters", "_front", "_epoch")

    def __init__(self, arena: Arena, counters: Counters, front: int,
                 epoch: list[int] = _NO_EPOCH):
        """``epoch``: the front's count of open requests this one is counted in, until
        it closes (a retired model waits for the requests opened before it was)."""
        self.regions = Regions(arena)
        self._lease: tuple | None = None        # (link, token): the worker's answer
        self._counters, self._front = counters, front
        self._epoch = epoch
        epoch[0] += 1

    def __enter__(self) -> Request:
        return self

    def __exit__(self, *exc) -> None:
        self._epoch[0] -= 1
        self.close()

    def answered(self, link, token: int | None) -> None:
        """A worker's answer is in: its output memory is given back on close."""
        if token is not None:
            self._lease = (link, token)

    def hand_over(self) -> Callable[[], None]:
        """The request stops waiting (deadline): its regions go to whoever frees them
        once no worker reads them (returns the function that does)."""
        return self.regions.hand_over()

    def close(self) -> None:
        """Give back the worker's output memory and free the regions (again: nothing)."""
        lease, self._lease = self._lease, None
        if lease is not None:
            link, token = lease
            link.release(token)
        self.regions.release()

    def fail(self, e: BaseException) -> GraphPipeError:
        """The request failed at any step: free its memory now, count the error once, and
        say what to answer (a bug of ours answers clearly too; the front keeps serving)."""
        self.close()
        if isinstance(e, GraphPipeError):
            log.debug("request failed: %r", e)
            failure = e
        else:
            log.error("internal error", exc_info=e)
            failure = InternalError(f"internal server error: {type(e).__name__}: {e}")
        self._counters.count_error(self._front, failure.code)
        return failure
