"""The worker's pipeline decisions, in-process (no worker, no clock: time is passed
in): what a turn of the worker's loop does with a queue, a staged batch and a running
one."""
from dataclasses import dataclass

import pytest
from gpserve.workers.batch_policy import BatchQueue
from gpserve.workers.pipeline import Pipeline

from gpserve import ipc

KEY = ("x",)
FRONT = object()


def submit(req_id, rows, key=KEY, deadline=1e9):
    return ipc.Submit(req_id, (), ("x",), ("y",), "", rows, key, deadline)


@dataclass
class Staged:
    """The staged batch as the decisions see it."""

    rows: int
    arrived: float
    batchable: bool = True
    key: tuple = KEY


def queue(max_batch=8, delay_s=0.0, fixed_s=0.0):
    q = BatchQueue(max_batch=max_batch, max_delay_s=delay_s, max_queue=100)
    if fixed_s:
        for rows in (1, 8):                       # a warm-up: t(n) = fixed + 1e-5 n
            q.costs.observe(rows, fixed_s + 1e-5 * rows)
    return q


def test_an_idle_device_starts_what_is_queued_at_once_and_then_waits_for_rows():
    p = Pipeline(queue())
    p.queue.add(submit(1, 2), FRONT, now=0.0)
    step = p.step(0.0, staged=None, running=False)
    assert [q.item.req_id for q in step.take] == [1] and step.start and not step.done
    step = p.step(0.0, staged=None, running=True)   # the next turn: nothing queued
    assert step.done and step.wait is None and not step.take and not step.start


def test_a_busy_device_stages_a_batch_that_takes_rows_of_its_key_as_they_come():
    p = Pipeline(queue(max_batch=4))
    p.queue.add(submit(1, 1), FRONT, now=0.0)
    step = p.step(0.0, staged=None, running=True)
    assert [q.item.req_id for q in step.take] == [1] and not step.start and not step.done
    p.queue.add(submit(2, 2), FRONT, now=0.1)
    p.queue.add(submit(3, 1, key=("other",)), FRONT, now=0.1)
    p.queue.add(submit(4, 2), FRONT, now=0.1)      # would pass max_batch: stays queued
    step = p.step(0.1, staged=Staged(1, 0.0), running=True)
    assert [q.item.req_id for q in step.take] == [2] and not step.start
    step = p.step(0.1, staged=Staged(3, 0.0), running=True)
    assert step.take == [] and step.done and step.wait is None   # waits for the device
    step = p.step(0.2, staged=Staged(3, 0.0), running=False)     # the device frees: go
    assert step.start and step.take == []


def test_a_full_or_unbatchable_staged_batch_takes_nothing_more():
    p = Pipeline(queue(max_batch=2))
    p.queue.add(submit(1, 1), FRONT, now=0.0)
    assert p.step(0.0, staged=Staged(2, 0.0), running=True).take == []
    assert p.step(0.0, staged=Staged(1, 0.0, batchable=False), running=True).take == []
    assert p.queue.rows == 1


def test_an_idle_device_holds_a_staged_batch_for_its_fixed_cost_and_reports_the_hold():
    p = Pipeline(queue(max_batch=8, delay_s=0.010, fixed_s=0.004))
    for i in range(4):                        # a steady stream: another row is expected
        p.queue.add(submit(i, 1), FRONT, now=i * 1e-4)
    staged = p.step(0.0004, staged=None, running=True).take      # staged while busy
    assert len(staged) == 4
    p.queue.device_free(0.001, answered=4)
    step = p.step(0.001, staged=Staged(4, staged[0].arrived), running=False)
    assert step.done and step.wait == pytest.approx(0.004) and not step.start
    step = p.step(0.0051, staged=Staged(4, staged[0].arrived), running=False)
    assert step.start and step.held_s == pytest.approx(0.0041)   # held since 0.001
    assert p.held_since is None


def test_expired_requests_are_handed_back_to_be_answered():
    p = Pipeline(queue())
    p.queue.add(submit(1, 1, deadline=0.5), FRONT, now=0.0)
    p.queue.add(submit(2, 1), FRONT, now=0.0)
    step = p.step(1.0, staged=None, running=True)
    assert [q.item.req_id for q in step.expired] == [1]
    assert [q.item.req_id for q in step.take] == [2]
