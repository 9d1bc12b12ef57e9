"""The batching policy and the front's side of the workers, in-process: no server, no
clock (time is passed in), stand-in peers where they talk to other processes."""
import asyncio
import os

import pytest
from gpserve.workers.batch_policy import BatchQueue, BatchSizes, CostModel

from gpserve import ipc
from gpserve.counters import Counters
from gpserve.dispatch import Dispatcher, choose_worker
from gpserve.errors import Unavailable
from gpserve.shm import Segments

KEY = ("x",)


def submit(req_id, rows, key=KEY, deadline=1e9):
    return ipc.Submit(req_id, (), ("x",), ("y",), "", rows, key, deadline)


def ids(batch):
    return [q.item.req_id for q in batch]


FRONT_A, FRONT_B = object(), object()     # stand-ins for the fronts' links


def test_requests_share_a_batch_only_with_their_key_oldest_group_first():
    q = BatchQueue(max_batch=8, max_delay_s=0, max_queue=100)
    q.add(submit(1, 2, key=("a",)), FRONT_A, now=0.0)
    q.add(submit(2, 2, key=("b",)), FRONT_A, now=0.1)
    q.add(submit(3, 2, key=("a",)), FRONT_B, now=0.2)
    assert ids(q.next(now=1.0, busy=False).batch) == [1, 3]
    assert ids(q.next(now=1.0, busy=False).batch) == [2]
    assert q.rows == 0 and q.next(now=1.0, busy=False).batch == []


def test_a_batch_takes_arrival_order_up_to_max_batch_and_a_large_request_runs_alone():
    q = BatchQueue(max_batch=8, max_delay_s=0, max_queue=100)
    for i, rows in enumerate([3, 4, 2, 20, 1]):
        q.add(submit(i, rows), FRONT_A, now=0.0)
    assert ids(q.next(0.0, busy=False).batch) == [0, 1]       # 3 + 4; 2 more would pass 8
    assert ids(q.next(0.0, busy=False).batch) == [2]          # 20 rows do not fit beside 2
    assert ids(q.next(0.0, busy=False).batch) == [3]          # alone, never refused
    assert ids(q.next(0.0, busy=False).batch) == [4]


def test_unbatchable_requests_run_alone():
    q = BatchQueue(max_batch=8, max_delay_s=0, max_queue=100)
    q.add(submit(1, None, key=("alone", 1)), FRONT_A, 0.0)
    q.add(submit(2, None, key=("alone", 2)), FRONT_A, 0.0)
    assert ids(q.next(0.0, busy=False).batch) == [1]
    assert ids(q.next(0.0, busy=False).batch) == [2]


def test_while_the_device_is_busy_the_oldest_group_is_staged_and_fills():
    q = BatchQueue(max_batch=4, max_delay_s=1.0, max_queue=100)
    q.add(submit(1, 1), FRONT_A, 0.0)
    q.add(submit(2, 1, key=("other",)), FRONT_A, 0.5)
    d = q.next(5.0, busy=True)          # staged at once: its rows are copied in meanwhile
    assert ids(d.batch) == [1] and d.wait is None
    for i, rows in ((3, 2), (4, 2), (5, 1)):
        q.add(submit(i, rows), FRONT_B, 5.0)
    assert ids(q.more(KEY, room=3, now=5.0).batch) == [3]    # 2 more would pass the room
    assert q.more(KEY, room=1, now=5.0).batch == []          # 2 rows do not fit in 1
    assert q.more(("none",), room=3, now=5.0).batch == []
    assert ids(q.next(5.0, busy=True).batch) == [2]          # the next oldest group
    assert ids(q.next(5.0, busy=False).batch) == [4, 5]


def test_a_staged_batch_takes_no_expired_request():
    q = BatchQueue(max_batch=8, max_delay_s=0, max_queue=100)
    q.add(submit(1, 1, deadline=1.0), FRONT_A, 0.0)
    q.add(submit(2, 1, deadline=9.0), FRONT_A, 0.0)
    d = q.more(KEY, room=7, now=2.0)
    assert ids(d.expired) == [1] and ids(d.batch) == [2] and q.rows == 0


def warmed_costs(q: BatchQueue, fixed_s: float, per_row_s: float) -> None:
    for n in (1, 2, 4, 8, 16, 32, 64):
        q.costs.observe(n, fixed_s + per_row_s * n)


def test_an_idle_device_holds_a_partial_batch_only_while_waiting_pays():
    # GPU-like: 8 ms per batch whatever its size, rows arriving every 0.1 ms
    q = BatchQueue(max_batch=64, max_delay_s=0.005, max_queue=1000)
    warmed_costs(q, 0.008, 0.00005)
    assert q.costs.fixed_s == pytest.approx(0.008, rel=1e-6)
    for i in range(10):
        q.add(submit(i, 1), FRONT_A, now=i * 1e-4)
    d = q.next(now=0.001, busy=False)
    # held; looked at again when 8 gaps of silence would say the stream stopped
    assert d.batch == [] and d.wait == pytest.approx(8e-4 - 1e-4)
    for i in range(10, 46):
        q.add(submit(i, 1), FRONT_A, now=i * 1e-4)
    assert q.next(now=0.0045, busy=False).wait == pytest.approx(0.005 - 0.0045)
    assert len(q.next(now=0.0051, busy=False).batch) == 46     # --max-delay-ms bounds it
    # nothing more is expected (the last row came long ago): no hold
    q.add(submit(99, 1), FRONT_A, now=10.0)
    assert ids(q.next(now=10.0, busy=False).batch) == [99]


def test_a_stream_that_stopped_is_not_waited_for():
    q = BatchQueue(max_batch=64, max_delay_s=0.005, max_queue=1000)
    warmed_costs(q, 0.008, 0.00005)
    for i in range(10):
        q.add(submit(i, 1), FRONT_A, now=i * 1e-4)
    assert q.next(now=0.0009 + 7e-4, busy=False).batch == []  # 7 gaps of silence: held
    assert len(q.next(now=0.0009 + 9e-4, busy=False).batch) == 10   # 9: it stopped


def test_a_staged_batch_waits_on_the_freed_device_for_the_clients_just_answered():
    # closed-loop clients in two waves: the one staged while the device ran, and the one
    # whose batch just finished, about to come back. Merging them saves a batch's 8 ms.
    q = BatchQueue(max_batch=64, max_delay_s=0.010, max_queue=1000)
    warmed_costs(q, 0.008, 0.00005)
    for i in range(32):
        q.add(submit(i, 1), FRONT_A, now=i * 5e-5)
    staged = q.next(now=0.002, busy=True).batch                 # staged while busy
    assert len(staged) == 32
    q.device_free(0.0096, answered=32)
    wait = q.hold(32, staged[0].arrived, now=0.0096)
    assert wait == pytest.approx(0.008)                         # a's worth: wave or not
    for i in range(32, 64):                                     # the wave comes back
        q.add(submit(i, 1), FRONT_B, now=0.0100 + (i - 32) * 5e-5)
    assert q.hold(32, staged[0].arrived, now=0.0116) == pytest.approx(8 * 5e-5 - 5e-5)
    more = q.more(KEY, room=32, now=0.0116).batch
    assert len(more) == 32 and q.hold(64, staged[0].arrived, now=0.0116) == 0   # full: go


def test_a_freed_device_waits_only_for_rows_it_answered():
    q = BatchQueue(max_batch=64, max_delay_s=0.002, max_queue=1000)
    warmed_costs(q, 0.008, 0.00005)
    q.add(submit(1, 1), FRONT_A, now=0.0)
    staged = q.next(now=0.0, busy=True).batch
    q.device_free(1.0, answered=3)           # 3 clients are being answered: hold
    assert q.hold(1, staged[0].arrived, now=1.0) == pytest.approx(0.002)  # max-delay
    for i in range(3):
        q.add(submit(10 + i, 1), FRONT_A, now=1.0005 + i * 1e-5)
    q.more(KEY, room=63, now=1.0006)
    assert q.hold(4, staged[0].arrived, now=1.0007) == 0      # all back, the stream paused
    q.device_free(2.0, answered=0)           # nothing answered (say, all expired)
    assert q.hold(1, staged[0].arrived, now=2.0) == 0


def test_a_cpu_like_model_is_not_held():
    # CPU-like: the cost is all per row, so merging saves nothing and nothing is held
    q = BatchQueue(max_batch=64, max_delay_s=0.005, max_queue=1000)
    warmed_costs(q, 0.0, 0.001)
    assert q.costs.fixed_s == pytest.approx(0.0, abs=1e-9)
    for i in range(10):
        q.add(submit(i, 1), FRONT_A, now=i * 1e-4)
    assert len(q.next(now=0.001, busy=False).batch) == 10


def test_an_unknown_cost_model_holds_nothing():
    c = CostModel()
    c.observe(4, 0.01)
    c.observe(4, 0.01)
    assert c.fixed_s == 0.0             # one size seen: the intercept is unknown


def test_the_cost_model_predicts_a_batch_from_the_sizes_it_saw():
    c = CostModel()
    c.observe(1, 0.001)
    assert c.expected(4) is None        # one size seen: no slope yet
    c.observe(8, 0.0024)                # t(n) = 0.8 ms + 0.2 ms a row
    assert c.fixed_s == pytest.approx(0.0008)
    assert c.expected(4) == pytest.approx(0.0016) and c.expected(8) == pytest.approx(0.0024)


def test_expired_requests_are_answered_never_run():
    q = BatchQueue(max_batch=8, max_delay_s=0, max_queue=100)
    q.add(submit(1, 1, deadline=1.0), FRONT_A, 0.0)
    q.add(submit(2, 1, deadline=9.0), FRONT_A, 0.0)
    d = q.next(now=2.0, busy=False)
    assert ids(d.expired) == [1] and ids(d.batch) == [2] and q.rows == 0


def test_a_lost_front_s_requests_are_forgotten():
    q = BatchQueue(max_batch=8, max_delay_s=0, max_queue=100)
    q.add(submit(1, 3), FRONT_A, 0.0)
    q.add(submit(2, 2), FRONT_B, 0.0)
    q.add(submit(3, 1), FRONT_A, 0.0)
    assert ids(q.drop_owner(FRONT_A)) == [1, 3]
    assert q.rows == 2 and ids(q.next(0.0, busy=False).batch) == [2]


def test_the_queue_is_bounded_in_rows():
    q = BatchQueue(max_batch=8, max_delay_s=0, max_queue=10)
    assert q.add(submit(1, 8), FRONT_A, 0.0) is None
    refused = q.add(submit(2, 3), FRONT_A, 0.0)
    assert "8 rows are waiting" in refused and "--max-queue 10" in refused
    assert q.rows == 8


def test_batch_sizes_pad_up_to_a_warmed_size():
    pow2 = BatchSizes.parse("pow2", 48, on_gpu=False)
    assert pow2.sizes == [1, 2, 4, 8, 16, 32, 48]
    assert [pow2.pad(n) for n in (1, 3, 9, 33, 48, 100)] == [1, 4, 16, 48, 48, 100]
    assert pow2.warm_up() == [1, 2, 4, 8, 16, 32, 48]
    listed = BatchSizes.parse("1,8,32", 64, on_gpu=False)
    assert listed.sizes == [1, 8, 32, 64] and listed.pad(9) == 32
    assert BatchSizes.parse("auto", 64, on_gpu=True).sizes == [1, 2, 4, 8, 16, 24, 32, 40,
                                                                 48, 56, 64]
    assert BatchSizes.parse("steps", 20, on_gpu=False).sizes == [1, 2, 4, 8, 16, 20]
    anything = BatchSizes.parse("auto", 64, on_gpu=False)
    assert anything.pad(37) == 37 and anything.warm_up() == [1, 64]


def test_a_front_picks_the_least_loaded_worker_ties_in_turn():
    assert choose_worker({}, 0) is None
    assert choose_worker({0: 5, 1: 2, 2: 9}, 0) == 1
    assert [choose_worker({0: 0, 1: 0}, t) for t in range(4)] == [0, 1, 0, 1]


# -- the front's side: a worker lost ---------------------------------------------------

class StandInWorkerLink:
    """What a front's Dispatcher sees of a worker: ipc.Link's calls, recorded."""

    def __init__(self, index, pid):
        self.peer = ipc.Hello("worker", index, pid, "stand-in")
        self.sent = []
        self.open = True

    def send(self, message):
        self.sent.append(message)

    def release(self, token):
        self.sent.append(ipc.Release((token,)))


@pytest.fixture
def make_dispatcher():
    """A front's dispatcher with the given request timeout (seconds)."""
    path = f"/dev/shm/gpserve-test-{os.getpid()}-policy-counters"
    counters = Counters(path, create=True)
    yield lambda timeout: Dispatcher("test", 0, 2, counters, Segments(), timeout)
    os.unlink(path)


@pytest.fixture
def dispatcher(make_dispatcher):
    return make_dispatcher(60.0)


def test_a_worker_s_death_answers_what_it_held_at_once(dispatcher):
    async def scenario():
        dead, alive = StandInWorkerLink(0, 111), StandInWorkerLink(1, 222)
        for link in (dead, alive):
            dispatcher.on_peer(link)
        dispatcher.counters.worker_load(1, 50)      # worker 1 busier: 0 gets both
        calls = [asyncio.create_task(dispatcher.run((), ("x",), ("y",), "", 1, KEY,
                                                    lambda: None)) for _ in range(2)]
        await asyncio.sleep(0)
        assert [type(m) for m in dead.sent] == [ipc.Submit, ipc.Submit] and not alive.sent
        dispatcher.on_lost(dead)
        for call in calls:
            with pytest.raises(Unavailable, match="worker 0 .pid 111. exited"):
                await call
        assert list(dispatcher.links) == [1] and dispatcher.waiting == {}
        # an answer on the live link still resolves its request
        call = asyncio.create_task(dispatcher.run((), ("x",), ("y",), "", 1, KEY,
                                                  lambda: None))
        await asyncio.sleep(0)
        req = alive.sent[-1]
        dispatcher.on_message(alive, ipc.Done(req.req_id, (), None, None))
        link, done = await call
        assert link is alive and done.req_id == req.req_id
    asyncio.run(scenario())


def test_an_abandoned_request_s_memory_is_freed_when_its_worker_dies(make_dispatcher):
    dispatcher, freed = make_dispatcher(0.01), []

    async def scenario():
        link = StandInWorkerLink(0, 111)
        dispatcher.on_peer(link)
        with pytest.raises(Exception, match="no result within --timeout-ms 10"):
            await dispatcher.run((), ("x",), ("y",), "", 1, KEY,
                                 lambda: lambda: freed.append(True))
        assert not freed                   # the worker may still read it
        dispatcher.on_lost(link)
        assert freed == [True] and dispatcher.abandoned == {}
    asyncio.run(scenario())


def test_deadlines_fail_each_request_in_turn_and_late_answers_free_what_they_hold(
        make_dispatcher):
    """One timer serves every deadline: requests sent one after another each fail at
    their own deadline; one answered in time is not failed; an answer that comes after
    its request gave up releases the worker's memory, and the request's own."""
    dispatcher, freed = make_dispatcher(0.05), []

    async def scenario():
        link = StandInWorkerLink(0, 111)
        dispatcher.on_peer(link)
        calls = []
        for i in range(3):
            calls.append(asyncio.create_task(dispatcher.run(
                (), ("x",), ("y",), "", 1, KEY, lambda i=i: lambda: freed.append(i))))
            await asyncio.sleep(0)
        answered = link.sent[1]
        dispatcher.on_message(link, ipc.Done(answered.req_id, (), None, 7))
        for i in (0, 2):
            with pytest.raises(Exception, match="no result within --timeout-ms 50"):
                await calls[i]
        assert (await calls[1])[1].token == 7
        assert set(dispatcher.abandoned) == {link.sent[0].req_id, link.sent[2].req_id}
        assert dispatcher.waiting == {} and not freed
        dispatcher.on_message(link, ipc.Done(link.sent[2].req_id, (), None, 9))
        assert freed == [2] and link.sent[-1] == ipc.Release((9,))
        assert set(dispatcher.abandoned) == {link.sent[0].req_id}
    asyncio.run(scenario())


def test_messages_round_trip_with_their_nested_types():
    ref = ipc.TensorRef("/dev/shm/x", 64, 9, (2, 3))
    for message in (ipc.Hello("front", 1, 42),
                    ipc.Submit(7, (ref, ref), ("a", "b"), ("y",), "cfg", 2, ("k", 1), 3.5),
                    ipc.Done(7, (ipc.OutputSlice(ref, 0, 2),), None, 5),
                    ipc.Done(8, (), (4, "bad"), None), ipc.Release((1, 2, 3)),
                    ipc.Submit(9, (ipc.Inline(b"\0" * 8, 9, (1, 2)), ref), ("a", "b"),
                               ("y",), "", 1, ("k",), 1.0),
                    ipc.Done(9, (ipc.OutputSlice(ipc.Inline(b"\1" * 4, 9, (1, 1)), 0,
                                                 None),), None, None)):
        frames = ipc.FrameBuffer()
        data = ipc.frame(message)
        assert frames.feed(data[:3]) == []                   # a message split anywhere
        (back,) = frames.feed(data[3:])
        assert back == message and type(back) is type(message)
        if type(back) is ipc.Done and back.outputs:
            assert type(back.outputs[0]) is ipc.OutputSlice
            assert type(back.outputs[0].ref) is type(message.outputs[0].ref)
        if type(back) is ipc.Submit:
            assert [type(r) for r in back.inputs] == [type(r) for r in message.inputs]
