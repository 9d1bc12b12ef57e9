"""The row cache's store, in-process on a real LMDB environment: a bounded cache stays
bounded and keeps caching, indefinitely; a failed write is counted and the writer goes on."""
import os

import numpy as np
import pytest
from gpserve.cache import integrity
from gpserve.cache.admin import stats as store_stats
from gpserve.cache.store import RowCache

from gpserve.counters import Counters
from gpserve.testing import eventually

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


MARK = np.float32(1234.5678)                         # a value easy to find in the file


def damage_value(env_dir, row_bytes: bytes) -> int:
    """Change one byte inside every stored copy of ``row_bytes`` in data.mdb (what a
    damaged page does); how many copies were changed."""
    data = env_dir / "data.mdb"
    raw = bytearray(data.read_bytes())
    count, at = 0, raw.find(row_bytes)
    while at >= 0:
        raw[at + 5] ^= 0x40
        count += 1
        at = raw.find(row_bytes, at + 1)
    data.write_bytes(bytes(raw))                     # same size: only those bytes change
    return count


def test_a_row_whose_bytes_changed_on_disk_is_a_miss_never_a_wrong_answer(tmp_path, counters):
    cache = RowCache(tmp_path / "env", 4, counters, 0)
    keys = [b"k" * 32, b"j" * 32]
    rows = np.full((2, 64), MARK, np.float32)
    rows[1] = 7
    cache.store(keys, ["y"], [rows])
    assert cache.flush()
    assert damage_value(tmp_path / "env", rows[0].tobytes()) == 1
    found = cache.lookup(keys, ["y"])
    assert found[0] is None                                        # not the damaged row
    np.testing.assert_array_equal(found[1][0], rows[1])           # its neighbour is intact
    t = totals(counters)
    assert (t["corrupt"], t["hits"], t["misses"]) == (1, 1, 1)
    cache.store(keys[:1], ["y"], [rows[:1]])                       # computed again: rewritten
    assert cache.flush()
    np.testing.assert_array_equal(cache.lookup(keys[:1], ["y"])[0][0], rows[0])


def test_integrity_reads_lmdb_meta_pages(tmp_path, counters):
    env_dir = tmp_path / "env"
    assert integrity.damage(env_dir) is None                       # nothing there yet
    cache = RowCache(env_dir, 4, counters, 0)
    fill(cache, 0, 64)                                             # 1 MiB of rows
    assert cache.flush()
    assert integrity.damage(env_dir) is None
    data = env_dir / "data.mdb"
    size = data.stat().st_size
    os.truncate(data, size // 2)
    assert "cut short" in integrity.damage(env_dir)
    os.truncate(data, 8192)                                        # the meta pages alone
    assert "cut short" in integrity.damage(env_dir)
    data.write_bytes(os.urandom(8192))
    assert "not an LMDB data file" in integrity.damage(env_dir)


@pytest.mark.parametrize("how", ["half", "meta pages only", "not lmdb"])
def test_a_damaged_file_is_moved_aside_and_a_fresh_cache_opened(tmp_path, counters, how):
    env_dir = tmp_path / "env"
    first = RowCache(env_dir, 4, counters, 0)
    keys = fill(first, 0, 64)
    assert first.flush()
    first.env.close()
    data = env_dir / "data.mdb"
    if how == "not lmdb":
        data.write_bytes(os.urandom(3 * 4096))
    else:
        os.truncate(data, data.stat().st_size // 2 if how == "half" else 8192)
    cache = RowCache(env_dir, 4, counters, 0)                      # no SIGBUS: checked first
    assert cache.enabled
    aside = sorted(tmp_path.glob("env.damaged-*"))
    assert len(aside) == 1 and (aside[0] / "data.mdb").exists()    # kept, not deleted
    assert cache.lookup(keys, ["y"]) == [None] * len(keys)         # a fresh, empty cache
    fill(cache, 0, 4)
    assert cache.flush() and all(f is not None for f in cache.lookup(keys[:4], ["y"]))
    assert "damaged" in store_stats(aside[0])                      # `gpserve cache stats`


def test_a_file_cut_short_while_serving_is_moved_aside_before_it_is_read(tmp_path, counters):
    env_dir = tmp_path / "env"
    cache = RowCache(env_dir, 4, counters, 0)
    keys = fill(cache, 0, 64)
    assert cache.flush()
    data = env_dir / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)                    # by someone else
    eventually(lambda: list(tmp_path.glob("env.damaged-*")), timeout=30,
               what="the writer to notice the file shrank")
    eventually(lambda: cache.enabled, what="a fresh cache")
    assert cache.lookup(keys, ["y"]) == [None] * len(keys)         # the fresh file, no fault
    fill(cache, 0, 4)
    assert cache.flush() and all(f is not None for f in cache.lookup(keys[:4], ["y"]))


def test_a_hit_in_the_old_generation_is_copied_forward_and_survives_the_next_rotation(
        tmp_path, counters):
    """The LRU approximation: a row read from the old generation is written to the
    current one, so the rotation that clears the old one keeps it."""
    cache = RowCache(tmp_path / "env", 4, counters, 0)
    keys = fill(cache, 0, 2)
    assert cache.flush()
    cache._rotate(clear_both=False)               # the rows are in the old generation now
    assert all(f is not None for f in cache.lookup(keys, ["y"]))        # found there ...
    assert cache.flush()                           # ... and copied forward
    cache._rotate(clear_both=False)                # the old generation (first copy) cleared
    found = cache.lookup(keys, ["y"])
    assert [float(f[0][0]) for f in found] == [0.0, 1.0]
