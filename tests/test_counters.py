"""The shared counters' statistics (Triton's extension): each process writes its own
block, a reader adds them up; driven in-process on a real segment."""
import os

import pytest

from gpserve.counters import BATCH_STAT_SIZES, Counters


@pytest.fixture
def counters(tmp_path):
    path = f"/dev/shm/gpserve-{os.getpid()}-test-counters"
    c = Counters(path, create=True)
    yield c
    os.unlink(path)


def test_statistics_add_up_every_front_and_worker(counters):
    counters.front_inference(0, True, 1_000, now_ms=5)
    counters.front_inference(1, False, 500, now_ms=7)
    counters.front_inference(1, True, 2_000, now_ms=9)          # the latest of all
    counters.front_cache(0, True, 30)
    counters.front_cache(1, False, 70)
    # worker 0: a batch of 3 requests, 5 rows, run at 8; worker 1: one of 1 row at 1,
    # one of 2 at 8, one of 300 (past the table), one of 2 not run as one (no times)
    counters.worker_batch(0, requests=3, rows=5, size_run=8, waited_ns=100,
                          times=(10, 20, 30))
    counters.worker_batch(1, requests=1, rows=1, size_run=1, waited_ns=300, times=(1, 2, 3))
    counters.worker_batch(1, requests=2, rows=2, size_run=8, waited_ns=0, times=(4, 5, 6))
    counters.worker_batch(1, requests=1, rows=300, size_run=BATCH_STAT_SIZES + 1,
                          waited_ns=0, times=(1, 1, 1))
    counters.worker_batch(1, requests=2, rows=2, size_run=2, waited_ns=0, times=None)
    s = counters.statistics()
    assert s["batches"] == {1: (1, 1, 2, 3), 8: (2, 14, 25, 36)}
    assert {k: v for k, v in s.items() if k != "batches"} == {
        "success_count": 2, "success_ns": 3_000, "fail_count": 1, "fail_ns": 500,
        "cache_hit_count": 1, "cache_hit_ns": 30, "cache_miss_count": 1,
        "cache_miss_ns": 70, "last_inference_ms": 9,
        "inferences": 308, "executions": 4, "queue_count": 9, "queue_ns": 400,
        # each request counted with its batch's durations
        "compute_count": 7, "compute_input_ns": 3 * 10 + 1 + 2 * 4 + 1,
        "compute_infer_ns": 3 * 20 + 2 + 2 * 5 + 1, "compute_output_ns": 3 * 30 + 3 + 2 * 6 + 1}


def test_statistics_do_not_touch_the_other_counters(counters):
    counters.worker_batch(0, requests=1, rows=3, size_run=4, waited_ns=1, times=(1, 1, 1))
    counters.worker_batch(1, requests=2, rows=5, size_run=5, waited_ns=1, times=None)
    counters.front_inference(0, True, 1, now_ms=1)
    counters.worker_load(1, 7)
    snap = counters.snapshot()
    assert (snap["batches"], snap["batched_rows"], snap["padded_rows"]) == (2, 8, 1)
    assert (snap["max_batch_rows"], snap["queued_rows"]) == (5, 7)
    assert snap["batch_size_histogram"] == {"4": 1, "5": 1}
    assert counters.queued_rows(1) == 7
    assert counters.errors() == {} and counters.cache_totals()["hits"] == 0
