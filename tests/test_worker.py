"""A worker driven in-process: a stand-in backend and stand-in front links, no HTTP, no
other process. Warm-up, a batch staged while the device runs, answers lent and given
back, a front's death, one bad request in a merged batch, and the live batching check;
and an instance in its front (``local``), called directly.

Nothing here sleeps: the stand-in backend blocks on an event the test sets, and the
test waits for the answers it expects."""
import asyncio
import os
import threading

import numpy as np
import pytest
from gpserve.workers.worker import Worker

from gpserve import ipc
from gpserve.config import Config
from gpserve.counters import Counters
from gpserve.errors import DeadlineExceeded, ModelError, QueueFull
from gpserve.modelspec import IOSpec, ModelSpec
from gpserve.shm import Arena, Inline, Segments, inline, remove_run_segments, segment_path

F32 = np.dtype(np.float32)


class Backend:
    """y = 2x, or, ``centred``, y = x - mean over the batch (batching changes it); a row
    of NaN fails the run. ``gate``: each run waits for it (the device is busy)."""

    def __init__(self, centred=False):
        self.spec = ModelSpec("test", "test", [IOSpec("x", F32, [-1, 2])],
                              [IOSpec("y", F32, [-1, 2])])
        self.centred, self.runs = centred, []
        self.gate = threading.Event()
        self.gate.set()

    def run(self, feed, names, config):
        self.gate.wait(30)
        x = np.asarray(feed["x"])
        self.runs.append(len(x))
        self.thread = threading.get_ident()
        if np.isnan(x).any():
            raise ValueError("a NaN row")
        return [x - x.mean(axis=0) if self.centred else 2 * x]


class Front:
    """A stand-in for a front's link: collects answers, reads them from shared memory."""

    def __init__(self, index=0):
        self.open, self.peer = True, ipc.Hello("front", index, 1, "")
        self.done: dict[int, ipc.Done] = {}
        self.arrived = asyncio.Event()

    def send(self, message):
        self.done[message.req_id] = message
        self.arrived.set()

    async def answers(self, *req_ids):
        while not all(r in self.done for r in req_ids):
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 30)
        return [self.done[r] for r in req_ids]


@pytest.fixture
def run(tmp_path, monkeypatch):
    """A worker in this process (its arena and counters on /dev/shm), and the front's
    arena its requests' rows sit in. Every batch runs in its compute thread, however
    cheap: these tests hold the device busy, which a batch run on the event loop cannot
    be (the test of cheap batches sets the limit back)."""
    import gpserve.workers.worker as worker
    monkeypatch.setattr(worker, "INLINE_BELOW_S", 0.0)
    run_id = f"t{os.getpid()}w"
    counters = Counters(segment_path(run_id, "counters"), create=True)
    made = []

    def make(backend, local=False, **settings):
        cfg = Config(run_id=run_id, device="cpu", threads=1, shm_mb=1, max_batch=8,
                     batch_sizes="any", max_delay_ms=0, **settings)
        front_arena = Arena(segment_path(run_id, f"front0-{len(made)}"), 1 << 20)
        made.append(front_arena)
        return (Worker(cfg, 0, local=local, backend=backend), front_arena, counters)
    yield make
    for a in made:
        a.close()
    remove_run_segments(run_id)


@pytest.fixture
def lent(monkeypatch):
    """Answers lent from shared memory, however small (these tests are about leases):
    no answer carries its rows in the message."""
    import gpserve.workers.delivery as delivery
    monkeypatch.setattr(delivery, "INLINE_MAX", -1)


def submit(arena, req_id, rows):
    x = np.asarray(rows, np.float32).reshape(-1, 2)
    ref, _ = arena.put(x)
    return ipc.Submit(req_id, (ref,), ("x",), ("y",), "", len(x), ("x", (2,)), 1e12)


async def behind_a_busy_device(worker, backend, front, arena, first, rest):
    """Request 1 (``first``'s rows) runs while the device is held busy; the requests of
    ``rest`` (rows each, numbered from 2) come meanwhile and are staged; then the device
    frees. (How many staged requests were copied in, and the worker's shared memory in
    use, while the device ran; every answer, in order.)"""
    backend.gate.clear()
    worker.on_message(front, submit(arena, 1, first))
    await asyncio.sleep(0)                         # a turn: request 1 starts
    for req_id, rows in enumerate(rest, start=2):
        worker.on_message(front, submit(arena, req_id, rows))
    await asyncio.sleep(0)                         # a turn: the rest staged
    while_busy = (worker.staged.copied if worker.staged else 0, worker.arena.used)
    backend.gate.set()
    return while_busy, await front.answers(*range(1, len(rest) + 2))


def values(done):
    (out,) = done.outputs
    return Segments().view(out.ref)[out.start:out.stop].tolist()


def test_warm_up_runs_every_batch_size_twice_and_says_ready(run):
    backend = Backend()
    worker, _, counters = run(backend)
    asyncio.run(worker.start())
    assert worker.warmed == worker.sizes.warm_up() and worker.warmed[-1] == 8
    assert backend.runs == [n for n in worker.warmed for _ in (1, 2)]
    assert counters.worker_is_ready(0) and counters.warmed_sizes(1) == [worker.warmed]
    assert worker.queue.costs.sizes == {1, 8}           # the cost model heard them


def test_rows_that_come_while_the_device_runs_are_staged_and_run_as_one_batch(run, lent):
    backend = Backend()

    async def main():
        worker, arena, _ = run(backend, batch_check_every=0)
        await worker.start()
        backend.runs.clear()
        front = Front()
        (copied, used), answers = await behind_a_busy_device(
            worker, backend, front, arena, [[1, 1]], [[[i, i]] for i in (2, 3, 4)])
        assert copied == 3 and used > 0            # gathered while the device ran
        assert backend.runs == [1, 3]              # 1 alone, then 2-4 as one batch
        assert [values(d) for d in answers] == [[[2, 2]], [[4, 4]], [[6, 6]], [[8, 8]]]
        tokens = {d.token for d in answers}
        assert None not in tokens and len(tokens) == 2    # one lease per batch
        for d in answers:
            worker.on_message(front, ipc.Release((d.token,)))
        assert worker.arena.used == 0 and not worker.leases.lent
    asyncio.run(main())


def test_a_front_that_dies_gives_back_what_it_held_and_loses_its_queued_rows(run, lent):
    backend = Backend()

    async def main():
        worker, arena, _ = run(backend, batch_check_every=0)
        await worker.start()
        backend.runs.clear()
        gone, other = Front(0), Front(1)
        worker.on_message(gone, submit(arena, 1, [[1, 1]]))
        await gone.answers(1)                      # answered, never released
        assert worker.arena.used > 0
        backend.gate.clear()
        worker.on_message(other, submit(arena, 2, [[2, 2]]))
        await asyncio.sleep(0)                     # request 2 runs (blocked)
        worker.on_message(gone, submit(arena, 3, [[3, 3]]))
        worker.on_lost(gone)
        backend.gate.set()
        (done,) = await other.answers(2)
        assert values(done) == [[4, 4]] and 3 not in gone.done
        worker.on_message(other, ipc.Release((done.token,)))
        assert worker.arena.used == 0 and not worker.leases.lent
        assert gone not in worker.leases.held_by
        assert backend.runs == [1, 1]              # request 3 never ran
    asyncio.run(main())


def test_small_answers_carry_their_rows_and_lend_nothing(run):
    """A batch whose every answer is at most INLINE_MAX bytes: each Done carries its own
    rows (no token to give back), and the gathered rows are freed at once."""
    backend = Backend()

    async def main():
        worker, arena, _ = run(backend, batch_check_every=0)
        await worker.start()
        front = Front()
        _, answers = await behind_a_busy_device(
            worker, backend, front, arena, [[1, 1]], [[[i, i]] for i in (2, 3, 4)])
        assert [values(d) for d in answers] == [[[2, 2]], [[4, 4]], [[6, 6]], [[8, 8]]]
        for d in answers:
            (out,) = d.outputs
            assert type(out.ref) is Inline and out.ref.shape == (1, 2) and d.token is None
        assert worker.arena.used == 0 and not worker.leases.lent
        wide = np.ones((1, 600), np.float32)            # 2,400 bytes a row: 2 rows lent
        worker.on_message(front, ipc.Submit(9, (inline(wide),), ("x",), ("y",), "", 1,
                                            ("x", (600,)), 1e12))
        worker.on_message(front, ipc.Submit(10, (inline(wide),), ("x",), ("y",), "", 1,
                                            ("x", (600,)), 1e12))
        for d in await front.answers(9, 10):
            assert type(d.outputs[0].ref) is Inline     # 2,400 bytes each: carried
        big = np.ones((2, 600), np.float32)             # 4,800 bytes: lent
        worker.on_message(front, ipc.Submit(11, (inline(big),), ("x",), ("y",), "", 2,
                                            ("x", (600,)), 1e12))
        (d,) = await front.answers(11)
        assert type(d.outputs[0].ref) is ipc.TensorRef and d.token is not None
        assert values(d) == (2 * big).tolist()
        worker.on_message(front, ipc.Release((d.token,)))
        assert worker.arena.used == 0 and not worker.leases.lent
    asyncio.run(main())


def test_one_bad_request_in_a_merged_batch_fails_alone(run):
    backend = Backend()

    async def main():
        worker, arena, _ = run(backend, batch_check_every=0)
        await worker.start()
        _, (one, two, three, four) = await behind_a_busy_device(
            worker, backend, Front(), arena, [[1, 1]], [[[2, 2]], [[np.nan, 0]], [[4, 4]]])
        assert three.error[0] == ModelError.code and "a NaN row" in three.error[1]
        assert values(two) == [[4, 4]] and values(four) == [[8, 8]]
    asyncio.run(main())


def test_the_live_check_finds_a_model_whose_answers_depend_on_the_batch(run):
    backend = Backend(centred=True)

    async def main():
        worker, arena, counters = run(backend, batch_check_every=1)
        await worker.start()
        _, (_, two, three) = await behind_a_busy_device(
            worker, backend, Front(), arena, [[0, 0]], [[[1, 1]], [[3, 3]]])
        assert values(two) == [[-1, -1]] and values(three) == [[1, 1]]   # mean 2
        checks = counters.batch_checks()
        assert checks["checks"] == 1 and checks["changed"] == 1
        assert checks["max_difference"] == pytest.approx(1.0)   # alone: 0, batched: -1
    asyncio.run(main())


def rows(*values):
    return np.asarray(values, np.float32).reshape(-1, 2)


def call(worker, x, key=("x", (2,))):
    return worker.call((x,), ("x",), ("y",), "", len(x), key)


@pytest.mark.parametrize("local", [True, False], ids=["in its front", "a worker process"])
def test_cheap_batches_run_on_the_event_loop(run, monkeypatch, local):
    """On the CPU, a batch the cost model expects to be quick runs on the loop's own
    thread (no hand-off to the compute thread and back); one expected to be slow, and
    every batch on a GPU, in the thread."""
    backend = Backend()
    import gpserve.workers.worker as worker_module
    monkeypatch.setattr(worker_module, "INLINE_BELOW_S", 0.001)

    async def main():
        worker, arena, _ = run(backend, local=local, batch_check_every=0)
        await worker.start()                           # warm-up: the cost model fitted
        assert worker.queue.costs.expected(1) < worker_module.INLINE_BELOW_S
        front, asked = Front(), iter(range(1, 10))

        async def ask(x):                  # in its front: called; else a Submit, a Done
            if local:
                (y,) = await call(worker, rows(x))
                return y.tolist()
            req_id = next(asked)
            worker.on_message(front, submit(arena, req_id, [x]))
            (done,) = await front.answers(req_id)
            return values(done)
        assert await ask([1, 1]) == [[2, 2]] and backend.thread == threading.get_ident()
        monkeypatch.setattr(worker_module, "INLINE_BELOW_S", 0.0)        # slow, say
        assert await ask([3, 3]) == [[6, 6]] and backend.thread != threading.get_ident()
        monkeypatch.setattr(worker_module, "INLINE_BELOW_S", 0.001)
        worker.device_like = True                     # a GPU's (or the stand-in's)
        assert await ask([4, 4]) == [[8, 8]] and backend.thread != threading.get_ident()
    asyncio.run(main())


def test_an_instance_in_its_front_answers_calls_with_the_arrays_batched(run):
    """Calls made while the device runs are staged and run as one batch; a bad request
    in it fails alone with the model's error (the others re-run alone and answered),
    and a call past the queue's room is refused at once."""
    backend = Backend()

    async def main():
        worker, _, counters = run(backend, local=True, batch_check_every=0, max_queue=4)
        await worker.start()
        warmed = len(backend.runs)
        backend.gate.clear()
        first = call(worker, rows([1, 1]))
        await asyncio.sleep(0)                         # a turn: the first runs
        staged = [call(worker, rows([2, 2], [3, 3])), call(worker, rows([np.nan, 0])),
                  call(worker, rows([5, 5]))]
        refused = call(worker, rows([6, 6]))           # 1 running, 4 rows queued
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="--max-queue 4"):
            await refused
        backend.gate.set()
        (y1,) = await first
        two, bad, four = await asyncio.gather(*staged, return_exceptions=True)
        assert y1.tolist() == [[2, 2]]
        assert two[0].tolist() == [[4, 4], [6, 6]] and four[0].tolist() == [[10, 10]]
        assert isinstance(bad, ModelError) and "a NaN row" in bad.message
        # the first; the three merged (4 rows), failed; each alone again
        assert backend.runs[warmed:] == [1, 4, 2, 1, 1]
        s = counters.statistics()
        assert s["queue_count"] == 4 and s["executions"] == 1   # the merged one re-ran
        backend.gate.clear()                           # again, nothing bad in the batch
        first = call(worker, rows([1, 1]))
        await asyncio.sleep(0)
        staged = [call(worker, rows([2, 2])), call(worker, rows([3, 3], [4, 4]))]
        backend.gate.set()
        await first
        (two,), (three,) = await asyncio.gather(*staged)
        assert two.tolist() == [[4, 4]] and three.tolist() == [[6, 6], [8, 8]]
        assert backend.runs[-1] == 3 and two.base is three.base   # rows of one output
    asyncio.run(main())


def test_an_instance_in_its_front_fails_calls_whose_deadline_passes_while_it_runs(run):
    """A batch that runs past the deadline (the device held busy): its call and the one
    staged behind it fail with DeadlineExceeded at the deadline, not when it ends."""
    backend = Backend()

    async def main():
        worker, _, _ = run(backend, local=True, batch_check_every=0, timeout_ms=50)
        await worker.start()
        backend.gate.clear()
        running = call(worker, rows([1, 1]))
        await asyncio.sleep(0)
        staged = call(worker, rows([2, 2]))
        for waiting in (running, staged):
            with pytest.raises(DeadlineExceeded, match="--timeout-ms 50"):
                await asyncio.wait_for(waiting, 10)
        assert worker.running is not None              # the model still runs
        backend.gate.set()                             # its late answers go nowhere,
        (y,) = await call(worker, rows([7, 7]))        # and the next call is served
        assert y.tolist() == [[14, 14]]
    asyncio.run(main())
