"""`kv_cache=sliding_window`: the paged KV cache for models whose every layer attends within a
window (Mistral-style), which frees each request's blocks once they fall out of that window.

A query at position p reads keys from p - window + 1 on, in every layer, and a request's next
queries start at its `num_computed_tokens` (drafts a step rejected are rolled back before
`update_resources`), so a block that ends before `num_computed_tokens - window + 1` is never read
again: after each step it goes back to the pool (to the prefix cache, where it was keyed), and its
entry in the block table stays as a dead slot pointing at block 0. The table keeps its length, so
positions and every table-length count (`blocks_needed`, the capacity to completion) read as in
the paged cache: those counts are what the request still allocates, and freeing only returns
blocks early, so the capacity schedulers' guarantees hold as they are.

Invariant: a dead slot is read only at positions the window masks (attention weight exactly 0),
and block 0 holds finite values (zeros, or some request's keys and values), so it adds nothing.
Models with some layer that sees the whole context (Gemma 2 and 3 alternate) free nothing here:
that needs a pool of its own for the sliding layers.
"""

from __future__ import annotations

import logging

from framework.resources.paged_kv_cache import PagedKVCacheManager

logger = logging.getLogger(__name__)

DEAD = 0  # the block a dead slot points at


class SlidingWindowKVCacheManager(PagedKVCacheManager):
    def __init__(self, kv_config, config, spec):
        super().__init__(kv_config, config, spec)
        self.window = spec.sliding_window
        self.dead: dict[str, int] = {}  # request -> its leading table slots already freed
        if self.window is None:
            logger.info("kv_cache=sliding_window: the model has layers that see the whole context; no block is freed early")

    def num_exclusive_blocks(self, request):
        refs, table = self.pool.ref_counts, self.block_tables.get(request.request_id, ())
        return sum(1 for b in table[self.dead.get(request.request_id, 0) :] if refs[b] == 1)

    def update_resources(self, scheduled):
        super().update_resources(scheduled)
        if self.window is None:
            return
        for request in scheduled:
            table = self.block_tables.get(request.request_id)
            if table is None:
                continue
            first_read = request.num_computed_tokens - self.window + 1
            dead = self.dead.get(request.request_id, 0)
            now_dead = min(max(0, first_read) // self.block_size, len(table))
            for slot in range(dead, now_dead):
                self.pool.release(table[slot])
                table[slot] = DEAD
            if now_dead > dead:
                self.dead[request.request_id] = now_dead

    def free_resources(self, request):
        dead = self.dead.pop(request.request_id, 0)
        table = self.block_tables.get(request.request_id)
        if table is not None:
            del table[:dead]  # (freed already; the base class releases the rest)
        super().free_resources(request)
