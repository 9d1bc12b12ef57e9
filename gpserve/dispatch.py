"""A front's side of the workers: one link to each, which worker takes a request, and
the requests waiting for an answer.

A request goes straight to one worker (the least loaded, by the shared counters: see
:func:`choose_worker`) and its answer comes back on the same link:
two hops. When a worker's link drops (the worker died), every request it held is
answered at once with ``Unavailable``; none waits for its deadline.

Deadlines: every request of a front has the same timeout, so the oldest request waiting
has the earliest deadline; one timer, at that deadline, serves them all (a timer per
request was a measurable share of a small request: docs/benchmarks.md, "Figures behind
design choices").
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time

from . import ipc
from .counters import Counters
from .errors import DeadlineExceeded, Unavailable
from .shm import Segments, segment_path

log = logging.getLogger("gpserve.front")
RECONNECT_S = 0.05
LINK_WAIT_S = 2.0
ABANDONED_GRACE_S = 60.0
STALE_S = 1.0            # a worker whose heartbeat is this old gets no new requests


class Waiting:
    """A request sent to a worker: its answer's future, and, once the front stopped
    waiting (deadline), the arena regions the worker may still read."""

    __slots__ = ("future", "worker", "deadline", "answered", "release")

    def __init__(self, future, worker: int, deadline: float):
        self.future, self.worker, self.deadline = future, worker, deadline
        self.answered = False        # the answer came after the deadline failed it
        self.release = None          # frees the request's regions, once abandoned


class Dispatcher:
    def __init__(self, run_id: str, front_index: int, workers: int, counters: Counters,
                 segments: Segments, timeout: float, scope: str = ""):
        """``scope``: the prefix of its model's worker names (``m1-``; see
        Config.scoped)."""
        self.run_id, self.index, self.workers = run_id, front_index, workers
        self.scope = scope
        self.counters, self.segments, self.timeout = counters, segments, timeout
        self.hello = ipc.Hello("front", front_index, os.getpid())
        self.links: dict[int, ipc.Link] = {}       # worker index -> link, once it said Hello
        self.connecting: dict[int, ipc.Link] = {}    # connected, its Hello not yet here
        # requests waiting for an answer, oldest (earliest deadline) first; and those
        # past their deadline whose answer has not come (their regions stay with them)
        self.waiting: dict[int, Waiting] = {}
        self.abandoned: dict[int, Waiting] = {}
        self.deadline_timer: asyncio.TimerHandle | None = None
        self.ids = itertools.count(1)
        self.turn = front_index
        self.linked = asyncio.Event()                # set while any worker is linked
        self.closed = False
        # its event loop, looked up once: Python 3.11's asyncio.get_running_loop() makes
        # a getpid() system call each time (docs/benchmarks.md: design figures)
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- links -------------------------------------------------------------------------
    async def keep_connected(self) -> None:
        """Connect to every worker, and again to a restarted one."""
        while True:
            for i in range(self.workers):
                pending = self.connecting.get(i)
                if pending is not None and not pending.open:
                    del self.connecting[i]           # it closed before saying Hello
                if i not in self.links and i not in self.connecting:
                    try:
                        self.connecting[i] = await ipc.connect(
                            ipc.worker_address(self.run_id, f"{self.scope}worker{i}"),
                            ipc.Link(self, self.hello))
                    except OSError:
                        pass
            await asyncio.sleep(RECONNECT_S)

    def on_peer(self, link: ipc.Link) -> None:
        index = _peer(link).index
        self.connecting.pop(index, None)
        self.links[index] = link
        self.linked.set()

    def close(self) -> None:
        """Its model was retired (no request waits here): drop the links, quietly."""
        self.closed = True
        for link in [*self.links.values(), *self.connecting.values()]:
            if link.transport is not None:
                link.transport.close()

    def on_lost(self, link: ipc.Link) -> None:
        if link.peer is None or self.closed:
            return
        index, pid = link.peer.index, link.peer.pid
        if self.links.get(index) is link:
            del self.links[index]
        if not self.links:
            self.linked.clear()
        for req_id, w in list(self.abandoned.items()):
            if w.worker == index:
                self._forget(req_id)
        failed = 0
        for w in self.waiting.values():
            if w.worker == index and not w.future.done():
                failed += 1
                w.future.set_exception(Unavailable(
                    f"worker {index} (pid {pid}) exited while holding this request; it is "
                    "being restarted, try again"))
        self.segments.forget(segment_path(self.run_id, f"{self.scope}worker{index}-{pid}"))
        log.warning("lost worker %d (pid %d); %d requests answered Unavailable", index, pid,
                    failed)

    def on_message(self, link: ipc.Link, message) -> None:
        w = self.waiting.get(message.req_id)
        if w is not None and not w.future.done():
            w.future.set_result((link, message))
            return
        if w is not None:            # failed by its deadline, its task not resumed yet
            w.answered = True
        else:                        # abandoned: its regions can go now
            self._forget(message.req_id)
        if message.token is not None:
            link.release(message.token)

    @property
    def ready(self) -> bool:
        """Linked to every worker that is up (and at least one)."""
        return bool(self.links) and len(self.links) >= self.counters.ready_workers()

    def about(self) -> list[dict]:
        """The workers this front is linked to, as they describe themselves."""
        return [{"index": i, "pid": _peer(link).pid, "runs": _peer(link).about}
                for i, link in sorted(self.links.items())]

    # -- requests ----------------------------------------------------------------------
    async def run(self, refs, names, outputs, config, rows, key,
                  hand_over) -> tuple[ipc.Link, ipc.Done]:
        """Send a request to a worker and wait for its answer (the caller releases the
        answer's token). On a timeout the worker may still read the request's regions:
        ``hand_over()`` gives them to the abandoned record, freed when the answer comes
        or the worker dies."""
        if not self.links and self.counters.ready_workers():
            # a worker is up and this front is connecting to it (just started, or the
            # worker just restarted): a moment, not the deadline
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LINK_WAIT_S):
                    await self.linked.wait()
        chosen: int | None
        if len(self.links) == 1:
            chosen = next(iter(self.links))
        else:
            now, counters = time.monotonic(), self.counters
            loads = {i: counters.queued_rows(i) for i in self.links
                     if counters.worker_is_fresh(i, now, STALE_S)}
            chosen = choose_worker(loads or {i: 0 for i in self.links}, self.turn)
            self.turn += 1
        if chosen is None:
            raise Unavailable("no worker is running (the server is starting, or restarting "
                              "a worker); try again")
        req_id = next(self.ids)
        deadline = time.monotonic() + self.timeout
        loop = self.loop
        if loop is None:
            loop = self.loop = asyncio.get_running_loop()
        w = self.waiting[req_id] = Waiting(loop.create_future(), chosen, deadline)
        if self.deadline_timer is None:
            self.deadline_timer = loop.call_later(self.timeout, self._expire_due)
        self.links[chosen].send(ipc.Submit(req_id, refs, names, outputs, config, rows, key,
                                           deadline))
        try:
            return await w.future
        except asyncio.TimeoutError:
            self._abandon(req_id, w, hand_over)
            raise DeadlineExceeded(
                f"no result within --timeout-ms {self.timeout * 1e3:g}") from None
        except asyncio.CancelledError:          # the client went away (a cancelled RPC)
            self._abandon(req_id, w, hand_over)
            raise
        finally:
            del self.waiting[req_id]

    def _abandon(self, req_id: int, w: Waiting, hand_over) -> None:
        """The request stops waiting before its answer: the worker may still read its
        regions, so they go to the abandoned record (freed by the late answer, or the
        worker's death); an answer already in, never read, gives back its token."""
        if w.future.done() and not w.future.cancelled() and w.future.exception() is None:
            link, done = w.future.result()
            if done.token is not None:
                link.release(done.token)
        elif not w.answered:
            w.release = hand_over()
            self.abandoned[req_id] = w

    def _expire_due(self) -> None:
        """Fail the requests past their deadline, then wait for the next deadline: the
        oldest request's, as every request has the same timeout."""
        self.deadline_timer = None
        now, loop = time.monotonic(), self.loop
        assert loop is not None, "set by the first run()"
        for w in self.waiting.values():
            if w.deadline > now:
                self.deadline_timer = loop.call_later(w.deadline - now, self._expire_due)
                return
            if not w.future.done():
                w.future.set_exception(asyncio.TimeoutError())

    def _forget(self, req_id: int) -> None:
        w = self.abandoned.pop(req_id, None)
        if w is not None and w.release is not None:
            w.release()

    async def sweep_abandoned(self) -> None:
        """Free the memory of timed-out requests whose answer will never come."""
        while True:
            await asyncio.sleep(5)
            now = time.monotonic()
            for req_id, w in list(self.abandoned.items()):
                if now > w.deadline + ABANDONED_GRACE_S:
                    self._forget(req_id)


def _peer(link: ipc.Link) -> ipc.Hello:
    """Who is at the other end of a linked link (it said Hello)."""
    assert link.peer is not None, "a link is linked once its peer said Hello"
    return link.peer


def choose_worker(loads: dict[int, int], turn: int) -> int | None:
    """The worker a front sends its next request to: the one with the fewest rows queued
    or running (read from the shared counters), ties broken in turn so that fronts do
    not all pick the same one. None when no worker is connected."""
    if not loads:
        return None
    order = sorted(loads)
    start = turn % len(order)
    rotated = order[start:] + order[:start]
    return min(rotated, key=loads.__getitem__)
