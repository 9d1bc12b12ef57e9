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
    counters.worker_queued(0, 1, 100)
    counters.worker_queued(1, 1, 300)
    # worker 0: a batch of 3 requests, 5 rows, run at 8; worker 1: one of 1 row at 1
    counters.worker_executed(0, requests=3, rows=5, size=8, input_ns=10, infer_ns=20,
                             output_ns=30)
    counters.worker_executed(1, requests=1, rows=1, size=1, input_ns=1, infer_ns=2,
                             output_ns=3)
    counters.worker_executed(1, requests=2, rows=2, size=8, input_ns=4, infer_ns=5,
                             output_ns=6)
    counters.worker_executed(1, requests=1, rows=300, size=BATCH_STAT_SIZES + 1,
                             input_ns=1, infer_ns=1, output_ns=1)   # past the table
    s = counters.statistics()
    assert s["batches"] == {1: (1, 1, 2, 3), 8: (2, 14, 25, 36)}
    assert {k: v for k, v in s.items() if k != "batches"} == {
        "success_count": 2, "success_ns": 3_000, "fail_count": 1, "fail_ns": 500,
        "cache_hit_count": 1, "cache_hit_ns": 30, "cache_miss_count": 1,
        "cache_miss_ns": 70, "last_inference_ms": 9,
        "inferences": 308, "executions": 4, "queue_count": 2, "queue_ns": 400,
        # each request counted with its batch's durations
        "compute_count": 7, "compute_input_ns": 3 * 10 + 1 + 2 * 4 + 1,
        "compute_infer_ns": 3 * 20 + 2 + 2 * 5 + 1, "compute_output_ns": 3 * 30 + 3 + 2 * 6 + 1}


def test_statistics_do_not_touch_the_other_counters(counters):
    counters.add_batch(0, rows=3, size_run=4)
    counters.worker_executed(0, requests=1, rows=3, size=4, input_ns=1, infer_ns=1,
                             output_ns=1)
    counters.front_inference(0, True, 1, now_ms=1)
    snap = counters.snapshot()
    assert (snap["batches"], snap["batched_rows"], snap["padded_rows"]) == (1, 3, 1)
    assert snap["batch_size_histogram"] == {"4": 1}
    assert counters.errors() == {} and counters.cache_totals()["hits"] == 0
