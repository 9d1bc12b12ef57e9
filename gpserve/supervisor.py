"""The supervisor (``gpserve serve``): plans the run (:mod:`.plan`), holds the sockets
(:mod:`.sockets`), starts the workers and the fronts, restarts a child that dies or
hangs, and on SIGTERM/SIGINT drains and cleans up.

Its loop waits on the children's exits, and wakes at least every ``WATCH_S`` to look
for hung workers and to start children whose restart is due: a restart's back-off is a
deadline per child, so a death, a hang or a stop is never held up behind another
child's back-off.

Stop order: fronts first (uvicorn stops accepting and finishes the requests in flight,
which still need the workers), then the workers; then every shared-memory segment of
this run is removed. Children are started with ``spawn``: model runtimes and uvloop
must not inherit a forked copy of another process's state.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

from . import control, sockets
from .config import Config
from .counters import Counters
from .model_control import ModelControl
from .plan import ModelPlan, Plan, announce, make_plan
from .shm import (
    SHM_DIR,
    hold_run_lock,
    remove_run_segments,
    remove_stale_segments,
    segment_path,
)

log = logging.getLogger("gpserve.supervisor")
RESTART_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)
STEADY_S = 30.0              # a child that lived this long restarts at once
WATCH_S = 0.5                # the loop looks for hangs at least this often
# How the supervisor stops a child. Children ignore SIGINT and SIGTERM: Ctrl-C in a
# terminal and systemd's default KillMode=control-group send those to every process of
# the group at once, and a front that began its own shutdown then closed connections
# before the socket stopped listening, and workers died under requests still running.
# The supervisor alone acts on them, in order: stop listening, drain the fronts (this
# signal), then stop the workers (this signal again: their default action, exit).
STOP_SIGNAL = signal.SIGUSR2
HANG_FLOOR_S = 5.0           # --hang-timeout-s 0: at least this long without progress
HANG_MULTIPLE = 10.0         # ... and this many times the worker's slowest batch
FRONT_HANG_S = 30.0          # --hang-timeout-s 0: a front's event loop, this long stopped


def hang_limit(configured_s: float, slowest_batch_s: float) -> float:
    """How long a worker may go without progress before it counts as hung: the flag,
    or a multiple of its slowest batch so far (warm-up included), with a floor."""
    if configured_s > 0:
        return configured_s
    return max(HANG_FLOOR_S, HANG_MULTIPLE * slowest_batch_s)


def stalled(now_s: float, beat_s: float, busy_since_s: float, limit_s: float) -> str | None:
    """Why a worker counts as hung (its event loop stopped turning, or one batch has run
    too long), or None. A worker that never beat (still loading) is not judged."""
    if beat_s and now_s - beat_s > limit_s:
        return f"its event loop has not turned for {now_s - beat_s:.1f} s"
    if busy_since_s and now_s - busy_since_s > limit_s:
        return f"a batch has been running for {now_s - busy_since_s:.1f} s"
    return None


def _child_main(target, args, run_id: str, supervisor_pid: int) -> None:
    """Every child's entry: die with the supervisor, hold the run's lock, then work.

    ``PR_SET_PDEATHSIG`` has the kernel SIGKILL this process when the supervisor dies,
    however it dies (kill -9 included): no orphan keeps serving a port that a new server
    then cannot take. The check after it covers a supervisor that died first."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != supervisor_pid:
        os._exit(1)
    for sig in (signal.SIGINT, signal.SIGTERM):       # the supervisor's to act on
        signal.signal(sig, signal.SIG_IGN)
    hold_run_lock(run_id)
    target(*args)


class _Child:
    def __init__(self, role: str, index: int, target, args, cfg: Config):
        """``cfg``: a worker's model's (its memory's names, its counters)."""
        self.role, self.index, self.target, self.args = role, index, target, args
        self.cfg = cfg
        self.process: BaseProcess = mp.Process()     # replaced, started, by _start
        self.restarts = 0
        self.started = 0.0
        self.restart_at: float | None = None     # dead, to be started again then

    @property
    def name(self) -> str:
        """Its shared memory's name, and how logs call it (``m1-worker0``)."""
        return self.cfg.scoped(f"{self.role}{self.index}")

    def backoff(self, now: float) -> float:
        """Seconds before a child that died now starts again: at once if it had lived
        STEADY_S, else longer with each quick death (a crash loop does not spin)."""
        if now - self.started > STEADY_S:
            return 0.0
        return RESTART_BACKOFF_S[min(self.restarts, len(RESTART_BACKOFF_S) - 1)]


class Supervisor:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.ctx = mp.get_context("spawn")
        self.children: list[_Child] = []
        self.stopping = False
        self.leaving: list[_Child] = []        # workers of removed models, stopping

    def run(self) -> int:
        removed, foreign = remove_stale_segments()
        if removed:
            log.info("removed %d shared-memory segments left by a killed server", removed)
        if foreign:
            log.info("left %d other users' gpserve runs in %s alone (their lock files are "
                     "not ours)", foreign, SHM_DIR)
        run_id = str(os.getpid())
        plan = make_plan(self.cfg, run_id)
        self.cfg = cfg = plan.cfg
        sock = sockets.listen(cfg)
        self.grpc_port = sockets.reserve_grpc_port(cfg)
        hold_run_lock(run_id)
        metrics_dir = segment_path(run_id, "metrics")
        os.makedirs(metrics_dir, exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir   # before any child starts
        # the run's figures (fronts, restarts), in the segment of the model in slot 0
        self.counters = Counters(segment_path(run_id, "counters"), create=True)
        self.model_counters: dict[int, Counters] = {0: self.counters}
        for model in plan.models:
            if model.cfg.slot not in self.model_counters:
                self._model_counters(model)
        self.models = ModelControl(plan, self.counters, self._start_model,
                                   self._stop_model, self._fronts_applied)
        self.control = control.listen(run_id)      # fronts' load and unload requests
        self.children = [child for model in plan.models for child in self._workers(model)]
        self.children += self._fronts(plan, sock)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            for child in self.children:
                self._start(child)
            announce(plan)
            self._watch()
        finally:
            self._stop(sock)
        return 0

    def _model_counters(self, model: ModelPlan) -> None:
        self.model_counters[model.cfg.slot] = Counters(
            segment_path(model.cfg.run_id, model.cfg.scoped("counters")), create=True)

    @staticmethod
    def _workers(model: ModelPlan) -> list[_Child]:
        from gpserve.workers import worker
        return [_Child("worker", i, worker.main, (model.cfg, i), model.cfg)
                for i in range(model.worker_processes)]

    @staticmethod
    def _fronts(plan: Plan, sock: socket.socket) -> list[_Child]:
        from . import front
        return [_Child("front", i, front.main, (plan.cfg, i, sock), plan.cfg)
                for i in range(plan.cfg.fronts)]

    # -- models added and removed while serving (gpserve/model_control.py) -------------
    def _start_model(self, model: ModelPlan) -> None:
        self._model_counters(model)
        for child in self._workers(model):
            self.children.append(child)
            self._start(child)

    def _stop_model(self, model: ModelPlan) -> None:
        """Its fronts let go of it: its workers stop (and are not restarted)."""
        stopping = [c for c in self.children if c.role == "worker"
                    and c.cfg.slot == model.cfg.slot]
        self.children = [c for c in self.children if c not in stopping]
        for child in stopping:
            if child.restart_at is None:
                _signal(child, STOP_SIGNAL)
        self.leaving += stopping

    def _fronts_applied(self, generation: int) -> bool:
        """Every running front serves model set ``generation`` (or a later one)."""
        return all(self.counters.models_applied(c.index) >= generation
                   for c in self.children if c.role == "front" and c.restart_at is None
                   and c.process.is_alive())

    def _start(self, child: _Child) -> None:
        child.restart_at = None
        child.process = self.ctx.Process(
            target=_child_main, args=(child.target, child.args, self.cfg.run_id, os.getpid()),
            name=f"gpserve-{child.name}", daemon=False)
        child.process.start()
        child.started = time.monotonic()
        self._counters(child).set_pid(child.role, child.index, _pid(child))

    def _counters(self, child: _Child) -> Counters:
        return self.model_counters[child.cfg.slot]

    def _on_signal(self, signum, frame) -> None:
        if not self.stopping:
            log.info("received %s: draining", signal.Signals(signum).name)
        self.stopping = True

    def _watch(self) -> None:
        from . import metrics  # only now: PROMETHEUS_MULTIPROC_DIR is set
        while not self.stopping:
            now = time.monotonic()
            for child in self.children:
                if child.restart_at is not None and child.restart_at <= now:
                    self._start(child)
            self._kill_hung(metrics)
            self.models.tick(now)
            self.leaving = [c for c in self.leaving if c.process.is_alive()]   # reaped
            running: dict[Any, _Child] = {      # sentinel -> child
                c.process.sentinel: c for c in self.children if c.restart_at is None}
            due = [c.restart_at - now for c in self.children if c.restart_at is not None]
            for ready in wait([*running, self.control],
                              timeout=max(0.0, min([WATCH_S, *due]))):
                if self.stopping:
                    break
                if ready is self.control:
                    call = control.accept(self.control)
                    if call is not None:
                        self.models.handle(call)
                else:
                    self._died(running[ready], metrics)

    def _died(self, child: _Child, metrics) -> None:
        """Say why, clean up after it, and set when it starts again."""
        child.process.join()
        code, pid = child.process.exitcode, _pid(child)
        how = f"signal {-code}" if code and code < 0 else f"exit code {code}"
        now = time.monotonic()
        delay = child.backoff(now)
        log.warning("%s (pid %d) died (%s); restarting in %.1fs", child.name, pid, how, delay)
        child.restarts += 1
        child.restart_at = now + delay
        self.counters.count_restart(child.role)
        metrics.RESTARTS.labels(child.role).inc()
        metrics.process_gone(pid)
        with contextlib.suppress(FileNotFoundError):            # nobody writes there now
            os.unlink(segment_path(self.cfg.run_id, f"{child.name}-{pid}"))

    def _kill_hung(self, metrics) -> None:
        """A child that makes no progress (stopped, deadlocked, a runtime stuck in a
        kernel) holds its requests until their deadline and, to the others, looks
        idle. Once it has gone its limit without progress it is reported and killed,
        and restarted as a dead child is. A worker is first marked not ready (fronts
        stop routing to it), and its requests are answered Unavailable at once, as on
        a crash; a front's clients see their connections close, and new connections go
        to the other fronts."""
        now = time.monotonic()
        for child in self.children:
            if child.restart_at is not None or not child.process.is_alive():
                continue
            hung = self._worker_hung(child, now) if child.role == "worker" \
                else self._front_hung(child, now)
            if hung is None:
                continue
            why, limit = hung
            if child.role == "worker":
                self._counters(child).worker_ready(child.index, False)
            self.counters.count_hang(child.role)
            (metrics.WORKER_HANGS if child.role == "worker" else metrics.FRONT_HANGS).inc()
            log.error("%s (pid %d) is hung: %s, past its limit of %.1f s (--hang-timeout-s); "
                      "killing it: it is restarted", child.name, _pid(child), why, limit)
            _signal(child, signal.SIGKILL)

    def _worker_hung(self, child: _Child, now: float) -> tuple[str, float] | None:
        if not self._counters(child).worker_is_ready(child.index):
            return None                              # loading, warming up
        beat, busy_since, slowest = self._counters(child).worker_progress(child.index)
        limit = hang_limit(self.cfg.hang_timeout_s, slowest)
        why = stalled(now, beat, busy_since, limit)
        return None if why is None else (f"{why} (its slowest batch took {slowest:.3f} s)",
                                         limit)

    def _front_hung(self, child: _Child, now: float) -> tuple[str, float] | None:
        """A front's event loop that stopped turning (its model, if it hosts one, runs
        in a thread of its own: the loop turns while it computes)."""
        limit = self.cfg.hang_timeout_s or FRONT_HANG_S
        why = stalled(now, self.counters.front_heartbeat(child.index), 0, limit)
        return None if why is None else (why, limit)

    def _stop(self, sock: socket.socket) -> None:
        """Stop listening, drain the fronts, then stop the workers; remove the run's
        shared memory."""
        self.stopping = True
        self.models.close()                     # a load under way is answered: stopping
        started = [c for c in self.children + self.leaving
                   if c.process.pid is not None and c.restart_at is None]
        fronts = [c for c in started if c.role == "front"]
        sockets.stop_listening(sock, lambda: any(c.process.is_alive() for c in fronts))
        for child in fronts:
            _signal(child, STOP_SIGNAL)
        grace = self.cfg.timeout_ms / 1000 + 10
        for child in fronts:
            child.process.join(grace)
        sock.close()
        for child in started:
            if child.role != "front":
                _signal(child, STOP_SIGNAL)
        for child in started:
            child.process.join(5)
            if child.process.is_alive():
                log.warning("%s did not stop; killing it", child.name)
                child.process.kill()
                child.process.join(5)
        removed = remove_run_segments(self.cfg.run_id) if self.cfg.run_id else 0
        log.info("stopped; removed %d shared-memory segments", removed)


def _pid(child: _Child) -> int:
    pid = child.process.pid
    assert pid is not None, "a child that was started"
    return pid


def _signal(child: _Child, sig: int) -> None:
    if child.process.is_alive():
        try:
            os.kill(_pid(child), sig)
        except ProcessLookupError:
            pass


def serve(cfg: Config) -> int:
    from .logs import setup
    setup(cfg.verbose, "supervisor", cfg.log_format)
    try:
        return Supervisor(cfg).run()
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 2
        raise
