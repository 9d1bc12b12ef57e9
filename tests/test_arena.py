"""The arena's first-fit allocator, in process on a real /dev/shm segment: alignment,
exact fits, merging, reuse at low offsets, a full arena, and a double free refused."""
import logging
import os

import pytest

from gpserve.shm import ALIGN, Arena

SIZE = 64 * ALIGN


@pytest.fixture
def arena():
    a = Arena(f"/dev/shm/gpserve-test-{os.getpid()}-arena", SIZE)
    yield a
    a.close()


def free_list(a: Arena) -> list[tuple[int, int]]:
    return list(zip(a._free_starts, a._free_sizes))


def test_regions_are_aligned_first_fit_and_whole_blocks(arena):
    offsets = [arena.alloc(n) for n in (1, ALIGN, ALIGN + 1, 0)]
    assert offsets == [0, ALIGN, 2 * ALIGN, 4 * ALIGN]        # ALIGN + 1 takes two blocks
    assert arena.used == 5 * ALIGN
    assert free_list(arena) == [(5 * ALIGN, SIZE - 5 * ALIGN)]


def test_freed_neighbours_merge_and_low_offsets_are_reused(arena):
    a, b, c = (arena.alloc(4 * ALIGN) for _ in range(3))
    arena.release(a, 4 * ALIGN)
    arena.release(c, 4 * ALIGN)                   # merges with the free space after it
    assert free_list(arena) == [(0, 4 * ALIGN), (c, SIZE - c)]
    assert arena.alloc(2 * ALIGN) == 0            # first fit: the hole at the start
    arena.release(0, 2 * ALIGN)
    arena.release(b, 4 * ALIGN)                   # joins both sides: one free region
    assert free_list(arena) == [(0, SIZE)] and arena.used == 0


def test_fragmented_space_that_no_hole_fits_is_full(arena):
    regions = [arena.alloc(2 * ALIGN) for _ in range(32)]    # the whole arena
    assert arena.alloc(1) is None
    for offset in regions[::2]:                   # every other one: 16 holes of 2 blocks
        arena.release(offset, 2 * ALIGN)
    assert arena.used == SIZE // 2
    assert arena.alloc(3 * ALIGN) is None         # half free, no hole of 3 blocks
    assert arena.alloc(2 * ALIGN) == 0


def test_a_double_free_is_refused_and_the_free_list_stays_whole(arena, caplog):
    a = arena.alloc(ALIGN)
    b = arena.alloc(ALIGN)
    arena.release(a, ALIGN)
    before, used = free_list(arena), arena.used
    with caplog.at_level(logging.ERROR, "gpserve.shm"):
        arena.release(a, ALIGN)                   # again
        arena.release(b + ALIGN, ALIGN)           # never allocated (free space)
        arena.release(SIZE, ALIGN)                # past the end
        arena.release(b + 1, ALIGN)               # not a region's start
    assert free_list(arena) == before and arena.used == used
    assert caplog.text.count("not an allocated region") == 4
    assert arena.alloc(ALIGN) == a and arena.alloc(ALIGN) == 2 * ALIGN   # never b twice
