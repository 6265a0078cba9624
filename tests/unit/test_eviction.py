"""Eviction orders are parts of the block pool: LRU by default, and another order is one small
class that a KV cache variant names (here FIFO by commit time, from an in-test plugin)."""

from __future__ import annotations

import itertools

from framework.resources.block_pool import BlockPool
from framework.resources.eviction import LRUEviction


class FIFOEviction(LRUEviction):
    """Evicts the block whose content was cached first, however recently it was used."""

    def __init__(self):
        super().__init__()
        self.first_cached: dict[int, int] = {}
        self.clock = itertools.count()

    def committed(self, block):
        self.first_cached[block] = next(self.clock)

    def pop(self):
        block = min(self, key=self.first_cached.__getitem__)
        self.remove(block)
        return block


def used_then_released(pool, order):
    """Three blocks committed as 0, 1, 2, released in `order`; block 0 reused and released last."""
    blocks = [pool.allocate() for _ in range(3)]
    for block in blocks:
        pool.commit(block, ("key", block))
    for block in order:
        pool.release(block)
    pool.acquire(0)
    pool.release(0)
    return blocks


def test_lru_evicts_the_least_recently_released_block():
    pool = BlockPool(3)
    used_then_released(pool, [2, 0, 1])
    assert list(pool.evictable) == [2, 1, 0]
    assert [pool.allocate() for _ in range(3)] == [2, 1, 0]


def test_fifo_evicts_the_block_cached_first_however_recently_it_was_used():
    pool = BlockPool(3, FIFOEviction())
    used_then_released(pool, [2, 0, 1])
    assert pool.allocate() == 0 and pool.lookup(("key", 0)) is None
    assert pool.lookup(("key", 1)) == 1 and pool.num_free_blocks == 2


def test_a_kv_cache_variant_with_another_order_is_one_class(tiny_dir):
    from framework import LLM, SamplingParams
    from framework.plugins.hookspecs import hookimpl
    from framework.plugins.manager import create_plugin_manager
    from framework.resources.paged_kv_cache import PagedKVCacheManager

    class FIFOKVCache(PagedKVCacheManager):
        eviction = FIFOEviction

    class Plugin:
        @hookimpl
        def register_kv_cache_managers(self, register):
            register("fifo", FIFOKVCache)

    plugins = create_plugin_manager(extra_plugins=[Plugin()], autoload=False)
    llm = LLM(str(tiny_dir), plugins=plugins, kv_cache="fifo", dtype="float32", **{"kv_cache.max_tokens": 64, "kv_cache.block_size": 4})
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    outs = llm.generate([[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28]] * 3, params, use_tqdm=False)
    assert isinstance(llm.executor.kv_cache_manager.pool.evictable, FIFOEviction)
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)
    assert llm.kv_cache_stats.num_used_blocks == 0 and llm.kv_cache_stats.prefix_hit_rate > 0
