"""The row cache's store, in-process on a real LMDB environment: a bounded cache stays
bounded and keeps caching, indefinitely; a failed write is counted and the writer goes on."""
import os

import numpy as np
import pytest
from gpserve.cache.store import RowCache

from gpserve.counters import Counters

ROW_BYTES = 4096 * 4                       # one float32 [4096] output row: 16 KiB


@pytest.fixture
def counters(tmp_path):
    path = f"/dev/shm/gpserve-test-{os.getpid()}-counters"
    c = Counters(path, create=True)
    yield c
    os.unlink(path)


def fill(cache: RowCache, start: int, count: int) -> list[bytes]:
    keys = [i.to_bytes(32, "little") for i in range(start, start + count)]
    rows = np.arange(start, start + count, dtype=np.float32)[:, None].repeat(4096, 1)
    cache.store(keys, ["y"], [rows])
    return keys


def totals(counters) -> dict:
    return counters.cache_totals()


def test_a_full_cache_keeps_caching_and_stays_bounded(tmp_path, counters):
    """60 MiB of rows through a 2 MiB cache: generations rotate; the newest rows are
    always found; the file never passes the bound; nothing fails."""
    cache = RowCache(tmp_path / "env", 2, counters, 0)
    written = 0
    for _ in range(480):                          # 8 rows (128 KiB) at a time
        keys = fill(cache, written, 8)
        written += 8
        assert cache.flush()
        found = cache.lookup(keys, ["y"])
        assert all(f is not None for f in found), f"newest rows missing after {written}"
        assert float(found[-1][0][0]) == written - 1
    t = totals(counters)
    assert t["errors"] == 0 and cache.last_error == ""
    assert t["writes"] >= written
    assert t["rotations"] >= 20                       # it rotated all along, not once
    stats = cache.stats()
    assert stats["file_bytes"] <= 2 << 20
    assert 0 < stats["entries"] <= 2 * (2 << 20) * 0.4 / ROW_BYTES + 16
    # every row is held or was evicted (a row copied forward from the old generation
    # may be counted in both)
    assert t["evictions"] >= written - stats["entries"]


def test_a_value_larger_than_the_whole_cache_is_counted_and_the_writer_goes_on(
        tmp_path, counters):
    cache = RowCache(tmp_path / "env", 1, counters, 0)
    huge = np.zeros((1, 2 << 20), np.float32)         # 8 MiB, in a 1 MiB cache
    cache.store([b"h" * 32], ["y"], [huge])
    assert cache.flush()
    assert totals(counters)["errors"] == 1
    assert "larger than --cache-size-mb 1" in cache.last_error
    keys = fill(cache, 0, 4)                          # the writer still writes
    assert cache.flush()
    assert all(f is not None for f in cache.lookup(keys, ["y"]))
    assert cache.stats()["last_error"] == cache.last_error


def test_the_current_generation_is_kept_in_one_place(tmp_path, counters):
    """The regression: the generation was read from one database and written to another,
    so generation 0 grew until the map was full and generation 1 stayed empty."""
    cache = RowCache(tmp_path / "env", 1, counters, 0)
    for start in range(0, 400, 8):
        fill(cache, start, 8)
    assert cache.flush()
    with cache.env.begin() as txn:
        sizes = [txn.stat(db)["entries"] for db in cache.gens]
    assert min(sizes) > 0 and totals(counters)["rotations"] >= 2
    assert totals(counters)["errors"] == 0


def test_writes_near_the_map_size_never_fail(tmp_path, counters):
    """Rows of 8 x 16 KiB (a tenth of a 1 MiB map each) written one after another: a
    rotation must leave room for the next write at once (LMDB reuses freed pages only
    from the transaction after next)."""
    cache = RowCache(tmp_path / "env", 1, counters, 0)
    for start in range(0, 8 * 200, 8):
        fill(cache, start, 8)
        assert cache.flush()
    assert totals(counters)["errors"] == 0, cache.last_error
    assert totals(counters)["rotations"] >= 10
