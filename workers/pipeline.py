"""The worker's pipeline decisions: with a queue, at most one batch staged (gathering
rows while the device runs) and at most one running, what to do now. Pure: no I/O,
the clock passed in; the worker (:mod:`.worker`) carries the steps out, and
``tests/test_pipeline.py`` drives this as ``tests/test_batch_policy.py`` drives the
policy it asks (:class:`.batch_policy.BatchQueue`).

One turn of the worker's event loop takes steps until one says ``done``:
- nothing staged: ask the policy for a batch (``next``); on an idle device a batch it
  gives starts at once; on a busy one it is staged, to take rows as they come;
- a staged batch on a busy device takes more rows of its key (``more``) up to
  ``max_batch``;
- a staged batch on an idle device starts, unless the policy holds it a little for
  rows about to come (``hold``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .batch_policy import BatchQueue, Decision, Queued


class Staged(Protocol):
    """What the decisions need of the staged batch."""

    @property
    def rows(self) -> int: ...
    @property
    def batchable(self) -> bool: ...
    @property
    def key(self) -> tuple: ...
    @property
    def arrived(self) -> float: ...


@dataclass(slots=True)
class Step:
    """Answer ``expired`` (their deadline passed); add ``take`` to the staged batch (a new
    one if none); then, if ``start``, run the staged batch. ``held_s``: how long the idle
    device held rows before this start (for the metric). ``done``: nothing more this
    turn; look again after ``wait`` seconds (None: when rows arrive or the device frees)."""

    expired: list[Queued] = field(default_factory=list)
    take: list[Queued] = field(default_factory=list)
    start: bool = False
    held_s: float | None = None
    done: bool = False
    wait: float | None = None


class Pipeline:
    def __init__(self, queue: BatchQueue):
        self.queue = queue
        self.held_since: float | None = None     # the idle device waits for more rows

    def step(self, now: float, staged: Staged | None, running: bool) -> Step:
        queue = self.queue
        if staged is None:
            decision = queue.next(now, busy=running)
        elif staged.batchable and staged.rows < queue.max_batch:
            decision = queue.more(staged.key, queue.max_batch - staged.rows, now)
        else:
            decision = Decision()
        step = Step(expired=decision.expired, take=decision.batch)
        if decision.batch:
            if running or staged is not None:
                return step                      # staged: it takes what is queued
        elif staged is None:                     # nothing to run
            if decision.wait is None:
                self.held_since = None           # nothing waits
            elif self.held_since is None:
                self.held_since = now            # queued rows held (idle device)
            step.done, step.wait = True, decision.wait
            return step
        elif running:                            # the staged batch waits for the device
            step.done = True
            return step
        elif staged.batchable:                   # idle device, a staged batch: hold it?
            wait = queue.hold(staged.rows, staged.arrived, now)
            if wait > 0:
                if self.held_since is None:
                    self.held_since = now
                step.done, step.wait = True, wait
                return step
        if self.held_since is not None:
            step.held_s = now - self.held_since
            self.held_since = None
        step.start = True
        return step
