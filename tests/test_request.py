"""A front's request object with the front's dispatcher, in-process: a stand-in worker
link, a real arena. Its memory is freed exactly once, when nobody reads it any more,
whether the request is answered, passes its deadline (and the answer comes late), its
worker dies, or its client goes away; each failure is counted once."""
import asyncio
import os

import numpy as np
import pytest

from gpserve import ipc
from gpserve.counters import Counters
from gpserve.dispatch import Dispatcher
from gpserve.errors import DeadlineExceeded, ModelError, Unavailable
from gpserve.request import Request
from gpserve.shm import Arena, Segments

KEY = ("x",)


class WorkerLink:
    """What the dispatcher sees of a worker: the calls of ipc.Link, recorded."""

    def __init__(self, index=0, pid=111):
        self.peer = ipc.Hello("worker", index, pid, "stand-in")
        self.sent, self.open = [], True

    def send(self, message):
        self.sent.append(message)

    def release(self, token):
        self.sent.append(ipc.Release((token,)))

    @property
    def releases(self):
        return [m.tokens for m in self.sent if type(m) is ipc.Release]


@pytest.fixture(autouse=True)
def placed(monkeypatch):
    """Every tensor placed in the arena, however small (this is about its memory): none
    travels in the message."""
    import gpserve.regions as regions
    monkeypatch.setattr(regions, "INLINE_MAX", -1)


@pytest.fixture
def front():
    """(arena, counters, make(timeout) -> a dispatcher with a timeout in seconds, linked
    to a stand-in worker, and that worker's link)."""
    pid = os.getpid()
    arena = Arena(f"/dev/shm/gpserve-test-{pid}-request-arena", 1 << 20)
    counters = Counters(f"/dev/shm/gpserve-test-{pid}-request-counters", create=True)

    def make(timeout):
        dispatcher, link = Dispatcher("test", 0, 1, counters, Segments(), timeout), WorkerLink()
        dispatcher.on_peer(link)
        return dispatcher, link
    yield arena, counters, make
    arena.close()
    os.unlink(f"/dev/shm/gpserve-test-{pid}-request-counters")


async def send(dispatcher, request):
    """A request with one tensor placed in the arena, sent to the worker."""
    ref = request.regions.place(np.arange(4, dtype=np.float32).reshape(1, 4))
    return await dispatcher.run((ref,), ("x",), ("y",), "", 1, KEY, request.hand_over)


def errors(counters):
    return counters.errors()


async def answered(dispatcher, link, request, token=None, error=None):
    """Send the request, have the stand-in worker answer it, and hold the answer."""
    call = asyncio.create_task(send(dispatcher, request))
    await asyncio.sleep(0)
    dispatcher.on_message(link, ipc.Done(link.sent[0].req_id, (), error, token))
    answer_link, done = await call
    request.answered(answer_link, done.token)
    return done


def test_an_answered_request_gives_back_the_worker_memory_and_its_own_once(front):
    arena, counters, make = front
    dispatcher, link = make(60)

    async def door():
        with Request(arena, counters, 0) as request:
            await answered(dispatcher, link, request, token=5)
            assert arena.used > 0 and link.releases == []   # still read by the door
        assert link.releases == [(5,)] and arena.used == 0
        request.close()                            # again: nothing
        assert link.releases == [(5,)] and arena.used == 0
    asyncio.run(door())
    assert errors(counters) == {}


def test_past_its_deadline_the_memory_waits_for_the_late_answer(front):
    arena, counters, make = front
    dispatcher, link = make(0.02)

    async def door():
        with Request(arena, counters, 0) as request:
            try:
                await send(dispatcher, request)
            except Exception as e:
                failure = request.fail(e)
        assert isinstance(failure, DeadlineExceeded)
        assert arena.used > 0                      # the worker may still read it
        dispatcher.on_message(link, ipc.Done(link.sent[0].req_id, (), None, 9))
        assert arena.used == 0 and link.releases == [(9,)]
    asyncio.run(door())
    assert errors(counters) == {"DeadlineExceeded": 1}


def test_a_worker_s_death_fails_the_request_and_frees_its_memory_at_once(front):
    arena, counters, make = front
    dispatcher, link = make(60)

    async def door():
        with Request(arena, counters, 0) as request:
            call = asyncio.create_task(send(dispatcher, request))
            await asyncio.sleep(0)
            dispatcher.on_lost(link)
            with pytest.raises(Unavailable) as caught:
                await call
            request.fail(caught.value)
        assert arena.used == 0 and link.releases == []
    asyncio.run(door())
    assert errors(counters) == {"Unavailable": 1}


def test_a_client_that_goes_away_leaves_its_memory_to_the_worker_s_answer(front):
    """A cancelled RPC cancels its task while the worker holds the request: freeing its
    regions then would let the next request's bytes overwrite what the worker reads."""
    arena, counters, make = front
    dispatcher, link = make(60)

    async def door():
        with Request(arena, counters, 0) as request:
            await send(dispatcher, request)

    async def scenario():
        task = asyncio.create_task(door())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert arena.used > 0                      # the worker may still read it
        dispatcher.on_message(link, ipc.Done(link.sent[0].req_id, (), None, 3))
        assert arena.used == 0 and link.releases == [(3,)]
    asyncio.run(scenario())
    assert errors(counters) == {}


def test_a_worker_s_error_answer_is_counted_once_and_frees_everything(front):
    arena, counters, make = front
    dispatcher, link = make(60)

    async def door():
        with Request(arena, counters, 0) as request:
            done = await answered(dispatcher, link, request,
                                  error=(ModelError.code, "the model failed"))
            failure = request.fail(ModelError(done.error[1]))
            assert arena.used == 0                 # freed by fail, before the answer goes
        assert failure.code == ModelError.code and failure.message == "the model failed"
        assert arena.used == 0 and link.releases == []
    asyncio.run(door())
    assert errors(counters) == {"ModelError": 1}
