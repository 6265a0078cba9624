"""BlockPool on its own: allocation order, reference counts, the hash index and LRU eviction."""

from collections import deque

import pytest

from framework.resources.block_pool import BlockPool, NoFreeBlocksError


def test_new_pool_has_every_block_free_in_id_order():
    pool = BlockPool(4)
    assert pool.num_blocks == 4
    assert pool.free == deque([0, 1, 2, 3])
    assert list(pool.evictable) == []
    assert pool.ref_counts == [0, 0, 0, 0]
    assert pool.block_hash == [None] * 4
    assert pool.cached == {}
    assert pool.num_free_blocks == 4


@pytest.mark.parametrize("num_blocks", [0, -1])
def test_pool_needs_at_least_one_block(num_blocks):
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(num_blocks)


def test_allocate_takes_lowest_ids_first_with_one_reference():
    pool = BlockPool(4)
    assert [pool.allocate() for _ in range(3)] == [0, 1, 2]
    assert pool.ref_counts == [1, 1, 1, 0]
    assert pool.free == deque([3])
    assert pool.num_free_blocks == 1


def test_released_uncached_blocks_go_to_the_back_of_the_free_queue():
    pool = BlockPool(4)
    for _ in range(3):
        pool.allocate()
    pool.release(1)
    pool.release(0)
    assert pool.free == deque([3, 1, 0])
    assert list(pool.evictable) == []
    assert pool.ref_counts == [0, 0, 1, 0]
    # never-used blocks first, then in release order
    assert [pool.allocate() for _ in range(3)] == [3, 1, 0]


def test_allocate_from_an_exhausted_pool_raises():
    pool = BlockPool(2)
    pool.allocate()
    pool.allocate()
    assert pool.num_free_blocks == 0
    with pytest.raises(NoFreeBlocksError):
        pool.allocate()
    assert pool.ref_counts == [1, 1]


def test_committed_block_is_found_by_hash_and_becomes_evictable_when_released():
    pool = BlockPool(3)
    block = pool.allocate()
    pool.commit(block, 111)
    assert pool.lookup(111) == 0
    assert pool.lookup(222) is None
    assert pool.block_hash[0] == 111
    pool.release(block)
    assert pool.ref_counts[0] == 0
    assert list(pool.evictable) == [0]
    assert pool.free == deque([1, 2])
    assert pool.num_free_blocks == 3  # cached-but-unreferenced blocks count as free
    assert pool.lookup(111) == 0  # still reusable


def test_acquire_takes_a_cached_block_out_of_the_evictable_set():
    pool = BlockPool(3)
    block = pool.allocate()
    pool.commit(block, 111)
    pool.release(block)
    pool.acquire(0)
    assert pool.ref_counts[0] == 1
    assert list(pool.evictable) == []
    assert pool.num_free_blocks == 2
    pool.acquire(0)  # a second sharer
    assert pool.ref_counts[0] == 2
    pool.release(0)
    assert pool.ref_counts[0] == 1
    assert list(pool.evictable) == []  # still referenced
    pool.release(0)
    assert list(pool.evictable) == [0]


def test_eviction_only_after_free_blocks_run_out_least_recently_released_first():
    pool = BlockPool(4)
    blocks = [pool.allocate() for _ in range(4)]
    for b, h in zip(blocks[:3], (10, 11, 12)):
        pool.commit(b, h)
    # release order 2, 0, 1 (cached) and 3 (uncached)
    for b in (2, 0, 1, 3):
        pool.release(b)
    assert pool.free == deque([3])
    assert list(pool.evictable) == [2, 0, 1]

    assert pool.allocate() == 3  # the free block before any cached one
    assert pool.cached == {10: 0, 11: 1, 12: 2}
    assert pool.allocate() == 2  # least recently released cached block
    assert pool.lookup(12) is None  # its hash is dropped
    assert pool.block_hash[2] is None
    assert pool.cached == {10: 0, 11: 1}
    assert list(pool.evictable) == [0, 1]
    assert pool.allocate() == 0
    assert pool.allocate() == 1
    assert pool.cached == {}
    assert pool.ref_counts == [1, 1, 1, 1]


def test_reacquired_block_moves_to_the_most_recent_end_of_the_lru():
    pool = BlockPool(2)
    a, b = pool.allocate(), pool.allocate()
    pool.commit(a, 10)
    pool.commit(b, 11)
    pool.release(a)
    pool.release(b)
    assert list(pool.evictable) == [0, 1]
    pool.acquire(0)
    pool.release(0)
    assert list(pool.evictable) == [1, 0]
    assert pool.allocate() == 1
    assert pool.lookup(11) is None
    assert pool.lookup(10) == 0


def test_committing_a_duplicate_hash_keeps_the_second_block_private():
    pool = BlockPool(3)
    first, second = pool.allocate(), pool.allocate()
    pool.commit(first, 10)
    pool.commit(second, 10)
    assert pool.lookup(10) == first
    assert pool.block_hash[second] is None
    pool.release(second)
    assert pool.free == deque([2, 1])  # freed as plain block, not cached
    assert list(pool.evictable) == []
    pool.release(first)
    assert list(pool.evictable) == [0]


def test_commit_never_rehashes_a_cached_block():
    pool = BlockPool(2)
    block = pool.allocate()
    pool.commit(block, 10)
    pool.commit(block, 20)
    assert pool.block_hash[block] == 10
    assert pool.cached == {10: 0}


def test_releasing_more_often_than_acquired_is_caught():
    pool = BlockPool(2)
    block = pool.allocate()
    pool.release(block)
    with pytest.raises(AssertionError, match="released more often"):
        pool.release(block)


def test_forget_cached_turns_evictable_blocks_into_free_ones():
    from framework.resources.block_pool import BlockPool

    pool = BlockPool(4)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    pool.commit(a, "ka")
    pool.commit(b, "kb")
    pool.release(a)
    pool.release(c)
    assert list(pool.evictable) == [a] and list(pool.free) == [3, c]
    assert pool.forget_cached() == 1
    assert list(pool.free) == [3, c, a] and not pool.evictable
    assert pool.lookup("ka") is None and pool.lookup("kb") == b  # a held block keeps its content


def _pool_with_cached_blocks() -> BlockPool:
    """6 blocks: 0-1 free, 2-4 cached and unreferenced (released 4, 2, 3), 5 in use."""
    pool = BlockPool(6)
    blocks = [pool.allocate() for _ in range(6)]
    for block in (2, 3, 4):
        pool.commit(block, ("key", block))
    for block in (4, 2, 3, 0, 1):
        pool.release(block)
    assert blocks == list(range(6)) and pool.num_free_blocks == 5
    return pool


def test_allocate_many_gives_what_as_many_allocate_calls_give():
    one_by_one, at_once = _pool_with_cached_blocks(), _pool_with_cached_blocks()
    expected = [one_by_one.allocate() for _ in range(4)]
    assert at_once.allocate_many(4) == expected == [0, 1, 4, 2]  # free first, then the least recently released
    assert (at_once.ref_counts, at_once.block_hash, at_once.cached, list(at_once.free), list(at_once.evictable)) == (
        one_by_one.ref_counts, one_by_one.block_hash, one_by_one.cached, list(one_by_one.free), list(one_by_one.evictable)
    )
    assert at_once.allocate_many(0) == []


def test_allocate_many_beyond_the_free_blocks_raises_and_takes_none():
    pool = _pool_with_cached_blocks()
    with pytest.raises(NoFreeBlocksError, match="6 KV blocks asked for, 5 free"):
        pool.allocate_many(6)
    assert pool.num_free_blocks == 5 and pool.ref_counts == [0, 0, 0, 0, 0, 1]
