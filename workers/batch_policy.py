"""The batching policy: which queued requests run together, and when. Pure: no I/O, no
clock of its own (``now`` is passed in), so it is tested in-process, fast.

Each worker owns one :class:`BatchQueue` (fronts send a request straight to a worker,
chosen by :func:`gpserve.dispatch.choose_worker`); :mod:`.pipeline` asks it what to run
next. Rows, not requests, are what the policy counts.

- Requests share a batch only when their ``key`` is equal (input names, dtypes and
  non-batch shapes, outputs, config). Unbatchable requests (``rows`` None) run alone.
- The group whose head waited longest goes first; a batch takes its requests in arrival
  order up to ``max_batch`` rows. A request larger than that runs alone.
- **While the worker's device is busy** the oldest group is staged at once, and rows of
  its key that arrive before the device frees join it (:meth:`BatchQueue.more`, up to
  ``max_batch`` rows): the worker copies each request's rows in as it comes, so the
  gather overlaps the running batch, and waiting for the device makes the next batch
  fuller.
- **While the device is idle** a partial batch (staged or not) is held only if waiting
  pays (:meth:`BatchQueue.hold`): for at most the model's fixed cost per batch (the
  intercept ``a`` of ``t(n) = a + b*n``, fitted from the batches run, warm-up
  included), never past ``--max-delay-ms`` of idle device, and only while another row
  is expected in that time (:class:`ArrivalRate`). Merging saves ``a`` per batch, so
  waiting longer than ``a`` cannot pay. On a CPU, where ``a`` is small next to
  ``b*n``, this is close to "go at once"; on a GPU, where ``a`` dominates, it waits for
  fuller batches. The hold counts from when the device freed (or the oldest row came,
  if later), so a batch staged while the device ran may wait a little once it is free,
  for the clients just answered. Without that, closed-loop clients split into two
  cohorts that alternate at half a batch each (one runs while the other is answered and
  comes back) and never merge: 64 one-row clients of an 8 ms + 0.05 ms/row model were
  served at 0.54 of its full-batch rate that way, 0.72 merged (``perf/standin.py``).
- A batch of ``n`` rows is padded up to the smallest of the worker's batch sizes that
  holds it (:class:`BatchSizes`), the sizes the worker ran before taking traffic.
- The queue holds at most ``max_queue`` rows; past it a request is refused at once.
  Requests whose deadline passed are taken out and answered as expired.
"""
from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass, field

from gpserve.ipc import End, Submit


@dataclass(slots=True)
class Queued:
    """A request waiting in a worker's queue."""

    item: Submit           # the request
    owner: End             # who asked (the front's end of the link): answers go there
    arrived: float

    @property
    def rows(self) -> int:
        return self.item.rows or 1


@dataclass(slots=True)
class Group:
    """The queued requests of one key, in arrival order, and their rows."""

    entries: deque[Queued] = field(default_factory=deque)
    rows: int = 0


@dataclass(slots=True)
class Decision:
    """What the worker should do now: run ``batch`` (may be empty), answer ``expired``,
    and, if nothing runs, look again after ``wait`` seconds (None: when rows arrive or
    the device frees)."""

    batch: list[Queued] = field(default_factory=list)
    expired: list[Queued] = field(default_factory=list)
    wait: float | None = None


class BatchSizes:
    """The batch sizes a worker forms: any size (CPU default), or a fixed set that a
    batch is padded up to, each run once before traffic (no request pays a first run)."""

    def __init__(self, sizes: list[int] | None, max_batch: int):
        self.max_batch = max_batch
        self.sizes = None if sizes is None else sorted({min(s, max_batch) for s in sizes}
                                                        | {max_batch})

    @classmethod
    def parse(cls, text: str, max_batch: int, on_gpu: bool) -> "BatchSizes":
        """``auto`` (``steps`` on a GPU, ``any`` on a CPU); ``any``; ``steps``: 1, 2, 4, 8,
        then every multiple of 8 (a batch wastes at most 7 padding rows); ``pow2``: powers
        of two (fewer sizes to warm, up to half a batch of padding); or a list such as
        ``1,8,32,64``. ``--max-batch`` is always one of them."""
        if text == "auto":
            text = "steps" if on_gpu else "any"
        if text == "any":
            return cls(None, max_batch)
        powers = [1 << k for k in range(max_batch.bit_length()) if 1 << k <= max_batch]
        if text == "pow2":
            return cls(powers, max_batch)
        if text == "steps":
            return cls([p for p in powers if p <= 8] + list(range(16, max_batch + 1, 8)),
                       max_batch)
        return cls([int(s) for s in text.split(",") if s.strip()], max_batch)

    def pad(self, rows: int) -> int:
        """The size a batch of ``rows`` runs as (rows beyond ``max_batch``: unpadded)."""
        if self.sizes is None or rows > self.max_batch:
            return rows
        return self.sizes[bisect.bisect_left(self.sizes, rows)]

    def warm_up(self) -> list[int]:
        """Sizes to run before taking traffic: every padded size, or the two ends (which
        are enough to fit the cost model) when any size may be formed."""
        return list(self.sizes) if self.sizes is not None else sorted({1, self.max_batch})


class CostModel:
    """``t(n) = a + b*n`` fitted to recent batches by least squares (exponentially
    weighted, so it follows a device that warms up or slows down)."""

    DECAY = 0.98

    def __init__(self):
        self.w = self.sn = self.st = self.snn = self.snt = 0.0
        self.sizes: set[int] = set()
        self.fixed_s = 0.0      # the per-batch cost merging saves (a); 0 until 2 sizes ran
        self.per_row_s: float | None = None     # b; None until 2 sizes ran

    def observe(self, rows: int, seconds: float) -> None:
        d = self.DECAY
        self.w = self.w * d + 1
        self.sn = self.sn * d + rows
        self.st = self.st * d + seconds
        self.snn = self.snn * d + rows * rows
        self.snt = self.snt * d + rows * seconds
        if len(self.sizes) < 2:
            self.sizes.add(rows)
        self.fixed_s, self.per_row_s = self._fit()    # once a batch, not on a request's path

    def expected(self, rows: int) -> float | None:
        """Seconds a batch of ``rows`` is expected to take (None: not known yet)."""
        if self.per_row_s is None:
            return None
        return self.fixed_s + self.per_row_s * rows

    def _fit(self) -> tuple[float, float | None]:
        """(a, b): a kept within [0, the mean batch's time], then b from the mean given
        that a, never below 0, so that no guess is negative. (0, None) until two sizes
        ran, or while the sizes seen cannot be told apart."""
        if len(self.sizes) < 2:
            return 0.0, None
        var = self.snn * self.w - self.sn * self.sn
        if var <= 1e-12:
            return 0.0, None
        b = (self.snt * self.w - self.sn * self.st) / var
        a = (self.st - b * self.sn) / self.w
        fixed = max(0.0, min(a, self.st / self.w))
        return fixed, max(0.0, (self.st / self.w - fixed) / max(self.sn / self.w, 1e-12))


class ArrivalRate:
    """Rows arriving, which the hold asks about: will another come soon? Clients that
    wait for their answer (most do) come back in waves once their batch is answered,
    and a wave reaches the worker in chunks (a front's event-loop turn each) with
    silence between. So: while rows the last batch answered are not all back, more are
    expected (those clients, most likely); after that, another row is expected only
    while the silence since the last stays under ``PAUSE`` times the smoothed gap
    between rows (gaps that span a device's run are not counted); longer, and the
    stream has stopped.
    """

    PAUSE = 8
    NEW_STREAM_S = 0.1         # a silence this long starts the gap estimate afresh

    def __init__(self):
        self.mean_gap: float | None = None     # seconds per row, within a wave
        self.last: float | None = None

    def add(self, rows: int, now: float, device_freed: float) -> None:
        if self.last is not None and now - self.last > self.NEW_STREAM_S:
            self.mean_gap = None
        elif self.last is not None and self.last >= device_freed:
            gap = (now - self.last) / rows
            self.mean_gap = gap if self.mean_gap is None else 0.8 * self.mean_gap + 0.2 * gap
        self.last = now

    def wait(self, left: float, now: float, owed: int) -> float:
        """How long to wait for the next row, at most ``left`` seconds: 0 when none is
        expected in that time; else until ``left`` runs out or until the silence would
        say the stream stopped (look again then). ``owed``: rows answered by the last
        batch that have not come back."""
        if owed > 0:
            return left
        if self.mean_gap is None or self.last is None:
            return 0.0
        silence = now - self.last
        until_over = self.PAUSE * self.mean_gap - silence
        if until_over <= 0 or max(self.mean_gap, silence) > left:
            return 0.0
        return min(left, until_over)


class BatchQueue:
    def __init__(self, max_batch: int, max_delay_s: float, max_queue: int,
                 sizes: BatchSizes | None = None):
        self.max_batch, self.max_delay_s, self.max_queue = max_batch, max_delay_s, max_queue
        self.sizes = sizes or BatchSizes(None, max_batch)
        self.costs = CostModel()
        self.arrivals = ArrivalRate()
        self.groups: dict[tuple, Group] = {}       # by key; a key's hash made once a request
        self.rows = 0
        self.idle_since = -math.inf            # when the device last freed
        self.owed = 0                          # rows it answered that have not come back

    def add(self, item, owner, now: float) -> str | None:
        """Queue a request; returns why it was refused (the queue is full), or None."""
        rows = item.rows or 1
        if self.rows + rows > self.max_queue:
            return (f"the queue is full: {self.rows} rows are waiting and this request adds "
                    f"{rows}, past --max-queue {self.max_queue}; retry later")
        group = self.groups.get(item.key)
        if group is None:
            group = self.groups[item.key] = Group()
        group.entries.append(Queued(item, owner, now))
        group.rows += rows
        self.rows += rows
        if self.costs.fixed_s and self.max_delay_s:   # else nothing is ever held
            self.arrivals.add(rows, now, self.idle_since)
            self.owed -= rows
        return None

    def drop_owner(self, owner) -> list[Queued]:
        """Forget the requests of a front that is gone (nobody waits for them)."""
        dropped: list[Queued] = []
        for key, group in list(self.groups.items()):
            kept: deque[Queued] = deque()
            for q in group.entries:
                (dropped if q.owner is owner else kept).append(q)
            group.entries = kept
            self._recount(key, group)
        return dropped

    def next(self, now: float, busy: bool) -> Decision:
        """The batch to run now, or, when ``busy``, to stage and fill while the device
        runs; see the module doc."""
        out = Decision()
        while self.groups:
            if len(self.groups) == 1:
                key, group = next(iter(self.groups.items()))
            else:
                key = min(self.groups, key=lambda k: self.groups[k].entries[0].arrived)
                group = self.groups[key]
            head = group.entries[0]
            if head.item.deadline <= now:
                out.expired.append(group.entries.popleft())
                self._recount(key, group)
                continue
            if head.item.rows is not None and not busy:
                wait = self.hold(group.rows, head.arrived, now)
                if wait > 0:
                    out.wait = wait
                    return out
            out.batch = self._take(key, group, now, out.expired)
            if out.batch:
                return out
        return out

    def device_free(self, now: float, answered: int) -> None:
        """The device finished a batch of ``answered`` rows: an idle device's hold
        counts from here, and rows as many as that are likely on their way back."""
        self.idle_since = now
        self.owed = answered

    def hold(self, rows: int, arrived: float, now: float) -> float:
        """Seconds an idle device should still wait before it runs a batch of ``rows``
        rows whose oldest request came at ``arrived`` (0: run it now); see the module
        doc."""
        if rows >= self.max_batch:
            return 0.0
        left = (min(self.max_delay_s, self.costs.fixed_s)
                - (now - max(arrived, self.idle_since)))
        return self.arrivals.wait(left, now, self.owed) if left > 0 else 0.0

    def more(self, key: tuple, room: int, now: float) -> Decision:
        """Rows of ``key`` for a staged batch with ``room`` rows left: its group's
        requests in arrival order while they fit (expired ones answered instead)."""
        out = Decision()
        group = self.groups.get(key)
        if group is not None and room > 0:
            out.batch = self._take(key, group, now, out.expired, room)
        return out

    def _take(self, key: tuple, group: Group, now: float, expired: list,
              room: int | None = None) -> list[Queued]:
        """A new batch (``room`` None: its first request is taken whatever its size, a
        large one to run alone), or more rows for a staged one (only what fits)."""
        entries, batch, rows = group.entries, list[Queued](), 0
        limit = self.max_batch if room is None else room
        while entries:
            q = entries[0]
            if ((batch or room is not None)
                    and (q.item.rows is None or rows + q.rows > limit)):
                break
            entries.popleft()
            if q.item.deadline <= now:
                expired.append(q)
                continue
            batch.append(q)
            rows += q.rows
            if q.item.rows is None or rows >= limit:
                break
        self._recount(key, group)
        return batch

    def _recount(self, key: tuple, group: Group) -> None:
        """A group's requests changed: its rows and the queue's again (gone if empty)."""
        rows = sum(q.rows for q in group.entries)
        self.rows += rows - group.rows
        group.rows = rows
        if not group.entries:
            del self.groups[key]

