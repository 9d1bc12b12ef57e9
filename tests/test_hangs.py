"""When a worker counts as hung, and when fronts route around it: the policy alone."""
import os

import pytest

from gpserve.counters import Counters
from gpserve.supervisor import hang_limit, stalled


def test_the_limit_is_the_flag_or_a_multiple_of_the_slowest_batch_with_a_floor():
    assert hang_limit(3.0, 100.0) == 3.0
    assert hang_limit(0, 0.002) == 5.0              # a fast model: the floor
    assert hang_limit(0, 2.0) == 20.0               # a slow one: 10x its slowest batch


def test_stalled_reads_the_heartbeat_and_the_running_batch():
    assert stalled(100.0, 99.5, 0, 5) is None
    assert stalled(100.0, 0, 0, 5) is None                         # never beat: loading
    assert "event loop has not turned for 6.0 s" in stalled(100.0, 94.0, 0, 5)
    assert stalled(100.0, 99.9, 97.0, 5) is None                   # a batch, within limit
    assert "a batch has been running for 7.0 s" in stalled(100.0, 99.9, 93.0, 5)


@pytest.fixture
def counters():
    path = f"/dev/shm/gpserve-test-{os.getpid()}-hang-counters"
    c = Counters(path, create=True)
    yield c
    os.unlink(path)


def test_progress_fields_and_a_restart_clearing_them(counters):
    counters.worker_beat(1, 50.0)
    counters.worker_busy(1, 49.5)
    counters.worker_busy(1, None, 0.25)
    counters.worker_busy(1, None, 0.1)                            # the slowest is kept
    assert counters.worker_progress(1) == (50.0, 0.0, 0.25)
    assert counters.worker_is_fresh(1, 50.5, 1.0)
    assert not counters.worker_is_fresh(1, 51.5, 1.0)
    assert counters.worker_is_fresh(0, 51.5, 1.0)                 # never beat: not judged
    counters.worker_busy(1, 60.0)
    counters.set_pid("worker", 1, 1234)                           # restarted
    assert counters.worker_progress(1) == (0.0, 0.0, 0.25)
