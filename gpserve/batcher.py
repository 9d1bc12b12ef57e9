"""The dynamic batcher process: merges rows of concurrent requests from all fronts.

Policy (rows, not requests, are what it counts):
- Requests share a batch only when their ``key`` is equal: same input names, dtypes and
  non-batch shapes, same outputs, same config. Unbatchable requests run alone.
- When a worker is idle, the group with the oldest waiting request goes first. A batch
  takes requests in arrival order up to ``--max-batch`` rows; a request larger than
  that runs alone, never refused for its size.
- A partial batch is held back only while another batch is running (more rows are
  likely to arrive) and only until its oldest row has waited ``--max-delay-ms``. With
  nothing else running, it goes at once: an idle worker never waits for a batch to fill.
- The queue is bounded by ``--max-queue`` rows: past it a request is refused at once.
  Requests whose deadline passed are dropped at dispatch and answered with an error.
- If a worker dies, every request of its batch is answered with an error at once.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from . import ipc, metrics
from .config import Config
from .errors import DeadlineExceeded, QueueFull, Unavailable
from .shm import segment_path

log = logging.getLogger("gpserve.batcher")


class _Peer(ipc.Link):
    """One front or worker connection; messages go to the Batcher."""

    def __init__(self, batcher: "Batcher"):
        super().__init__()
        self.batcher = batcher
        self.role, self.index, self.pid = "", -1, 0
        self.running: ipc.Batch | None = None   # workers: the batch in flight

    def on_message(self, message) -> None:
        self.batcher.on_message(self, message)

    def on_disconnect(self) -> None:
        self.batcher.on_lost(self)


class Batcher:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.counters = ipc.Counters(segment_path(cfg.run_id, "counters"))
        self.max_batch = cfg.max_batch if cfg.batching != "off" else 1
        self.max_delay = cfg.max_delay_ms / 1000.0
        self.groups: dict[tuple, deque] = {}      # key -> deque of (arrival, Submit)
        self.group_rows: dict[tuple, int] = {}
        self.queued_rows = 0
        self.fronts: dict[int, _Peer] = {}
        self.workers: dict[int, _Peer] = {}
        self.idle: deque[_Peer] = deque()
        self.next_batch = 0
        self.timer: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()

    # -- connections -------------------------------------------------------------------
    def on_message(self, peer: _Peer, message) -> None:
        if isinstance(message, ipc.Submit):
            self.submit(peer, message)
        elif isinstance(message, ipc.Finished):
            peer.running = None
            self.idle.append(peer)
            if message.rows:
                self.counters.add_batch(message.rows)
            self.pump()
        elif isinstance(message, ipc.Hello):
            peer.role, peer.index, peer.pid = message.role, message.index, message.pid
            if message.role == "front":
                self.fronts[message.index] = peer
            else:
                self.workers[message.index] = peer
                self.idle.append(peer)
                self.counters.slots[ipc.Counters.READY_WORKERS] = len(self.workers)
                log.info("worker %d (pid %d) connected", message.index, message.pid)
                self.pump()

    def on_lost(self, peer: _Peer) -> None:
        if peer.role == "worker" and self.workers.get(peer.index) is peer:
            del self.workers[peer.index]
            self.counters.slots[ipc.Counters.READY_WORKERS] = len(self.workers)
            if peer in self.idle:
                self.idle.remove(peer)
            if peer.running is not None:
                err = Unavailable(f"worker {peer.index} (pid {peer.pid}) exited while running "
                                  "this request's batch; it is being restarted, try again")
                for item in peer.running.items:
                    self.reject(item, err)
            log.warning("worker %d (pid %d) disconnected", peer.index, peer.pid)
        elif peer.role == "front" and self.fronts.get(peer.index) is peer:
            del self.fronts[peer.index]
            for key in list(self.groups):     # nobody waits for that front's requests
                kept = deque(e for e in self.groups[key] if e[1].front_pid != peer.pid)
                self._set_group(key, kept)

    def reject(self, item: ipc.Submit, err) -> None:
        front = self.fronts.get(item.front)
        if front is not None and front.pid == item.front_pid:
            front.send(ipc.Reject(item.req_id, err.code, err.message))

    # -- the queue ---------------------------------------------------------------------
    def submit(self, front: _Peer, item: ipc.Submit) -> None:
        rows = item.rows or 1
        if self.queued_rows + rows > self.cfg.max_queue:
            self.counters.slots[ipc.Counters.REJECTED_QUEUE_FULL] += 1
            front.send(ipc.Reject(item.req_id, QueueFull.code, (
                f"the queue is full: {self.queued_rows} rows are waiting and this request "
                f"adds {rows}, past --max-queue {self.cfg.max_queue}; retry later")))
            return
        group = self.groups.get(item.key)
        if group is None:
            group = self.groups[item.key] = deque()
            self.group_rows[item.key] = 0
        group.append((time.monotonic(), item))
        self.group_rows[item.key] += rows
        self._queued(rows)
        self.pump()

    def _queued(self, delta: int) -> None:
        self.queued_rows += delta
        self.counters.slots[ipc.Counters.QUEUED_ROWS] = self.queued_rows
        metrics.QUEUE_ROWS.set(self.queued_rows)

    def _set_group(self, key: tuple, entries: deque) -> None:
        rows = sum(e[1].rows or 1 for e in entries)
        self._queued(rows - self.group_rows[key])
        if entries:
            self.groups[key], self.group_rows[key] = entries, rows
        else:
            del self.groups[key], self.group_rows[key]

    def pump(self) -> None:
        """Dispatch as many batches as there are idle workers and ready rows."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        while self.idle and self.groups:
            now = time.monotonic()
            key = min(self.groups, key=lambda k: self.groups[k][0][0])
            group = self.groups[key]
            arrival, head = group[0]
            if head.deadline <= now:
                group.popleft()
                self._drop_expired(head)
                self._set_group(key, group)
                continue
            running = len(self.workers) - len(self.idle)
            if (head.rows is not None and self.group_rows[key] < self.max_batch
                    and running > 0 and now - arrival < self.max_delay):
                self.timer = self.loop.call_at(
                    self.loop.time() + (arrival + self.max_delay - now), self.pump)
                return
            items, rows = [], 0
            while group:
                arrived, item = group[0]
                if items and (item.rows is None or rows + item.rows > self.max_batch):
                    break
                group.popleft()
                if item.deadline <= now:
                    self._drop_expired(item)
                    continue
                items.append(item)
                rows += item.rows or 1
                metrics.QUEUE_WAIT_SECONDS.observe(now - arrived)
                if item.rows is None or rows >= self.max_batch:
                    break
            self._set_group(key, group)
            if items:
                worker = self.idle.popleft()
                worker.running = ipc.Batch(self.next_batch, tuple(items))
                self.next_batch += 1
                worker.send(worker.running)

    def _drop_expired(self, item: ipc.Submit) -> None:
        self.reject(item, DeadlineExceeded(
            "the request's deadline passed while it waited in the queue "
            f"(--timeout-ms {self.cfg.timeout_ms:g})"))


async def _serve(cfg: Config) -> None:
    batcher = Batcher(cfg)
    server = await asyncio.get_running_loop().create_unix_server(
        lambda: _Peer(batcher), sock=ipc.listening_socket(ipc.batcher_address(cfg.run_id)))
    async with server:
        await server.serve_forever()


def main(cfg: Config) -> None:
    from .logs import setup
    setup(cfg.verbose, "batcher", cfg.log_format)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve(cfg))
