"""The supervisor (``gpserve serve``): holds the port, starts and restarts the workers
and the fronts, and on SIGTERM/SIGINT drains and cleans up.

The fronts accept from one listening socket that the supervisor binds and holds for the
run's life: connections that arrive while a front restarts wait in its backlog, and a
stop shuts it before the fronts drain.

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
import struct
import sys
import time
from multiprocessing.connection import wait

from .config import Config
from .counters import MAX_PROCESSES, Counters
from .model_source import resolve
from .shm import (
    SHM_DIR,
    hold_run_lock,
    remove_run_segments,
    remove_stale_segments,
    segment_path,
)

log = logging.getLogger("gpserve.supervisor")
RESTART_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)
# How the supervisor stops a child. Children ignore SIGINT and SIGTERM: Ctrl-C in a
# terminal and systemd's default KillMode=control-group send those to every process of
# the group at once, and a front that began its own shutdown then closed connections
# before the socket stopped listening, and workers died under requests still running.
# The supervisor alone acts on them, in order: stop listening, drain the fronts (this
# signal), then stop the workers (this signal again: their default action, exit).
STOP_SIGNAL = signal.SIGUSR2
HANG_FLOOR_S = 5.0           # --hang-timeout-s 0: at least this long without progress
HANG_MULTIPLE = 10.0         # ... and this many times the worker's slowest batch


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


def _listen(cfg: Config) -> socket.socket:
    """The one listening socket every front accepts from, held here for the run's life:
    connections that arrive while a front restarts wait in its backlog, and a stop
    shuts it once, before the fronts drain. (One socket per front with SO_REUSEPORT
    was tried: the kernel spreads connections more evenly, but each front's backlog is
    then emptied by that front alone, and a drain reset the connections waiting there:
    see docs/architecture.md.)"""
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"gpserve: cannot listen on {cfg.listen}: {e.strerror}"
                         + (" (is another server running there?)"
                            if e.errno == 98 else "")) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _reserve_grpc_port(cfg: Config) -> socket.socket | None:
    """A socket bound to ``--grpc-listen`` with SO_REUSEPORT, held for the run: a port in
    use fails here, with a clear message, not in every front; and the port's group
    admits only processes of this user (the kernel's rule for SO_REUSEPORT). The
    fronts' gRPC servers bind it too and listen; this one never listens, so it takes
    no connections. First a bind *without* SO_REUSEPORT: it fails while any socket holds
    the port, another gpserve's group included, which a SO_REUSEPORT bind would join."""
    if not cfg.grpc_listen:
        return None
    host, _, port = cfg.grpc_listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = None
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, int(port)))
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, int(port)))
    except OSError as e:
        if sock is not None:
            sock.close()
        raise SystemExit(f"gpserve: cannot listen on --grpc-listen {cfg.grpc_listen}: "
                         f"{e.strerror}") from None
    return sock


def inspect_model(cfg: Config):
    """Load the model once, in a short-lived process (so the supervisor never imports a
    model runtime), to fail fast and to learn its spec for the fronts."""
    from concurrent.futures import ProcessPoolExecutor

    from gpserve.workers.backend import backend_name, inspect
    try:
        cfg.backend = cfg.backend or backend_name(cfg.model_path)
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            return pool.submit(inspect, cfg).result()
    except Exception as e:
        raise SystemExit(f"gpserve: cannot load model {cfg.model_path} "
                         f"(backend {cfg.backend or '?'}): {type(e).__name__}: {e}") from None


CHEAP_ROW_MS = 1.0


def choose_placement(cfg: Config, spec) -> str:
    """``--placement auto``: a model cheaper than a hop between processes runs in the
    fronts (echo, or an ONNX model on the CPU whose one row took under CHEAP_ROW_MS at
    load); anything else, and every GPU, in worker processes."""
    if cfg.placement != "auto":
        return cfg.placement
    from gpserve.workers.devices import worker_device
    cheap = spec.echo or (cfg.backend == "onnx" and spec.one_row_ms is not None
                          and spec.one_row_ms < CHEAP_ROW_MS)
    return "fronts" if cheap and worker_device(cfg.device, 0) == "cpu" else "workers"


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
    def __init__(self, role: str, index: int, target, args):
        self.role, self.index, self.target, self.args = role, index, target, args
        self.process: mp.Process | None = None
        self.restarts = 0
        self.started = 0.0

    @property
    def name(self) -> str:
        return f"{self.role}{self.index}"


class Supervisor:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.ctx = mp.get_context("spawn")
        self.children: list[_Child] = []
        self.stopping = False

    def _start(self, child: _Child) -> None:
        child.process = self.ctx.Process(
            target=_child_main, args=(child.target, child.args, self.cfg.run_id, os.getpid()),
            name=f"gpserve-{child.name}", daemon=False)
        child.process.start()
        child.started = time.monotonic()
        self.counters.set_pid(child.role, child.index, child.process.pid)

    def run(self) -> int:
        cfg = self.cfg
        removed, foreign = remove_stale_segments()
        if removed:
            log.info("removed %d shared-memory segments left by a killed server", removed)
        if foreign:
            log.info("left %d other users' gpserve runs in %s alone (their lock files are "
                     "not ours)", foreign, SHM_DIR)
        cfg.model_path = resolve(cfg.model, cfg.models_dir, cfg.model_sha256)
        spec = inspect_model(cfg)
        if cfg.cache:
            if not spec.batchable:
                raise SystemExit(
                    f"gpserve: --cache needs a model whose rows are independent (every input "
                    f"and output batch-first, -1 in dimension 0); {spec.name} has inputs "
                    f"{', '.join(s.describe() for s in spec.inputs)}: serve it without --cache")
            from gpserve.cache.keys import fingerprint
            cfg.fingerprint = fingerprint(cfg.model_path)
        sock = _listen(cfg)
        self.grpc_port = _reserve_grpc_port(cfg)
        cfg.run_id = str(os.getpid())
        hold_run_lock(cfg.run_id)
        metrics_dir = segment_path(cfg.run_id, "metrics")
        os.makedirs(metrics_dir, exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir   # before any child starts
        cfg.place(choose_placement(cfg, spec))
        if cfg.workers > MAX_PROCESSES or cfg.fronts > MAX_PROCESSES:
            raise SystemExit(f"gpserve: at most {MAX_PROCESSES} workers and "
                             f"{MAX_PROCESSES} fronts")
        self.counters = Counters(segment_path(cfg.run_id, "counters"), create=True)

        from gpserve.workers import worker

        from . import front
        workers = cfg.workers if cfg.placement == "workers" else 0
        self.children = (
            [_Child("worker", i, worker.main, (cfg, i)) for i in range(workers)]
            + [_Child("front", i, front.main, (cfg, spec, i, sock)) for i in range(cfg.fronts)])
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            for child in self.children:
                self._start(child)
            self._summary(spec)
            self._watch()
        finally:
            self._stop(sock)
        return 0

    def _summary(self, spec) -> None:
        """The startup line: what is served, where, and how."""
        from gpserve.workers.devices import worker_device
        cfg = self.cfg
        fields = {
            "model": cfg.model_path, "name": spec.name, "backend": spec.backend,
            "devices": sorted({worker_device(cfg.device, i) for i in range(cfg.workers)}),
            "fronts": cfg.fronts, "workers": cfg.workers, "threads": cfg.threads,
            "placement": cfg.placement,
            "batching": "off" if cfg.batching == "off" or not spec.batchable else
            f"max {cfg.max_batch} rows, {cfg.max_delay_ms:g} ms",
            "max_queue": cfg.max_queue, "timeout_ms": cfg.timeout_ms,
            "cache": f"{cfg.cache_dir} ({cfg.cache_size_mb} MB)" if cfg.cache else "off",
            "listen": f"http://{cfg.listen}"
            + (f", grpc://{cfg.grpc_listen}" if cfg.grpc_listen else "")}
        from gpserve.workers.batch_check import VERDICTS, verdict
        found = verdict(spec.batch_probe)
        probe = found["checks"]["probe"]
        fields["batch_invariant"] = found["invariant"]
        fields["batch_max_difference"] = found["max_difference"]
        log.info("serving %s (%s) on %s: devices %s, %d fronts, %d model instances in the "
                 "%s x %d threads, "
                 "batching %s (%s: largest difference %.3g; %s), cache %s", spec.name,
                 spec.backend, fields["listen"], ",".join(fields["devices"]), cfg.fronts,
                 cfg.workers, cfg.placement, cfg.threads, fields["batching"],
                 VERDICTS[found["invariant"]],
                 fields["batch_max_difference"], probe.get("note", ""), fields["cache"],
                 extra={"fields": fields})
        if found["invariant"] is False:
            batching = cfg.batching != "off" and spec.batchable
            log.warning(
                "batching changes %s's answers: a row run in a batch differs from the same "
                "row run alone by up to %.3g (%.3g of the output's scale), so a request's "
                "answer depends on the requests batched beside it.%s", spec.name,
                probe["max_difference"], probe["relative"],
                " Serve with --batching off, or send config 'batch=off' on requests, where "
                "bit-stable answers matter." if batching else " Batching is off: answers "
                "are stable.")
            if cfg.cache and batching:
                log.warning("--cache with a model whose answers depend on the batch: cached "
                            "rows hold whichever batch's answer came first")

    def _on_signal(self, signum, frame) -> None:
        if not self.stopping:
            log.info("received %s: draining", signal.Signals(signum).name)
        self.stopping = True

    def _watch(self) -> None:
        from . import metrics  # only now: PROMETHEUS_MULTIPROC_DIR is set
        while not self.stopping:
            sentinels = {c.process.sentinel: c for c in self.children}
            self._kill_hung(metrics)
            for ready in wait(list(sentinels), timeout=0.5):
                child = sentinels[ready]
                if self.stopping:
                    break
                child.process.join()
                code = child.process.exitcode
                how = f"signal {-code}" if code and code < 0 else f"exit code {code}"
                lived = time.monotonic() - child.started
                delay = 0.0 if lived > 30 else RESTART_BACKOFF_S[
                    min(child.restarts, len(RESTART_BACKOFF_S) - 1)]
                log.warning("%s (pid %d) died (%s); restarting in %.1fs", child.name,
                            child.process.pid, how, delay)
                time.sleep(delay)
                child.restarts += 1
                self.counters.count_restart(child.role)
                metrics.RESTARTS.labels(child.role).inc()
                metrics.process_gone(child.process.pid)
                for arena in (child.name, f"worker{child.index}"):   # nobody writes there now
                    with contextlib.suppress(FileNotFoundError):     # (a front's hosted worker)
                        os.unlink(segment_path(self.cfg.run_id, f"{arena}-{child.process.pid}"))
                self._start(child)

    def _kill_hung(self, metrics) -> None:
        """A worker that makes no progress (stopped, deadlocked, a runtime stuck in a
        kernel) holds its requests until their deadline and, to the fronts, looks idle.
        Once it has gone ``hang_limit`` without progress it is marked not ready (fronts
        stop routing to it), reported, and killed: its requests are answered
        Unavailable at once, as on a crash, and it is restarted as a dead child is."""
        now = time.monotonic()
        for child in self.children:
            if child.role != "worker" or not self.counters.worker_is_ready(child.index) \
                    or not child.process.is_alive():
                continue
            beat, busy_since, slowest = self.counters.worker_progress(child.index)
            limit = hang_limit(self.cfg.hang_timeout_s, slowest)
            why = stalled(now, beat, busy_since, limit)
            if why is None:
                continue
            self.counters.worker_ready(child.index, False)
            self.counters.count_hang()
            metrics.WORKER_HANGS.inc()
            log.error("%s (pid %d) is hung: %s, past its limit of %.1f s (--hang-timeout-s; "
                      "its slowest batch took %.3f s); killing it: its requests are answered "
                      "Unavailable and it is restarted", child.name, child.process.pid, why,
                      limit, slowest)
            _signal(child, signal.SIGKILL)

    def _stop(self, sock: socket.socket) -> None:
        self.stopping = True
        started = [c for c in self.children if c.process is not None]
        fronts = [c for c in started if c.role == "front"]
        _stop_listening(sock, fronts)
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


DRAIN_BACKLOG_S = 2.0
_DROP_ALL = struct.pack("HBBI", 0x06, 0, 0, 0)      # classic BPF: "ret #0", drop the packet
SO_ATTACH_FILTER = 26
TCPI_UNACKED = 24            # struct tcp_info: a listener's accept-queue length is here


def _stop_listening(sock: socket.socket, fronts: list[_Child]) -> None:
    """Stop taking connections without resetting any: new connection attempts are
    dropped first (a socket filter), so clients retry and are refused once the socket
    closes; the fronts, still running, accept what waits in the backlog (up to
    DRAIN_BACKLOG_S); then the socket stops listening, for every front at once. Shutting
    it at once would reset whatever waits in the backlog: with busy fronts, every drain
    under load did."""
    import ctypes
    with contextlib.suppress(OSError):
        program = ctypes.create_string_buffer(_DROP_ALL)
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                        struct.pack("HxxxxxxQ", 1, ctypes.addressof(program)))
        give_up = time.monotonic() + DRAIN_BACKLOG_S
        while time.monotonic() < give_up and any(c.process.is_alive() for c in fronts):
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
            if struct.unpack_from("<I", info, TCPI_UNACKED)[0] == 0:
                break
            time.sleep(0.01)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)


def _signal(child: _Child, sig: int) -> None:
    if child.process.is_alive():
        try:
            os.kill(child.process.pid, sig)
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
