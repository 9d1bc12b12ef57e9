"""Prometheus metrics, aggregated across every process of a server.

prometheus-client's multiprocess mode: the supervisor points ``PROMETHEUS_MULTIPROC_DIR``
at a folder of this run (``/dev/shm/gpserve-<pid>-metrics``, removed with the run's other
segments) before it starts any child; each process records into its own files there, and
``GET /metrics`` on any front adds them up. Import this module only after that.

Each record is a write to a memory-mapped file (about a microsecond): cheap enough
for the request path, and the same in every process.
"""
from __future__ import annotations

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

REQUESTS = Counter("gpserve_requests", "Requests answered, by HTTP status and kind",
                   ["status", "kind"])
REQUEST_SECONDS = Histogram("gpserve_request_seconds",
                            "End-to-end time in a front, from the first body byte to the "
                            "response handed to the server", buckets=_TIME)
QUEUE_WAIT_SECONDS = Histogram("gpserve_queue_wait_seconds",
                               "Time a request waited in a worker's queue before its batch ran",
                               buckets=_TIME)
BATCH_ASSEMBLY_SECONDS = Histogram("gpserve_batch_assembly_seconds",
                                   "Worker time gathering a batch's rows into model inputs",
                                   buckets=_TIME)
MODEL_SECONDS = Histogram("gpserve_model_seconds", "Worker time in the model runtime per batch",
                          buckets=_TIME)
RESPONSE_BUILD_SECONDS = Histogram("gpserve_response_build_seconds",
                                   "Front time encoding the response", buckets=_TIME)
BATCH_ROWS = Histogram("gpserve_batch_rows", "Rows per batch a worker ran",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
QUEUE_ROWS = Gauge("gpserve_queue_rows", "Rows waiting in a worker's queue",
                   multiprocess_mode="livemax")
ROWS = Counter("gpserve_rows", "Rows answered, by where they came from (cache or model)",
               ["source"])
CACHE_EVICTIONS = Counter("gpserve_cache_evictions",
                          "Rows evicted from the row cache (its old generation cleared)")
CACHE_ERRORS = Counter("gpserve_cache_errors",
                       "Row-cache failures (writes dropped, or the cache disabled)")
CACHE_BYTES = Gauge("gpserve_cache_bytes", "Bytes the row cache holds",
                    multiprocess_mode="livemax")
BATCH_CHECKS = Counter("gpserve_batch_checks",
                       "Requests of merged batches re-run alone to see whether batching "
                       "changes answers, by result (same or changed)", ["result"])
BATCH_DIFFERENCE = Gauge("gpserve_batch_difference",
                         "Largest difference seen between a row run in a batch and alone "
                         "(the load probe and live checks)", multiprocess_mode="max")
CONNECTIONS_REFUSED = Counter("gpserve_connections_refused",
                              "Connections or requests a front's guards cut short, by reason "
                              "(header_timeout, body_timeout, connection_limit, "
                              "memory_held_by_slow_bodies)", ["reason"])
RESTARTS = Counter("gpserve_process_restarts", "Child processes restarted, by role", ["role"])
MODEL_LOAD_SECONDS = Gauge("gpserve_model_load_seconds", "Time a worker took to load the model",
                           multiprocess_mode="max")


def exposition() -> tuple[bytes, str]:
    """The metrics of all processes, in Prometheus text format, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=os.environ[ENV])
    return generate_latest(registry), CONTENT_TYPE_LATEST


def process_gone(pid: int) -> None:
    """Drop a dead process's live gauges (its counters and histograms stay counted)."""
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(pid, os.environ[ENV])
