"""The arena's first-fit allocator, in process on a real /dev/shm segment: regions as
values that release themselves, alignment, exact fits, merging, reuse at low offsets,
a full arena, and a double free refused."""
import logging
import os

import numpy as np
import pytest

from gpserve.shm import ALIGN, Arena, Segments, code_of

SIZE = 64 * ALIGN


@pytest.fixture
def arena():
    a = Arena(f"/dev/shm/gpserve-test-{os.getpid()}-arena", SIZE)
    yield a
    a.close()


def free_list(a: Arena) -> list[tuple[int, int]]:
    return list(zip(a._free_starts, a._free_sizes))


def test_regions_are_aligned_first_fit_and_whole_blocks(arena):
    regions = [arena.alloc(n) for n in (1, ALIGN, ALIGN + 1, 0)]
    assert [r.offset for r in regions] == [0, ALIGN, 2 * ALIGN, 4 * ALIGN]   # ALIGN+1: 2
    assert [r.nbytes for r in regions] == [1, ALIGN, ALIGN + 1, 0]
    assert arena.used == 5 * ALIGN
    assert free_list(arena) == [(5 * ALIGN, SIZE - 5 * ALIGN)]
    for r in regions:
        r.release()
    assert free_list(arena) == [(0, SIZE)] and arena.used == 0


def test_a_region_is_shared_memory_another_process_maps_by_its_ref(arena):
    region = arena.alloc(6 * 4)
    region.array(np.float32, (2, 3))[:] = [[1, 2, 3], [4, 5, 6]]
    ref = region.ref(code_of(np.dtype(np.float32)), (2, 3))
    seen = Segments().view(ref)                   # a fresh mapping, as a worker's
    assert seen.tolist() == [[1, 2, 3], [4, 5, 6]] and not seen.flags.writeable
    ref, placed = arena.put(np.arange(4, dtype=np.int64))
    assert placed.offset == ALIGN and Segments().view(ref).tolist() == [0, 1, 2, 3]


def test_freed_neighbours_merge_and_low_offsets_are_reused(arena):
    a, b, c = (arena.alloc(4 * ALIGN) for _ in range(3))
    a.release()
    c.release()                                   # merges with the free space after it
    assert free_list(arena) == [(0, 4 * ALIGN), (c.offset, SIZE - c.offset)]
    d = arena.alloc(2 * ALIGN)
    assert d.offset == 0                          # first fit: the hole at the start
    d.release()
    b.release()                                   # joins both sides: one free region
    assert free_list(arena) == [(0, SIZE)] and arena.used == 0


def test_fragmented_space_that_no_hole_fits_is_full(arena):
    regions = [arena.alloc(2 * ALIGN) for _ in range(32)]    # the whole arena
    assert arena.alloc(1) is None
    for r in regions[::2]:                        # every other one: 16 holes of 2 blocks
        r.release()
    assert arena.used == SIZE // 2
    assert arena.alloc(3 * ALIGN) is None         # half free, no hole of 3 blocks
    assert arena.alloc(2 * ALIGN).offset == 0
    assert arena.put(np.zeros(3 * ALIGN, np.uint8)) is None


def test_a_double_free_is_refused_and_the_free_list_stays_whole(arena, caplog):
    a = arena.alloc(ALIGN)
    b = arena.alloc(ALIGN)
    a.release()
    before, used = free_list(arena), arena.used
    with caplog.at_level(logging.ERROR, "gpserve.shm"):
        a.release()                               # again
        arena.release(b.offset + ALIGN, ALIGN)    # never allocated (free space)
        arena.release(SIZE, ALIGN)                # past the end
        arena.release(b.offset + 1, ALIGN)        # not a region's start
    assert free_list(arena) == before and arena.used == used
    assert caplog.text.count("not an allocated region") == 4
    assert arena.alloc(ALIGN).offset == a.offset
    assert arena.alloc(ALIGN).offset == 2 * ALIGN  # never b twice
