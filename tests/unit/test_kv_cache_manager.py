"""PagedKVCacheManager on CPU with tiny sizes (block_size=4), driven as the executor drives it:
exact block ids, reference counts, free / evictable order and eviction order after each call."""

from collections import deque

import types

import pytest
import torch

from framework.request import RequestState
from framework.resources.base import KVCacheStats
from framework.resources.paged_kv_cache import PagedKVCacheManager
from framework.sampling_params import SamplingParams
from framework.scheduler.base import Chunk
from framework.scheduler.micro_batch import FCFSMicroBatchScheduler


def tokens(start, end):
    return list(range(start, end))


# ---- sizing and the engine's view ----------------------------------------------------------------
def test_pool_size_from_max_tokens_rounds_up_to_whole_blocks(h):
    kv = h.kv(max_tokens=30, num_layers=2)
    assert kv.pool.num_blocks == 8
    assert kv.get_max_resource_count() == 8
    assert kv.num_free_blocks == 8
    caches = kv.get_kv_caches()
    assert len(caches) == 2
    for k, v in caches:
        assert k.shape == v.shape == (1, 8, 4, 2)
        assert k.dtype == v.dtype == torch.float32
        assert k.data_ptr() != v.data_ptr()
        assert not k.any() and not v.any()


def test_pool_size_from_memory_fraction(h, monkeypatch):
    import framework.resources.paged_kv_cache as paged

    monkeypatch.setattr(paged, "device_memory", lambda device: 6400)
    # 2 (K and V) * 1 layer * 1 head * 2 dims * 4 bytes = 16 bytes per token, 64 per block
    kv = PagedKVCacheManager(h.kv_config(max_tokens=None, memory_fraction=0.5), None, h.kv_spec())
    assert kv.pool.num_blocks == 50


def test_invalid_sizes_raise(h):
    with pytest.raises(ValueError, match="block_size"):
        PagedKVCacheManager(h.kv_config(block_size=0), None, h.kv_spec())
    with pytest.raises(ValueError, match="at least one block"):
        PagedKVCacheManager(h.kv_config(max_tokens=None, memory_fraction=0.0), None, h.kv_spec())


def test_initial_stats(h):
    kv = h.kv()
    stats = kv.stats()
    assert stats == KVCacheStats(8, 8, 0, 0, 0, 0)
    assert stats.prefix_hit_rate == 0.0
    assert stats.usage == 0.0


# ---- allocation ----------------------------------------------------------------------------------
def test_allocation_order_commit_of_full_blocks_and_decode_growth(h):
    kv = h.kv(max_tokens=32)
    a = h.request("a", tokens(1, 11), max_tokens=8)  # 10 tokens: 2 full blocks + 2 tokens

    scheduled = h.prepare(kv, {a: 10})
    assert a.state is RequestState.CONTEXT
    assert kv.get_block_table(a) == [0, 1, 2]
    assert kv.pool.ref_counts == [1, 1, 1, 0, 0, 0, 0, 0]
    assert kv.pool.free == deque([3, 4, 5, 6, 7])
    assert a.num_scheduled_tokens == 10  # nothing cached: the chunk is unchanged
    h.complete(kv, scheduled)
    assert a.num_computed_tokens == 10
    assert a.output_token_ids == [500]
    # only the full blocks are committed
    assert len(kv.block_hashes["a"]) == 2
    assert kv.pool.block_hash[0] is not None and kv.pool.block_hash[1] is not None
    assert kv.pool.block_hash[2] is None
    assert sorted(kv.pool.cached.values()) == [0, 1]

    h.step(kv, {a: 1})  # token 11 fits block 2
    assert kv.get_block_table(a) == [0, 1, 2]
    assert kv.pool.block_hash[2] is None
    h.step(kv, {a: 1})  # token 12 fills block 2, which is committed
    assert kv.get_block_table(a) == [0, 1, 2]
    assert kv.pool.block_hash[2] is not None
    assert len(kv.block_hashes["a"]) == 3
    h.step(kv, {a: 1})  # token 13 needs a fourth block
    assert kv.get_block_table(a) == [0, 1, 2, 3]
    assert kv.pool.ref_counts == [1, 1, 1, 1, 0, 0, 0, 0]
    assert kv.pool.free == deque([4, 5, 6, 7])
    assert a.num_computed_tokens == 13
    assert a.output_token_ids == [500, 501, 502, 503]

    h.finish(kv, a)
    assert kv.pool.free == deque([4, 5, 6, 7, 3])
    assert list(kv.pool.evictable) == [2, 1, 0]
    h.assert_pool_idle(kv)


def test_free_releases_tail_first_into_the_lru(h):
    kv = h.kv(max_tokens=32)
    a = h.request("a", tokens(1, 13))  # 12 tokens: 3 full blocks
    h.step(kv, {a: 12})
    h.step(kv, {a: 1})  # the sampled token goes into a fourth, partial block
    assert kv.get_block_table(a) == [0, 1, 2, 3]
    kv.free_resources(a)
    # the partial (uncached) block goes to the free queue, the cached ones tail first into the LRU
    assert kv.pool.free == deque([4, 5, 6, 7, 3])
    assert list(kv.pool.evictable) == [2, 1, 0]
    assert kv.stats() == KVCacheStats(
        num_blocks=8, num_free_blocks=8, num_used_blocks=0, num_cached_blocks=3,
        prefix_queried_tokens=12, prefix_hit_tokens=0,
    )
    h.assert_pool_idle(kv)


# ---- prefix reuse --------------------------------------------------------------------------------
def test_prefix_hit_shares_full_blocks(h):
    kv = h.kv(max_tokens=32)
    a = h.request("a", tokens(1, 11))  # 10 tokens
    h.step(kv, {a: 10})
    b = h.request("b", tokens(1, 9) + [50, 51, 52])  # shares a's two full blocks

    h.admit(kv, b)  # the hit is attached at admission, before any chunk is chosen
    assert b.state is RequestState.CONTEXT
    assert kv.get_block_table(b) == [0, 1]
    assert kv.pool.ref_counts == [2, 2, 1, 0, 0, 0, 0, 0]
    assert b.num_computed_tokens == 8
    assert b.num_missing_tokens == 3
    assert kv.block_hashes["b"] == kv.block_hashes["a"]
    assert kv.pool.free == deque([3, 4, 5, 6, 7])  # admission allocates nothing
    stats = kv.stats()
    assert stats == KVCacheStats(
        num_blocks=8, num_free_blocks=5, num_used_blocks=3, num_cached_blocks=0,
        prefix_queried_tokens=21, prefix_hit_tokens=8,
    )
    assert stats.prefix_hit_rate == pytest.approx(8 / 21)

    scheduled = h.prepare(kv, {b: 3})  # only the uncached tokens are scheduled
    assert kv.get_block_table(b) == [0, 1, 3]
    assert kv.pool.ref_counts == [2, 2, 1, 1, 0, 0, 0, 0]
    assert b.num_scheduled_tokens == 3
    stats = kv.stats()
    assert (stats.num_free_blocks, stats.num_used_blocks) == (4, 4)
    assert stats.usage == 0.5
    h.complete(kv, scheduled)
    assert b.num_computed_tokens == 11
    assert b.output_token_ids == [500]

    h.finish(kv, a)
    assert kv.pool.ref_counts == [1, 1, 0, 1, 0, 0, 0, 0]
    assert kv.pool.free == deque([4, 5, 6, 7, 2])
    assert list(kv.pool.evictable) == []
    h.finish(kv, b)
    assert kv.pool.free == deque([4, 5, 6, 7, 2, 3])
    assert list(kv.pool.evictable) == [1, 0]
    assert kv.stats().num_cached_blocks == 2
    h.assert_pool_idle(kv)


def test_a_hit_never_covers_the_last_prompt_token(h):
    kv = h.kv(max_tokens=32)
    a = h.request("a", tokens(1, 9))  # 8 tokens, exactly 2 full blocks
    h.step(kv, {a: 8})
    assert kv.get_block_table(a) == [0, 1]

    b = h.request("b", tokens(1, 9))  # the same prompt: its last token must still be computed
    h.admit(kv, b)
    assert kv.get_block_table(b) == [0]  # block 1 holds the last token: not taken
    assert b.num_computed_tokens == 4
    assert b.num_missing_tokens == 4
    scheduled = h.prepare(kv, {b: 4})
    assert kv.get_block_table(b) == [0, 2]
    assert kv.pool.ref_counts == [2, 1, 1, 0, 0, 0, 0, 0]
    h.complete(kv, scheduled)
    # b recomputed block 1's content into block 2; the cached copy stays a's block 1
    assert kv.pool.block_hash[2] is None
    assert sorted(kv.pool.cached.values()) == [0, 1]
    assert kv.block_hashes["b"] == kv.block_hashes["a"]

    c = h.request("c", tokens(1, 10))  # one token more: both blocks are hits
    h.admit(kv, c)
    assert kv.get_block_table(c) == [0, 1]
    assert c.num_computed_tokens == 8
    assert c.num_missing_tokens == 1
    h.prepare(kv, {c: 1})
    assert kv.get_block_table(c) == [0, 1, 3]
    assert kv.pool.ref_counts == [3, 2, 1, 1, 0, 0, 0, 0]
    h.complete(kv, [c])
    assert kv.stats().prefix_queried_tokens == 8 + 8 + 9
    assert kv.stats().prefix_hit_tokens == 4 + 8

    for r in (a, b, c):
        h.finish(kv, r)
    assert kv.pool.free == deque([4, 5, 6, 7, 2, 3])
    assert list(kv.pool.evictable) == [1, 0]
    h.assert_pool_idle(kv)


def test_a_partial_last_block_is_never_shared(h):
    kv = h.kv(max_tokens=32)
    a = h.request("a", tokens(1, 7))  # 6 tokens: block 1 holds 2
    h.step(kv, {a: 6})
    assert kv.get_block_table(a) == [0, 1]
    assert kv.pool.block_hash[1] is None

    b = h.request("b", tokens(1, 7) + [60, 61, 62])  # matches all of a's 6 tokens
    h.admit(kv, b)
    assert kv.get_block_table(b) == [0]  # a's partial block 1 has no key: only block 0 is a hit
    assert b.num_computed_tokens == 4
    h.prepare(kv, {b: 5})
    assert kv.get_block_table(b) == [0, 2, 3]
    assert kv.pool.ref_counts == [2, 1, 1, 1, 0, 0, 0, 0]
    h.complete(kv, [b])
    h.finish(kv, a)
    h.finish(kv, b)
    h.assert_pool_idle(kv)


def test_full_blocks_of_generated_tokens_are_reusable(h):
    kv = h.kv(max_tokens=32)
    a = h.request("a", tokens(1, 7))  # 6 tokens
    h.step(kv, {a: 6})
    h.step(kv, {a: 1})
    h.step(kv, {a: 1})  # block 1 = [5, 6, 500, 501] is now full and committed
    assert a.output_token_ids == [500, 501, 502]
    assert kv.pool.block_hash[1] is not None

    c = h.request("c", tokens(1, 7) + [500, 501, 502])
    h.admit(kv, c)
    assert kv.get_block_table(c) == [0, 1]  # block 1 ends with two of a's generated tokens
    assert c.num_computed_tokens == 8
    assert c.num_missing_tokens == 1
    h.prepare(kv, {c: 1})
    assert kv.get_block_table(c) == [0, 1, 2]
    assert kv.pool.ref_counts[:3] == [2, 2, 1]
    h.complete(kv, [c])
    h.finish(kv, a)
    h.finish(kv, c)
    h.assert_pool_idle(kv)


def test_prefix_caching_disabled_shares_nothing(h):
    kv = h.kv(max_tokens=32, enable_prefix_caching=False)
    a = h.request("a", tokens(1, 11))
    b = h.request("b", tokens(1, 11))
    h.step(kv, {a: 10})
    assert kv.pool.cached == {}
    assert kv.pool.block_hash == [None] * 8
    h.admit(kv, b)
    assert b.state is RequestState.CONTEXT
    assert "b" not in kv.block_tables  # admission attaches nothing
    assert b.num_computed_tokens == 0
    scheduled = h.prepare(kv, {b: 10})
    assert kv.get_block_table(b) == [3, 4, 5]
    assert b.num_computed_tokens == 0
    assert b.num_scheduled_tokens == 10
    assert kv.pool.ref_counts == [1, 1, 1, 1, 1, 1, 0, 0]
    h.complete(kv, scheduled)
    assert kv.pool.cached == {}
    assert kv.stats().prefix_queried_tokens == 0
    assert kv.stats().prefix_hit_tokens == 0

    h.finish(kv, a)
    h.finish(kv, b)
    assert kv.pool.free == deque([6, 7, 2, 1, 0, 5, 4, 3])
    assert list(kv.pool.evictable) == []
    h.assert_pool_idle(kv)


def test_identical_prompts_in_one_step_do_not_share(h):
    kv = h.kv(max_tokens=32)
    a = h.request("a", tokens(1, 10))  # 9 tokens
    b = h.request("b", tokens(1, 10))
    h.step(kv, {a: 9, b: 9})  # both admitted in one step: nothing is cached yet, neither hits
    assert kv.get_block_table(a) == [0, 1, 2]
    assert kv.get_block_table(b) == [3, 4, 5]
    # the first commit wins; b's identical blocks stay private
    assert sorted(kv.pool.cached.values()) == [0, 1]
    assert kv.pool.block_hash[3] is None and kv.pool.block_hash[4] is None
    h.finish(kv, b)
    assert kv.pool.free == deque([6, 7, 5, 4, 3])
    assert list(kv.pool.evictable) == []
    h.finish(kv, a)
    assert list(kv.pool.evictable) == [1, 0]

    assert kv.stats().prefix_hit_tokens == 0

    c = h.request("c", tokens(1, 10))
    h.admit(kv, c)
    assert kv.get_block_table(c) == [0, 1]  # a's blocks, the committed copies
    h.prepare(kv, {c: 1})
    assert kv.get_block_table(c) == [0, 1, 6]
    h.complete(kv, [c])
    assert kv.stats().prefix_hit_tokens == 8
    h.finish(kv, c)
    h.assert_pool_idle(kv)


def test_deferred_are_the_later_requests_whose_next_block_the_batch_computes(h):
    kv = h.kv(max_tokens=64)
    a = h.request("a", tokens(1, 10))  # blocks [1..4] [5..8] + 1 token
    b = h.request("b", tokens(1, 9) + [70, 71, 72])  # the same two full blocks, then its own
    c = h.request("c", [90] + tokens(2, 10))  # differs in its first block
    logprobs = h.request("p", tokens(1, 10))
    logprobs.sampling_params.prompt_logprobs = 1  # reuses nothing, so waiting would not help it
    h.admit(kv, a, b, c, logprobs)
    whole = {r: Chunk(r, r.num_missing_tokens) for r in (a, b, c, logprobs)}
    assert kv.defer([whole[a], whole[b], whole[c], whole[logprobs]]) == [b]
    assert kv.defer([whole[b], whole[a]]) == [a]  # the earlier one in the batch computes
    assert kv.defer([whole[a], whole[c]]) == []
    assert kv.defer([whole[a], Chunk(b, 3)]) == []  # not even one full block this step: nothing to compute twice
    assert kv.num_free_blocks == kv.pool.num_blocks  # a read-only query
    disabled = h.kv(max_tokens=64, enable_prefix_caching=False)
    assert disabled.defer([whole[a], whole[b]]) == []


def test_admission_takes_the_whole_cached_prefix_and_only_the_rest_is_scheduled(h):
    kv = h.kv(max_tokens=32)
    a = h.request("a", tokens(1, 13))  # 12 tokens, 3 full blocks
    h.step(kv, {a: 12})
    b = h.request("b", tokens(1, 13) + tokens(90, 98))  # 20 tokens: a's 3 blocks, then 8 of its own
    fcfs = FCFSMicroBatchScheduler(types.SimpleNamespace(max_batch_size=4, max_num_tokens=4), None)

    h.admit(kv, b)  # all three hits at once, whatever the token budget
    assert kv.get_block_table(b) == [0, 1, 2]
    assert b.num_computed_tokens == 12
    assert b.num_missing_tokens == 8
    assert kv.pool.ref_counts == [2, 2, 2, 0, 0, 0, 0, 0]
    assert kv.pool.free == deque([3, 4, 5, 6, 7])  # no allocation
    assert kv.stats().prefix_hit_tokens == 12

    for expected_table, samples in (([0, 1, 2, 3], []), ([0, 1, 2, 3, 4], [b])):
        plan = fcfs.schedule([b])  # the budget goes to uncached tokens only
        assert [(c.request.request_id, c.num_tokens) for c in plan] == [("b", 4)]
        scheduled = h.prepare(kv, {b: 4})
        assert kv.get_block_table(b) == expected_table
        assert h.complete(kv, scheduled) == samples
        assert b.num_computed_tokens == 4 * len(expected_table)
    assert b.state is RequestState.GENERATION
    assert b.output_token_ids == [500]
    assert kv.pool.block_hash[3] is not None and kv.pool.block_hash[4] is not None
    assert kv.pool.free == deque([5, 6, 7])
    assert kv.stats().prefix_queried_tokens == 12 + 20  # queried once per request, at its admission
    assert kv.stats().prefix_hit_tokens == 12

    h.finish(kv, a)
    assert kv.pool.ref_counts == [1, 1, 1, 1, 1, 0, 0, 0]
    h.finish(kv, b)
    assert list(kv.pool.evictable) == [4, 3, 2, 1, 0]
    assert kv.pool.free == deque([5, 6, 7])
    h.assert_pool_idle(kv)


def test_no_reuse_after_a_partial_block_of_its_own(h):
    kv = h.kv(max_tokens=32)
    a = h.request("a", tokens(1, 13))  # 12 tokens
    b = h.request("b", tokens(1, 13) + [90, 91, 92, 93])  # 16 tokens, a's prompt first

    h.step(kv, {a: 12, b: 6})  # admitted together: nothing cached yet, b computes a first chunk
    assert kv.get_block_table(a) == [0, 1, 2]
    assert kv.get_block_table(b) == [3, 4]
    assert sorted(kv.pool.cached.values()) == [0, 1, 2]
    assert kv.pool.block_hash[3] is None  # b's copy of a's block 0 stays private

    kv.admit(b)  # the executor re-admits catching-up requests each step: b's cursor (6) is mid-block
    h.prepare(kv, {b: 6})  # [6, 12): a's blocks 1 and 2 are cached now, but b has diverged into block 4
    assert kv.get_block_table(b) == [3, 4, 5]
    assert b.num_computed_tokens == 6
    assert kv.pool.ref_counts == [1, 1, 1, 1, 1, 1, 0, 0]
    h.complete(kv, [b])
    assert kv.pool.block_hash[4] is None and kv.pool.block_hash[5] is None  # duplicates stay private
    assert kv.block_hashes["b"] == kv.block_hashes["a"]  # same keys, a's blocks hold them

    h.prepare(kv, {b: 4})
    assert kv.get_block_table(b) == [3, 4, 5, 6]
    assert h.complete(kv, [b]) == [b]
    assert sorted(kv.pool.cached.values()) == [0, 1, 2, 6]  # b's own block chains on a's keys
    assert kv.stats().prefix_hit_tokens == 0
    assert kv.stats().prefix_queried_tokens == 12 + 16

    c = h.request("c", tokens(1, 13) + [90, 91, 92, 93, 99])  # 17 tokens
    h.admit(kv, c)
    assert kv.get_block_table(c) == [0, 1, 2, 6]  # a's three blocks, then b's fourth
    assert c.num_computed_tokens == 16
    assert kv.pool.ref_counts == [2, 2, 2, 1, 1, 1, 2, 0]
    h.step(kv, {c: 1})
    assert kv.get_block_table(c) == [0, 1, 2, 6, 7]
    assert kv.stats().prefix_hit_tokens == 16
    assert kv.stats().prefix_queried_tokens == 12 + 16 + 17

    h.finish(kv, a)
    h.finish(kv, b)
    assert kv.pool.free == deque([5, 4, 3])
    h.finish(kv, c)
    assert kv.pool.free == deque([5, 4, 3, 7])
    assert list(kv.pool.evictable) == [6, 2, 1, 0]
    h.assert_pool_idle(kv)


# ---- eviction ------------------------------------------------------------------------------------
def test_eviction_takes_free_blocks_first_then_lru_cached_blocks_and_drops_their_hash(h):
    kv = h.kv(max_tokens=48)  # 12 blocks
    a = h.request("a", tokens(1, 13))  # 12 tokens
    h.step(kv, {a: 12})
    h.step(kv, {a: 1})
    h.finish(kv, a)
    assert kv.pool.free == deque([4, 5, 6, 7, 8, 9, 10, 11, 3])
    assert list(kv.pool.evictable) == [2, 1, 0]

    c = h.request("c", tokens(100, 136))  # 9 blocks: exactly the free queue
    h.step(kv, {c: 36})
    assert kv.get_block_table(c) == [4, 5, 6, 7, 8, 9, 10, 11, 3]
    assert list(kv.pool.evictable) == [2, 1, 0]  # nothing evicted yet
    cached_before = dict(kv.pool.cached)

    e = h.request("e", tokens(200, 204))  # one block: evicts a's tail block 2
    h.admit(kv, e)
    assert "e" in kv.block_tables and kv.get_block_table(e) == []  # no hit
    h.prepare(kv, {e: 4})
    assert kv.get_block_table(e) == [2]
    assert list(kv.pool.evictable) == [1, 0]
    assert kv.pool.block_hash[2] is None
    assert 2 not in kv.pool.cached.values()
    assert len(kv.pool.cached) == len(cached_before) - 1
    h.complete(kv, [e])

    h.finish(kv, c)  # c's blocks, all cached, enter the LRU tail first
    assert list(kv.pool.evictable) == [1, 0, 3, 11, 10, 9, 8, 7, 6, 5, 4]

    d = h.request("d", tokens(1, 13) + [99])  # a's prompt: blocks 0 and 1 hit, block 2 is gone
    h.admit(kv, d)
    assert kv.get_block_table(d) == [0, 1]
    assert d.num_computed_tokens == 8
    assert list(kv.pool.evictable) == [3, 11, 10, 9, 8, 7, 6, 5, 4]  # the hits left the LRU
    h.prepare(kv, {d: 5})
    assert kv.get_block_table(d) == [0, 1, 3, 11]  # two evictions, least recently released first
    assert list(kv.pool.evictable) == [10, 9, 8, 7, 6, 5, 4]
    assert kv.pool.block_hash[3] is None and kv.pool.block_hash[11] is None
    h.complete(kv, [d])
    h.finish(kv, d)
    h.finish(kv, e)
    h.assert_pool_idle(kv)


def test_requests_admitted_in_one_step_keep_their_hits_from_the_step_s_allocations(h):
    kv = h.kv(max_tokens=32)
    a = h.request("a", tokens(1, 10))  # 9 tokens
    w = h.request("w", tokens(70, 79))  # 9 tokens
    h.step(kv, {a: 9})
    h.step(kv, {w: 9})
    assert kv.get_block_table(a) == [0, 1, 2]
    assert kv.get_block_table(w) == [3, 4, 5]
    h.finish(kv, a)
    h.finish(kv, w)
    assert kv.pool.free == deque([6, 7, 2, 5])
    assert list(kv.pool.evictable) == [1, 0, 4, 3]

    x = h.request("x", tokens(200, 220))  # 5 blocks: one more than the free queue holds
    y = h.request("y", tokens(1, 9) + [99])  # hits a's blocks 0 and 1, the head of the LRU
    h.admit(kv, x, y)  # x first, as the capacity scheduler lists them; both before any allocation
    assert kv.get_block_table(x) == []
    assert kv.get_block_table(y) == [0, 1]
    assert y.num_computed_tokens == 8
    assert list(kv.pool.evictable) == [4, 3]
    assert kv.num_free_blocks == 6

    h.prepare(kv, {x: 20, y: 1})  # x allocates first, yet evicts w's blocks, not y's hits
    assert kv.get_block_table(x) == [6, 7, 2, 5, 4]
    assert kv.get_block_table(y) == [0, 1, 3]
    assert kv.pool.ref_counts == [1] * 8
    assert kv.pool.free == deque()
    assert list(kv.pool.evictable) == []
    assert sorted(kv.pool.cached.values()) == [0, 1]
    assert kv.num_free_blocks == 0
    h.complete(kv, [x, y])
    h.finish(kv, x)
    h.finish(kv, y)
    h.assert_pool_idle(kv)


def test_two_requests_admitted_in_one_step_share_a_cached_prefix(h):
    kv = h.kv(max_tokens=32)
    a = h.request("a", tokens(1, 10))  # 9 tokens
    h.step(kv, {a: 9})
    h.finish(kv, a)
    assert kv.pool.free == deque([3, 4, 5, 6, 7, 2])
    assert list(kv.pool.evictable) == [1, 0]

    y = h.request("y", tokens(1, 9) + [98])
    z = h.request("z", tokens(1, 9) + [97, 96])
    h.admit(kv, y, z)
    assert kv.get_block_table(y) == kv.get_block_table(z) == [0, 1]
    assert kv.pool.ref_counts == [2, 2, 0, 0, 0, 0, 0, 0]
    assert list(kv.pool.evictable) == []
    assert (y.num_computed_tokens, z.num_computed_tokens) == (8, 8)
    assert kv.stats() == KVCacheStats(
        num_blocks=8, num_free_blocks=6, num_used_blocks=2, num_cached_blocks=0,
        prefix_queried_tokens=9 + 9 + 10, prefix_hit_tokens=8 + 8,
    )
    h.step(kv, {y: 1, z: 2})
    assert kv.get_block_table(y) == [0, 1, 3]
    assert kv.get_block_table(z) == [0, 1, 4]
    assert y.output_token_ids == z.output_token_ids == [500]
    h.finish(kv, y)
    assert kv.pool.ref_counts == [1, 1, 0, 0, 1, 0, 0, 0]
    h.finish(kv, z)
    assert kv.pool.free == deque([5, 6, 7, 2, 3, 4])
    assert list(kv.pool.evictable) == [1, 0]
    h.assert_pool_idle(kv)


# ---- preemption ----------------------------------------------------------------------------------
def test_preemption_then_resume_reuses_the_cached_blocks(h):
    kv = h.kv(max_tokens=32)
    a = h.request("a", tokens(1, 11), max_tokens=8)  # 10 tokens
    h.step(kv, {a: 10})
    h.step(kv, {a: 1})
    h.step(kv, {a: 1})  # 12 computed: blocks 0..2 full and cached
    assert a.output_token_ids == [500, 501, 502]
    assert kv.get_block_table(a) == [0, 1, 2]

    kv.free_resources(a)
    a.reset_for_recompute()
    assert a.state is RequestState.QUEUED
    assert a.num_computed_tokens == 0
    assert a.num_preemptions == 1
    assert a.output_token_ids == [500, 501, 502]  # kept, recomputed as context
    assert kv.pool.ref_counts == [0] * 8
    assert kv.pool.free == deque([3, 4, 5, 6, 7])
    assert list(kv.pool.evictable) == [2, 1, 0]
    # not admitted: the three unreferenced cached blocks it will take count as needed free blocks
    assert kv.blocks_needed(a, 1) == 3 + 1  # and one block for the one token left after them
    assert kv.get_needed_resource_to_completion(a) == 3 + 5 - 3  # (10 + 8 - 1) tokens: 5 blocks

    h.admit(kv, a)
    assert a.state is RequestState.CONTEXT
    assert kv.get_block_table(a) == [0, 1, 2]
    assert a.num_computed_tokens == 12
    assert a.num_missing_tokens == 1
    assert kv.pool.ref_counts == [1, 1, 1, 0, 0, 0, 0, 0]
    assert list(kv.pool.evictable) == []
    assert kv.num_free_blocks == 5
    assert kv.stats().prefix_queried_tokens == 10 + 13
    assert kv.stats().prefix_hit_tokens == 12
    # admitted: the queries count from what it holds
    assert kv.blocks_needed(a, 1) == 1
    assert kv.get_needed_resource_to_completion(a) == 2

    scheduled = h.prepare(kv, {a: 1})
    assert kv.get_block_table(a) == [0, 1, 2, 3]
    assert kv.pool.ref_counts == [1, 1, 1, 1, 0, 0, 0, 0]
    assert h.complete(kv, scheduled) == [a]
    assert a.num_computed_tokens == 13
    assert a.output_token_ids == [500, 501, 502, 503]
    assert a.state is RequestState.GENERATION
    h.finish(kv, a)
    h.assert_pool_idle(kv)


def test_preemption_without_prefix_caching_recomputes_into_fresh_blocks(h):
    kv = h.kv(max_tokens=32, enable_prefix_caching=False)
    a = h.request("a", tokens(1, 11))
    h.step(kv, {a: 10})
    h.step(kv, {a: 1})
    h.step(kv, {a: 1})
    kv.free_resources(a)
    a.reset_for_recompute()
    assert kv.pool.free == deque([3, 4, 5, 6, 7, 2, 1, 0])

    h.prepare(kv, {a: 13})
    assert kv.get_block_table(a) == [3, 4, 5, 6]
    assert a.num_computed_tokens == 0
    assert a.num_scheduled_tokens == 13
    h.complete(kv, [a])
    h.finish(kv, a)
    h.assert_pool_idle(kv)


# ---- capacity queries ----------------------------------------------------------------------------
def test_blocks_needed_to_completion_and_exclusive_blocks(h):
    kv = h.kv(max_tokens=32)
    r = h.request("r", tokens(1, 11), max_tokens=5)  # caches at most 10 + 5 - 1 = 14 tokens
    assert [kv.blocks_needed(r, n) for n in (0, 1, 4, 5, 10, 12, 13)] == [0, 1, 1, 2, 3, 3, 4]
    assert kv.get_needed_resource_to_completion(r) == 4
    assert kv.num_exclusive_blocks(r) == 0

    h.step(kv, {r: 10})
    assert [kv.blocks_needed(r, n) for n in (0, 1, 2, 3)] == [0, 0, 0, 1]
    assert kv.get_needed_resource_to_completion(r) == 1
    assert kv.num_exclusive_blocks(r) == 3

    s = h.request("s", tokens(1, 11) + [77], max_tokens=1)  # caches at most 11 tokens: 3 blocks
    # not admitted yet: r's blocks 0 and 1 are s's prefix and r holds them, so they cost nothing
    assert kv.get_needed_resource_to_completion(s) == 0 + 3 - 2
    assert [kv.blocks_needed(s, n) for n in (0, 1, 3)] == [0, 1, 1]  # up to the 3 tokens left after the hits
    assert kv.num_exclusive_blocks(s) == 0
    h.step(kv, {s: 3})
    assert kv.get_block_table(s) == [0, 1, 3]
    assert kv.get_needed_resource_to_completion(s) == 0
    assert kv.num_exclusive_blocks(r) == 1  # blocks 0 and 1 are shared
    assert kv.num_exclusive_blocks(s) == 1
    h.finish(kv, r)
    assert kv.num_exclusive_blocks(s) == 3
    assert kv.num_exclusive_blocks(r) == 0
    h.finish(kv, s)
    h.assert_pool_idle(kv)


def test_capacity_queries_before_admission_charge_unreferenced_hits_and_not_referenced_ones(h):
    kv = h.kv(max_tokens=32)
    a = h.request("a", tokens(1, 13), max_tokens=8)  # 12 tokens: 3 full blocks
    h.step(kv, {a: 12})
    assert kv.get_block_table(a) == [0, 1, 2]
    q = h.request("q", tokens(1, 13) + [90, 91, 92], max_tokens=4)  # 15 tokens, caches 18: 5 blocks
    # 3 reusable blocks ((15 - 1) // 4), all held by the running a: free to take; `n` counts the
    # tokens to compute after them (up to 3)
    assert [kv.blocks_needed(q, n) for n in (0, 1, 2, 3)] == [0, 1, 1, 1]
    assert kv.get_needed_resource_to_completion(q) == 0 + 5 - 3

    h.finish(kv, a)
    assert list(kv.pool.evictable) == [2, 1, 0]
    b = h.request("b", tokens(1, 9) + [55])
    h.admit(kv, b)  # b holds blocks 0 and 1 again; block 2 stays unreferenced in the LRU
    assert kv.get_block_table(b) == [0, 1]
    assert list(kv.pool.evictable) == [2]
    assert [kv.blocks_needed(q, n) for n in (0, 1, 2, 3)] == [1, 2, 2, 2]
    assert kv.get_needed_resource_to_completion(q) == 1 + 5 - 3

    h.finish(kv, b)
    assert list(kv.pool.evictable) == [2, 1, 0]
    assert [kv.blocks_needed(q, n) for n in (0, 1, 2, 3)] == [3, 4, 4, 4]
    assert kv.get_needed_resource_to_completion(q) == 3 + 5 - 3
    assert kv.stats().num_cached_blocks == 3  # the queries are read-only
    assert "q" not in kv.block_tables

    # the queries price exactly what admission and the first chunk take from the free blocks
    assert kv.num_free_blocks == 8
    h.admit(kv, q)
    assert kv.get_block_table(q) == [0, 1, 2]
    assert kv.num_free_blocks == 8 - 3
    assert kv.blocks_needed(q, 3) == 1  # admitted: counted from the blocks it holds
    assert kv.get_needed_resource_to_completion(q) == 2
    h.step(kv, {q: 3})
    assert kv.get_block_table(q) == [0, 1, 2, 3]
    assert kv.num_free_blocks == 8 - 4
    assert kv.get_needed_resource_to_completion(q) == 1
    h.finish(kv, q)
    h.assert_pool_idle(kv)


def test_the_last_token_is_never_counted_as_a_hit_by_the_queries(h):
    kv = h.kv(max_tokens=32)
    a = h.request("a", tokens(1, 13), max_tokens=8)
    h.step(kv, {a: 12})
    same = h.request("same", tokens(1, 13), max_tokens=1)  # caches 12 tokens: 3 blocks
    assert kv.get_needed_resource_to_completion(same) == 3 - 2  # only (12 - 1) // 4 = 2 reusable
    assert kv.blocks_needed(same, 4) == 1
    h.admit(kv, same)
    assert kv.get_block_table(same) == [0, 1]
    assert same.num_missing_tokens == 4
    h.finish(kv, same)
    h.finish(kv, a)
    h.assert_pool_idle(kv)


def test_a_request_asking_for_prompt_logprobs_reuses_nothing(h):
    kv = h.kv(max_tokens=32)
    a = h.request("a", tokens(1, 13), max_tokens=8)
    h.step(kv, {a: 12})
    stats = kv.stats()
    p = h.request("p", tokens(1, 13) + [90, 91, 92])
    p.sampling_params = SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=1)
    # every prompt position must be computed: the queries count no hit
    assert [kv.blocks_needed(p, n) for n in (1, 15)] == [1, 4]
    assert kv.get_needed_resource_to_completion(p) == 5

    h.admit(kv, p)
    assert kv.get_block_table(p) == []
    assert p.num_computed_tokens == 0
    assert kv.stats() == stats  # neither queried nor hit
    h.step(kv, {p: 15})
    assert kv.get_block_table(p) == [3, 4, 5, 6]
    assert kv.pool.ref_counts == [1, 1, 1, 1, 1, 1, 1, 0]
    assert kv.pool.block_hash[3] is None  # its copies of a's blocks stay private
    assert kv.pool.block_hash[6] is None  # 3 tokens: partial
    h.finish(kv, p)
    h.finish(kv, a)
    h.assert_pool_idle(kv)


def test_admission_without_prefix_caching_and_a_second_admission_do_nothing(h):
    kv = h.kv(max_tokens=32, enable_prefix_caching=False)
    a = h.request("a", tokens(1, 13), max_tokens=8)
    h.step(kv, {a: 12})
    b = h.request("b", tokens(1, 13) + [90, 91, 92], max_tokens=4)
    assert kv.blocks_needed(b, 15) == 4
    assert kv.get_needed_resource_to_completion(b) == 5
    kv.admit(b)
    assert "b" not in kv.block_tables and b.num_computed_tokens == 0
    assert kv.stats().prefix_queried_tokens == 0

    kv = h.kv(max_tokens=32)
    a = h.request("a", tokens(1, 13), max_tokens=8)
    h.step(kv, {a: 12})
    b = h.request("b", tokens(1, 13) + [90, 91, 92], max_tokens=4)
    h.admit(kv, b)
    kv.admit(b)  # already admitted (it has a table): no second hit, no second query
    assert kv.get_block_table(b) == [0, 1, 2]
    assert kv.pool.ref_counts[:3] == [2, 2, 2]
    assert (kv.stats().prefix_queried_tokens, kv.stats().prefix_hit_tokens) == (12 + 15, 12)
    h.finish(kv, b)
    h.finish(kv, a)
    h.assert_pool_idle(kv)


def test_the_executor_rejects_a_request_larger_than_the_pool_even_when_its_prefix_is_held(h):
    from framework.executor.py_executor import PyExecutor
    from framework.resources.base import ResourceManager

    kv = h.kv(max_tokens=32)  # 8 blocks
    r = h.request("r", tokens(1, 17), max_tokens=4)
    h.step(kv, {r: 16})  # r holds its 4 prompt blocks
    q = h.request("q", tokens(1, 21), max_tokens=14)  # caches 20 + 14 - 1 = 33 tokens: 9 blocks
    assert kv.get_needed_resource_to_completion(q) == 0 + 9 - 4
    engine = types.SimpleNamespace(max_model_len=128, vocab_size=1000)
    executor = PyExecutor(None, None, ResourceManager({"kv_cache": kv}), engine, None)
    assert executor.validate(q) is not None


@pytest.mark.parametrize(
    "prompt_len, max_tokens, max_model_len, blocks",
    [
        (8, 1, 128, 2),  # the only output token is sampled, never cached
        (9, 1, 128, 3),
        (8, 2, 128, 3),
        (10, 5, 128, 4),
        (10, 5, 12, 3),  # capped by the model's length: 11 tokens cached
        (10, 100, 17, 4),
    ],
)
def test_needed_to_completion(h, prompt_len, max_tokens, max_model_len, blocks):
    kv = h.kv(max_tokens=32, max_model_len=max_model_len)
    r = h.request("r", tokens(1, prompt_len + 1), max_tokens=max_tokens)
    assert kv.get_needed_resource_to_completion(r) == blocks


def test_a_request_runs_within_its_needed_to_completion(h):
    kv = h.kv(max_tokens=32)
    r = h.request("r", tokens(1, 10), max_tokens=6)  # 9 + 6 - 1 = 14 tokens: 4 blocks
    need = kv.get_needed_resource_to_completion(r)
    h.step(kv, {r: 9})
    while len(r.output_token_ids) < 6:
        h.step(kv, {r: 1})
    assert len(kv.get_block_table(r)) == need == 4
    assert kv.get_needed_resource_to_completion(r) == 0
    h.finish(kv, r)
    h.assert_pool_idle(kv)


def test_readmission_at_a_block_boundary_picks_up_blocks_cached_since(h):
    """Requests admitted in the same step all miss; the next step they reuse what the first one
    computed (the executor calls admit again for every request still catching up)."""
    kv = h.kv(max_tokens=64)
    shared = tokens(1, 13)  # 12 tokens: 3 blocks
    a = h.request("a", shared + [50])
    b = h.request("b", shared + [60])
    h.admit(kv, a, b)
    assert kv.get_block_table(a) == [] and kv.get_block_table(b) == []
    h.step(kv, {a: 13})  # only a fits the budget this step
    assert sorted(kv.pool.cached.values()) == [0, 1, 2]
    kv.admit(b)
    assert kv.get_block_table(b) == [0, 1, 2] and b.num_computed_tokens == 12
    assert kv.pool.ref_counts[:3] == [2, 2, 2]
    assert kv.stats().prefix_hit_tokens == 12
    assert kv.stats().prefix_queried_tokens == 13 + 13  # counted once per request
    kv.admit(b)  # idempotent: nothing more is cached
    assert kv.get_block_table(b) == [0, 1, 2] and b.num_computed_tokens == 12
    h.step(kv, {b: 1})
    h.finish(kv, a)
    h.finish(kv, b)
    h.assert_pool_idle(kv)
