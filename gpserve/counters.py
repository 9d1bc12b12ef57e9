"""Server-wide counters in one small shared segment, read by every front for ``GET /``.

Each process writes only its own block (a worker its worker block, a front its front
block, the supervisor the server block), so no slot ever has two writers and no lock
is needed; readers add the blocks up. Fields are named here, once, and reached through
methods: no other module knows a slot's index.
"""
from __future__ import annotations

import mmap
import os
from collections.abc import Sequence

import numpy as np

MAX_PROCESSES = 64          # workers, and fronts: each has a block of its own
HISTOGRAM_BINS = 64         # batch sizes 1..63, and 64 or more

SERVER_FIELDS = ("worker_restarts", "front_restarts", "worker_hangs", "front_hangs",
                 "models_generation")
WARMED_SIZES = 16          # batch sizes a worker ran before traffic, as many as are shown
WORKER_FIELDS = ("pid", "ready", "queued_rows", "batches", "rows", "padded_rows",
                 "max_batch_rows", "rejected_queue_full",
                 "checks", "checks_changed", "check_abs", "check_rel",   # the last two: float64
                 "heartbeat_ms", "busy_since_ms", "slowest_batch_us",   # see worker_beat
                 *(f"warmed{i}" for i in range(WARMED_SIZES)))
CACHE_FIELDS = ("cache_hits", "cache_misses", "cache_writes", "cache_evictions",
                "cache_errors", "cache_rotations", "cache_corrupt",
                "cache_shared_hits", "cache_shared_misses", "cache_shared_errors",
                "cache_shared_ns", "cache_shared_skipped")    # the shared tier (Redis)
FRONT_FIELDS = ("pid", *CACHE_FIELDS, "connections", "heartbeat_ms", "models_applied")
ERROR_CODES = 32
# Triton's statistics extension (gpserve/oip/statistics.py): durations in ns, written
# through a memoryview (an int64 slot updated in ~50 ns, numpy's scalar path ~110 ns)
FRONT_STATS = ("success_count", "success_ns", "fail_count", "fail_ns", "cache_hit_count",
               "cache_hit_ns", "cache_miss_count", "cache_miss_ns", "last_inference_ms")
WORKER_STATS = ("inferences", "executions", "queue_count", "queue_ns", "compute_count",
                "compute_input_ns", "compute_infer_ns", "compute_output_ns")
BATCH_STAT = ("count", "compute_input_ns", "compute_infer_ns", "compute_output_ns")
BATCH_STAT_SIZES = 256      # batch sizes 1..256 have statistics, at index size - 1
HEARTBEAT_S = 0.1           # a worker's and a front's event loop write their heartbeat this often


class Counters:
    def __init__(self, path: str, create: bool = False):
        self.path = path
        w, f = len(WORKER_FIELDS) + HISTOGRAM_BINS, len(FRONT_FIELDS) + ERROR_CODES
        ws, fs = len(WORKER_STATS) + BATCH_STAT_SIZES * len(BATCH_STAT), len(FRONT_STATS)
        size = 8 * (len(SERVER_FIELDS) + MAX_PROCESSES * (w + f + ws + fs))
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600) if create else os.open(path, os.O_RDWR)
        try:
            if create:
                os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        slots = np.frombuffer(self._mm, dtype=np.int64)
        at = len(SERVER_FIELDS)
        self._server = slots[:at]
        self._workers = slots[at:at + MAX_PROCESSES * w].reshape(MAX_PROCESSES, w)
        at += MAX_PROCESSES * w
        self._fronts = slots[at:at + MAX_PROCESSES * f].reshape(MAX_PROCESSES, f)
        at += MAX_PROCESSES * f
        self._q = memoryview(self._mm).cast("q")       # the statistics' slots
        self._worker_stats, self._front_stats = at, at + MAX_PROCESSES * ws
        self._ws, self._fs = ws, fs
        self._batch_stats = slots[at:at + MAX_PROCESSES * ws].reshape(MAX_PROCESSES, ws)[
            :, len(WORKER_STATS):].reshape(MAX_PROCESSES, BATCH_STAT_SIZES, len(BATCH_STAT))
        self._w = {name: i for i, name in enumerate(WORKER_FIELDS)}
        self._worker_block, self._ww = len(SERVER_FIELDS), w
        self._queued_rows = self._w["queued_rows"]
        self._f = {name: i for i, name in enumerate(FRONT_FIELDS)}
        if create:
            self._fronts[:, self._f["connections"]] = -1      # not accepting (yet)

    # -- the supervisor ----------------------------------------------------------------
    def count_restart(self, role: str) -> None:
        self._server[SERVER_FIELDS.index(f"{role}_restarts")] += 1

    def set_pid(self, role: str, index: int, pid: int) -> None:
        block = self._workers if role == "worker" else self._fronts
        block[index, 0] = pid
        if role == "worker":                 # a new process: no readiness, no progress yet
            for field in ("ready", "heartbeat_ms", "busy_since_ms"):
                self._workers[index, self._w[field]] = 0
        else:
            self._fronts[index, self._f["heartbeat_ms"]] = 0

    def publish_models(self, generation: int) -> None:
        """The set of models served moved to ``generation`` (see gpserve/served.py)."""
        self._server[SERVER_FIELDS.index("models_generation")] = generation

    def models_generation(self) -> int:
        return int(self._server[SERVER_FIELDS.index("models_generation")])

    def models_applied(self, index: int) -> int:
        """The generation of the model set front ``index`` serves."""
        return int(self._fronts[index, self._f["models_applied"]])

    def pids(self, workers: int, fronts: int) -> dict:
        return {"supervisor": int(self.path.rsplit("gpserve-", 1)[1].split("-")[0]),
                "workers": self._workers[:workers, 0].tolist(),
                "fronts": self._fronts[:fronts, 0].tolist()}

    # -- a worker ----------------------------------------------------------------------
    def worker_ready(self, index: int, ready: bool, warmed_sizes: Sequence[int] = ()) -> None:
        row, first = self._workers[index], self._w["warmed0"]
        sizes = sorted(set(warmed_sizes))[:WARMED_SIZES]
        row[first:first + WARMED_SIZES] = sizes + [0] * (WARMED_SIZES - len(sizes))
        row[self._w["ready"]] = int(ready)

    def worker_load(self, index: int, rows: int) -> None:
        """Rows waiting in a worker's queue or in its pipeline (what fronts route by)."""
        self._q[self._worker_block + index * self._ww + self._queued_rows] = rows

    def worker_beat(self, index: int, now_s: float) -> None:
        """The worker's event loop turns (written every HEARTBEAT_S): a stopped or stuck
        worker stops writing it. Times are CLOCK_MONOTONIC, the same in every process."""
        self._workers[index, self._w["heartbeat_ms"]] = int(now_s * 1e3)

    def worker_busy(self, index: int, since_s: float | None, took_s: float = 0.0) -> None:
        """A batch started running at ``since_s`` (None: it ended, having taken
        ``took_s``: the slowest so far is kept, for the hang limit)."""
        row, w = self._workers[index], self._w
        row[w["busy_since_ms"]] = 0 if since_s is None else int(since_s * 1e3)
        took_us = int(took_s * 1e6)
        if took_us > row[w["slowest_batch_us"]]:
            row[w["slowest_batch_us"]] = took_us

    def worker_progress(self, index: int) -> tuple[float, float, float]:
        """(last heartbeat, batch running since or 0, slowest batch), in seconds."""
        row, w = self._workers[index], self._w
        return (row[w["heartbeat_ms"]] / 1e3, row[w["busy_since_ms"]] / 1e3,
                row[w["slowest_batch_us"]] / 1e6)

    def worker_is_fresh(self, index: int, now_s: float, stale_s: float) -> bool:
        """Its event loop turned within ``stale_s`` (fronts route around one that did
        not: stopped, or stuck, it takes no new work while the supervisor decides)."""
        beat = self._workers[index, self._w["heartbeat_ms"]]
        return not beat or now_s * 1e3 - beat < stale_s * 1e3

    def count_hang(self, role: str = "worker") -> None:
        self._server[SERVER_FIELDS.index(f"{role}_hangs")] += 1

    def count_queue_full(self, index: int) -> None:
        self._workers[index, self._w["rejected_queue_full"]] += 1

    def record_check(self, index: int, absolute: float, relative: float, changed: bool) -> None:
        """A worker re-ran one request of a merged batch alone (see batch_check.py)."""
        row, w = self._workers[index], self._w
        row[w["checks"]] += 1
        row[w["checks_changed"]] += int(changed)
        floats = row.view(np.float64)
        floats[w["check_abs"]] = max(floats[w["check_abs"]], absolute)
        floats[w["check_rel"]] = max(floats[w["check_rel"]], relative)

    def worker_batch(self, index: int, requests: int, rows: int, size_run: int,
                     waited_ns: int, times: tuple[int, int, int] | None) -> None:
        """A batch of ``requests`` that waited ``waited_ns`` in the queue in all: ``rows``
        rows run as ``size_run`` (more when padded up). ``times``: its gather, run and
        answer in ns when it ran as one execution (a merged batch that failed re-ran its
        requests alone: none); Triton's statistics count each request with them. One
        call a batch, through the memoryview (numpy's scalar path is twice as slow)."""
        q, w = self._q, self._w
        at = self._worker_block + index * self._ww
        q[at + w["batches"]] += 1
        q[at + w["rows"]] += rows
        q[at + w["padded_rows"]] += size_run - rows
        if rows > q[at + w["max_batch_rows"]]:
            q[at + w["max_batch_rows"]] = rows
        q[at + len(WORKER_FIELDS) + min(max(size_run, 1), HISTOGRAM_BINS) - 1] += 1
        at = self._worker_stats + index * self._ws
        q[at + 2] += requests
        q[at + 3] += waited_ns
        if times is None:
            return
        input_ns, infer_ns, output_ns = times
        q[at] += rows
        q[at + 1] += 1
        q[at + 4] += requests
        q[at + 5] += input_ns * requests
        q[at + 6] += infer_ns * requests
        q[at + 7] += output_ns * requests
        if 0 < size_run <= BATCH_STAT_SIZES:           # larger: not in batch_stats
            slot = at + len(WORKER_STATS) + (size_run - 1) * len(BATCH_STAT)
            q[slot] += 1
            q[slot + 1] += input_ns
            q[slot + 2] += infer_ns
            q[slot + 3] += output_ns

    # -- what fronts read --------------------------------------------------------------
    def worker_is_ready(self, index: int) -> bool:
        return bool(self._workers[index, self._w["ready"]])

    def ready_workers(self) -> int:
        return int(self._workers[:, self._w["ready"]].sum())

    def queued_rows(self, index: int) -> int:
        """Rows waiting in one worker's queue, plus its batch running: how busy it is."""
        row = self._workers[index]
        return int(row[self._w["queued_rows"]])

    def batch_checks(self) -> dict:
        """Checks on live traffic, all workers together."""
        w, floats = self._w, self._workers.view(np.float64)
        return {"checks": int(self._workers[:, w["checks"]].sum()),
                "changed": int(self._workers[:, w["checks_changed"]].sum()),
                "max_difference": float(floats[:, w["check_abs"]].max()),
                "relative": float(floats[:, w["check_rel"]].max())}

    def warmed_sizes(self, workers: int) -> list[list[int]]:
        """Per worker, the batch sizes it ran before taking traffic."""
        first = self._w["warmed0"]
        rows = self._workers[:workers, first:first + WARMED_SIZES].tolist()
        return [[n for n in sizes if n] for sizes in rows]

    # -- a front -----------------------------------------------------------------------
    def add_cache(self, index: int, **counts: int) -> None:
        """A front's row cache counts (``hits=3, misses=1``...); each front its own."""
        row = self._fronts[index]
        for name, n in counts.items():
            row[self._f[f"cache_{name}"]] += n

    def cache_totals(self) -> dict:
        return {name[6:]: int(self._fronts[:, self._f[name]].sum()) for name in CACHE_FIELDS}

    def front_beat(self, index: int, now_s: float) -> None:
        """The front's event loop turns (written every HEARTBEAT_S), as a worker's."""
        self._fronts[index, self._f["heartbeat_ms"]] = int(now_s * 1e3)

    def front_heartbeat(self, index: int) -> float:
        """The front's last heartbeat, in seconds (0: it has not beaten yet)."""
        return self._fronts[index, self._f["heartbeat_ms"]] / 1e3

    def apply_models(self, index: int, generation: int) -> None:
        """Front ``index`` serves the model set of ``generation``: its new models are
        ready and its retired ones hold no request."""
        self._fronts[index, self._f["models_applied"]] = generation

    def set_connections(self, index: int, count: int) -> None:
        """How many client connections front ``index`` holds now; -1: it is not
        accepting (starting)."""
        self._fronts[index, self._f["connections"]] = count

    def connections(self, fronts: int) -> list[int]:
        """Each front's open client connections (-1: not accepting)."""
        return self._fronts[:fronts, self._f["connections"]].tolist()

    def fewest_connections(self, fronts: int, but: int) -> int | None:
        """The fewest connections another accepting front holds (None: none is)."""
        others = [int(self._fronts[i, self._f["connections"]])
                  for i in range(fronts) if i != but]
        others = [n for n in others if n >= 0]
        return min(others) if others else None

    def count_error(self, index: int, code: int) -> None:
        """A front answered a request with this error code."""
        self._fronts[index, len(FRONT_FIELDS) + min(max(code, 0), ERROR_CODES - 1)] += 1

    def errors(self) -> dict:
        """Requests answered with an error, by the error's name, all fronts together."""
        from .errors import BY_CODE
        totals = self._fronts[:, len(FRONT_FIELDS):].sum(axis=0).tolist()
        return {(BY_CODE[c].__name__ if c in BY_CODE else f"code{c}"): n
                for c, n in enumerate(totals) if n}

    def front_inference(self, index: int, ok: bool, took_ns: int, now_ms: int) -> None:
        """An inference request answered (``ok``) or failed after ``took_ns``."""
        q, at = self._q, self._front_stats + index * self._fs + (0 if ok else 2)
        q[at] += 1
        q[at + 1] += took_ns
        q[self._front_stats + index * self._fs + 8] = now_ms

    def front_cache(self, index: int, hit: bool, took_ns: int) -> None:
        """A request's cache lookup answered all its rows (``hit``) or not; ``took_ns``:
        the lookup, and for a miss also the store of the computed rows."""
        q, at = self._q, self._front_stats + index * self._fs + (4 if hit else 6)
        q[at] += 1
        q[at + 1] += took_ns

    def statistics(self) -> dict:
        """Triton's model statistics, all processes added up: the FRONT_STATS and
        WORKER_STATS fields, ``last_inference_ms`` the latest, and ``batches``:
        {size: (count, input ns, infer ns, output ns)}."""
        q, out = self._q, dict[str, object]()
        for names, base, width in ((FRONT_STATS, self._front_stats, self._fs),
                                   (WORKER_STATS, self._worker_stats, self._ws)):
            for k, name in enumerate(names):
                values = [q[base + i * width + k] for i in range(MAX_PROCESSES)]
                out[name] = max(values) if name == "last_inference_ms" else sum(values)
        totals = self._batch_stats.sum(axis=0).tolist()         # [size - 1][field]
        out["batches"] = {size: tuple(v) for size, v in enumerate(totals, 1) if v[0]}
        return out

    def snapshot(self) -> dict:
        w, workers = self._w, self._workers
        total = {name: int(workers[:, w[name]].sum())
                 for name in ("batches", "rows", "padded_rows", "queued_rows",
                              "rejected_queue_full")}
        hist_counts = workers[:, len(WORKER_FIELDS):].sum(axis=0).tolist()
        hist = {str(i + 1) if i + 1 < HISTOGRAM_BINS else f"{HISTOGRAM_BINS}+": n
                for i, n in enumerate(hist_counts) if n}
        errors = self.errors()
        server = dict(zip(SERVER_FIELDS, self._server.tolist()))
        return {
            "ready_workers": self.ready_workers(), "batches": total["batches"],
            "batched_rows": total["rows"], "padded_rows": total["padded_rows"],
            "max_batch_rows": int(workers[:, w["max_batch_rows"]].max()),
            "mean_batch_rows": round(total["rows"] / total["batches"], 3)
            if total["batches"] else 0,
            "queued_rows": total["queued_rows"],
            "rejected_queue_full": total["rejected_queue_full"],
            "expired": errors.get("DeadlineExceeded", 0), "errors": errors,
            **server, "batch_size_histogram": hist,
        }
