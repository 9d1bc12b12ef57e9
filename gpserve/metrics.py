"""Prometheus metrics, aggregated across every process of a server.

prometheus-client's multiprocess mode: the supervisor points ``PROMETHEUS_MULTIPROC_DIR``
at a folder of this run (``/dev/shm/gpserve-<pid>-metrics``, removed with the run's other
segments) before it starts any child; each process records into its own files there, and
``GET /metrics`` on any front adds them up. Import this module only after that.

Each record is a write to a memory-mapped file (0.5-1.2 µs). Most metrics record
that way. The ones every request or batch updates, eight updates for a small request
(a sixth of a front's time and more), are added up in the process first and written
at most ``FLUSH_S`` later (:class:`Tally`): ``GET /metrics`` may lag by that much.
"""
from __future__ import annotations

import bisect
import os

from prometheus_client import Counter, Gauge, Histogram, values

# prometheus-client asks os.getpid() on every update (to notice a fork), a system call:
# a third of an update's cost (a counter increment: 0.72 -> 0.50 us here; a small
# request makes 9 updates). Our processes are started with spawn and never fork after
# this import, so the pid is read once (prometheus-client's process_identifier hook).
_PID = os.getpid()
if "PROMETHEUS_MULTIPROC_DIR" in os.environ:       # else: one process's own metrics
    values.ValueClass = values.MultiProcessValue(process_identifier=lambda: _PID)

ENV = "PROMETHEUS_MULTIPROC_DIR"
_TIME = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

FLUSH_S = 1.0


class Tally:
    """Per-request updates of counters and histograms, added up here and written to
    prometheus-client's files by :func:`flush`: every FLUSH_S by the task of
    :func:`flush_periodically` that every front and worker runs, and by ``GET /metrics``
    for its own front. For the event loop's thread only. A process killed loses at most
    FLUSH_S of them. (An update asked the clock whether a flush was due, 0.1 us a time,
    eight times a small request: the timer does it once a second instead.)"""

    counters: dict = {}                  # counter child -> count not yet written
    histograms: list = []                # TallyHistogram
    gauges: list = []                    # TallyGauge


class TallyCounter:
    """A labelled Counter whose ``labels(...).inc(n)`` is added up first (see Tally)."""

    def __init__(self, counter: Counter):
        self.counter = counter
        self.children: dict[tuple[str, ...], _TallyChild] = {}

    def labels(self, *values: str) -> "_TallyChild":
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = _TallyChild(self.counter.labels(*values))
        return child


class _TallyChild:
    __slots__ = ("child",)

    def __init__(self, child):
        self.child = child

    def inc(self, n: float = 1) -> None:
        Tally.counters[self.child] = Tally.counters.get(self.child, 0) + n


class TallyHistogram:
    """A Histogram whose ``observe`` is added up first (see Tally): bucket counts and
    the sum, written as one increment each."""

    def __init__(self, histogram: Histogram):
        self.histogram, self.bounds = histogram, histogram._upper_bounds    # +inf last
        self.counts, self.total = [0] * len(self.bounds), 0.0
        Tally.histograms.append(self)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def write(self) -> None:
        if not any(self.counts):
            return
        # prometheus-client keeps one value per bucket (not cumulative) and the sum;
        # its observe() does these same increments, one observation at a time
        for value, n in zip(self.histogram._buckets, self.counts):
            if n:
                value.inc(n)
        self.histogram._sum.inc(self.total)
        self.counts, self.total = [0] * len(self.bounds), 0.0


class TallyGauge:
    """A Gauge whose ``set`` keeps the latest value, written with the tallies (see Tally)."""

    def __init__(self, gauge: Gauge):
        self.gauge = gauge
        self.value: float | None = None
        self.written: float | None = None
        Tally.gauges.append(self)

    def set(self, value: float) -> None:
        self.value = value

    def write(self) -> None:
        if self.value is not None and self.value != self.written:
            self.gauge.set(self.value)
            self.written = self.value


def flush() -> None:
    """Write every tallied update of this process now."""
    pending, Tally.counters = Tally.counters, {}
    for child, n in pending.items():
        child.inc(n)
    for histogram in Tally.histograms:
        histogram.write()
    for gauge in Tally.gauges:
        gauge.write()


async def flush_periodically() -> None:
    """A process's tallies written every FLUSH_S (a task in its event loop)."""
    import asyncio
    while True:
        await asyncio.sleep(FLUSH_S)
        flush()


REQUESTS = TallyCounter(Counter("gpserve_requests",
                                "Requests answered, by HTTP status and kind",
                                ["status", "kind"]))
REQUEST_SECONDS = TallyHistogram(Histogram(
    "gpserve_request_seconds", "End-to-end time in a front, from the first body byte to "
    "the response handed to the server", buckets=_TIME))
RESPONSE_BUILD_SECONDS = TallyHistogram(Histogram(
    "gpserve_response_build_seconds", "Front time encoding the response", buckets=_TIME))
# one model version's: labelled by model and version, recorded through ModelMetrics
_MODEL = ["model", "version"]
QUEUE_WAIT_SECONDS = Histogram(
    "gpserve_queue_wait_seconds", "Time a request waited in a worker's queue before its "
    "batch ran", _MODEL, buckets=_TIME)
BATCH_ASSEMBLY_SECONDS = Histogram(
    "gpserve_batch_assembly_seconds", "Worker time gathering a batch's rows into model "
    "inputs", _MODEL, buckets=_TIME)
BATCH_HOLD_SECONDS = Histogram(
    "gpserve_batch_hold_seconds", "Time an idle device waited for a fuller batch before "
    "running it (batches that were held only)", _MODEL, buckets=_TIME)
MODEL_SECONDS = Histogram(
    "gpserve_model_seconds", "Worker time in the model runtime per batch", _MODEL,
    buckets=_TIME)
BATCH_ROWS = Histogram(
    "gpserve_batch_rows", "Rows per batch a worker ran", _MODEL,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
QUEUE_ROWS = Gauge("gpserve_queue_rows", "Rows waiting in a worker's queue", _MODEL,
                   multiprocess_mode="livemax")
# written at once: a client that has its answer sees its rows counted (tests rely on it)
ROWS = Counter("gpserve_rows", "Rows answered, by where they came from (cache or model)",
               ["source", *_MODEL])
CACHE_EVICTIONS = Counter("gpserve_cache_evictions",
                          "Rows evicted from the row cache (its old generation cleared)",
                          _MODEL)
CACHE_ERRORS = Counter("gpserve_cache_errors",
                       "Row-cache failures, by tier: local (LMDB: writes dropped, or the "
                       "cache disabled), shared (Redis: a lookup or write given up)",
                       ["tier", *_MODEL])
CACHE_CORRUPT = Counter("gpserve_cache_corrupt_rows",
                        "Cached rows that failed their checksum: answered as misses and "
                        "computed again", _MODEL)
CACHE_BYTES = Gauge("gpserve_cache_bytes", "Bytes the row cache holds", _MODEL,
                    multiprocess_mode="livemax")
BATCH_CHECKS = Counter("gpserve_batch_checks",
                       "Requests of merged batches re-run alone to see whether batching "
                       "changes answers, by result (same or changed)", ["result", *_MODEL])
BATCH_DIFFERENCE = Gauge("gpserve_batch_difference",
                         "Largest difference seen between a row run in a batch and alone "
                         "(the load probe and live checks)", _MODEL, multiprocess_mode="max")
MODEL_LOAD_SECONDS = Gauge("gpserve_model_load_seconds", "Time a worker took to load the "
                           "model", _MODEL, multiprocess_mode="max")


class ModelMetrics:
    """One model version's metrics with their labels bound once: what a worker (or a
    front's instance of the model, or its row cache) records into. One per model version
    and process (:meth:`of`)."""

    _made: dict[tuple[str, str], "ModelMetrics"] = {}

    @classmethod
    def of(cls, name: str, version: int | str) -> "ModelMetrics":
        key = (name, str(version))
        if key not in cls._made:
            cls._made[key] = cls(*key)
        return cls._made[key]

    def __init__(self, name: str, version: str):
        v = (name, version)
        self.queue_wait = TallyHistogram(QUEUE_WAIT_SECONDS.labels(*v))
        self.batch_assembly = TallyHistogram(BATCH_ASSEMBLY_SECONDS.labels(*v))
        self.batch_hold = TallyHistogram(BATCH_HOLD_SECONDS.labels(*v))
        self.model_seconds = TallyHistogram(MODEL_SECONDS.labels(*v))
        self.batch_rows = TallyHistogram(BATCH_ROWS.labels(*v))
        self.queue_rows = TallyGauge(QUEUE_ROWS.labels(*v))
        self.rows_model, self.rows_cache = ROWS.labels("model", *v), ROWS.labels("cache", *v)
        self.rows_shared = ROWS.labels("shared_cache", *v)
        self.cache_evictions = CACHE_EVICTIONS.labels(*v)
        self.cache_errors = CACHE_ERRORS.labels("local", *v)
        self.shared_errors = CACHE_ERRORS.labels("shared", *v)
        self.cache_corrupt, self.cache_bytes = CACHE_CORRUPT.labels(*v), CACHE_BYTES.labels(*v)
        self.checks = {True: BATCH_CHECKS.labels("changed", *v),
                       False: BATCH_CHECKS.labels("same", *v)}
        self.batch_difference = BATCH_DIFFERENCE.labels(*v)
        self.load_seconds = MODEL_LOAD_SECONDS.labels(*v)


CONNECTIONS_REFUSED = Counter("gpserve_connections_refused",
                              "Connections or requests a front's guards cut short, by reason "
                              "(header_timeout, header_too_large, request_line_too_long, "
                              "transfer_coding, malformed_http, body_timeout, "
                              "connection_limit, memory_held_by_slow_bodies)",
                              ["reason"])
RESTARTS = Counter("gpserve_process_restarts", "Child processes restarted, by role", ["role"])
WORKER_HANGS = Counter("gpserve_worker_hangs", "Workers killed and restarted because they "
                       "made no progress for --hang-timeout-s")
FRONT_HANGS = Counter("gpserve_front_hangs", "Fronts killed and restarted because their "
                      "event loop stopped turning for --hang-timeout-s (default 30 s)")


def exposition() -> tuple[bytes, str]:
    """The metrics of all processes, in Prometheus text format, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=os.environ[ENV])
    return generate_latest(registry), CONTENT_TYPE_LATEST


def request_seconds_buckets() -> dict[float, float]:
    """``gpserve_request_seconds``' requests per bucket (not cumulative), every process
    added up: {upper bound in seconds: requests} (the status page's latency)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector
    cumulative: dict[float, float] = {}
    collector = MultiProcessCollector(CollectorRegistry(), path=os.environ[ENV])
    for family in collector.collect():
        if family.name == "gpserve_request_seconds":
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    bound = float(sample.labels["le"])
                    cumulative[bound] = cumulative.get(bound, 0.0) + sample.value
    out, below = {}, 0.0
    for bound in sorted(cumulative):
        out[bound], below = cumulative[bound] - below, cumulative[bound]
    return out


def process_gone(pid: int) -> None:
    """Drop a dead process's live gauges (its counters and histograms stay counted)."""
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(pid, os.environ[ENV])
