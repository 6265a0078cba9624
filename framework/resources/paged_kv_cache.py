"""The built-in KV cache manager: a paged pool with automatic prefix reuse."""

from __future__ import annotations

import os

import torch

from framework.request import LlmRequest, RequestState
from framework.resources.base import KVCacheManager, KVCacheSpec, KVCacheStats
from framework.resources.block_pool import BlockPool
from framework.resources.eviction import LRUEviction


def device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _zeros(shape, spec: KVCacheSpec) -> torch.Tensor:
    if spec.allocate is not None:
        return spec.allocate(shape)
    return torch.zeros(shape, dtype=spec.dtype, device=spec.device)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class PagedKVCacheManager(KVCacheManager):
    """Per layer K and V tensors of `[kv_heads, num_blocks, block_size, head_dim]`, a block table per
    request, and prefix reuse: every full block is identified by a key chained over all tokens up
    to its end, so a request admitted with a prompt that starts with cached blocks takes them
    instead of recomputing them. The capacity queries already count those hits, so schedulers
    budget only the tokens that will really be computed."""

    eviction = LRUEviction  # the pool's eviction order (framework/resources/eviction.py); a subclass may swap it

    def __init__(self, kv_config, config, spec: KVCacheSpec):
        self.block_size = kv_config.block_size
        if self.block_size < 1:
            raise ValueError(f"kv_cache.block_size must be >= 1, got {self.block_size}")
        self.enable_prefix_caching = kv_config.enable_prefix_caching
        self.spec = spec
        num_blocks = self.pool_blocks(kv_config, spec)
        self.pool = BlockPool(num_blocks, self.eviction())
        shape = (spec.num_kv_heads, num_blocks, self.block_size, spec.head_dim)
        self.kv_caches = [(_zeros(shape, spec), _zeros(shape, spec)) for _ in range(spec.num_layers)]
        self.block_tables: dict[str, list[int]] = {}
        self.block_hashes: dict[str, list[tuple]] = {}  # keys of each request's full blocks, in order
        self._planned_keys: dict[str, tuple[int, list[tuple]]] = {}  # this step's, from `defer`
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    @staticmethod
    def pool_blocks(kv_config, spec: KVCacheSpec) -> int:
        """Blocks of the pool `kv_config` asks for: `max_tokens`, else `memory_fraction` of the
        device's memory at the spec's bytes per token."""
        if kv_config.max_tokens is not None:
            return _ceil_div(kv_config.max_tokens, kv_config.block_size)
        budget = kv_config.memory_fraction * (spec.memory_bytes or device_memory(spec.device))
        return int(budget // (spec.bytes_per_token * kv_config.block_size))

    # ---- capacity queries --------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def get_max_resource_count(self) -> int:
        return self.pool.num_blocks

    def _held(self, request: LlmRequest) -> int:
        return len(self.block_tables.get(request.request_id, ()))

    def blocks_needed(self, request, num_new_tokens):
        if request.request_id not in self.block_tables:  # not admitted yet: its prefix may be cached
            reusable, unreferenced = self._reuse_cost(request)
            if reusable:  # after admission fewer tokens are left to compute
                num_new_tokens = min(num_new_tokens, request.num_tokens - reusable * self.block_size)
            return unreferenced + _ceil_div(num_new_tokens, self.block_size)
        end = request.num_computed_tokens + num_new_tokens
        return max(0, _ceil_div(end, self.block_size) - self._held(request))

    def max_cached_tokens(self, request: LlmRequest) -> int:
        """Tokens the cache holds for `request` once it has produced its last possible token (that
        last token is sampled, never computed)."""
        return min(request.max_total_tokens, self.spec.max_model_len) - 1

    def blocks_at_completion(self, request) -> int:
        """Blocks the request's table holds once it has produced its last possible token, shared
        or not."""
        return _ceil_div(self.max_cached_tokens(request), self.block_size)

    def never_fits(self, request):
        need, total = self.blocks_at_completion(request), self.pool.num_blocks
        if need <= total:
            return None
        return (
            f"prompt ({request.prompt_len} tokens) + max_tokens ({request.sampling_params.max_tokens}) needs {need} KV blocks; "
            f"the cache has {total} (raise kv_cache.max_tokens or lower max_tokens)"
        )

    def get_needed_resource_to_completion(self, request):
        total = self.blocks_at_completion(request)
        if request.request_id not in self.block_tables:
            reusable, unreferenced = self._reuse_cost(request)
            return unreferenced + total - reusable
        return max(0, total - self._held(request))

    def num_exclusive_blocks(self, request):
        refs = self.pool.ref_counts
        return sum(1 for b in self.block_tables.get(request.request_id, ()) if refs[b] == 1)

    # ---- the engine's view -------------------------------------------------------------------
    def get_block_table(self, request):
        return self.block_tables[request.request_id]

    def get_kv_caches(self):
        return self.kv_caches

    def stats(self):
        pool = self.pool
        return KVCacheStats(
            num_blocks=pool.num_blocks,
            num_free_blocks=pool.num_free_blocks,
            num_used_blocks=pool.num_blocks - pool.num_free_blocks,
            num_cached_blocks=len(pool.evictable),
            prefix_queried_tokens=self.prefix_queried_tokens,
            prefix_hit_tokens=self.prefix_hit_tokens,
        )

    # ---- prefix reuse ------------------------------------------------------------------------
    def _block_key(self, parent: tuple | None, tokens: list[int]) -> tuple:
        """The key of a full block: its own tokens plus a hash of its parent's key. Lookups compare
        the tokens exactly, so only a collision of the (64-bit) parent hash could alias two blocks."""
        return (hash(parent), tuple(tokens))

    def _block_keys(self, request: LlmRequest, first: int, end: int, parent: tuple | None):
        """The keys of the request's blocks `first` .. `end - 1`, chained from `parent` (the key of
        block `first - 1`), from one read of their tokens."""
        bs = self.block_size
        tokens = request.tokens(first * bs, end * bs) if end > first else []
        for start in range(0, len(tokens), bs):
            parent = self._block_key(parent, tokens[start : start + bs])
            yield parent

    def _reusable(self, request: LlmRequest) -> list[tuple[tuple, int]]:
        """(key, block) of the cached blocks that could extend the request's table right now: from
        its first block if it holds none, or after its last one if its cursor sits exactly at the
        end of its full, keyed blocks. Always leaves its last token to compute (its logits are
        needed). Read-only."""
        if not self.enable_prefix_caching or not self._can_reuse_next(request):
            return []
        table = self.block_tables.get(request.request_id, ())
        keys = self.block_hashes.get(request.request_id, ())
        found = []
        for key in self._block_keys(request, len(table), (request.num_tokens - 1) // self.block_size, keys[-1] if keys else None):
            block = self.pool.lookup(key)
            if block is None:
                break
            found.append((key, block))
        return found

    def _reuse_cost(self, request: LlmRequest) -> tuple[int, int]:
        """(blocks reusable, of which unreferenced): taking an unreferenced cached block uses up a
        free one, taking a block another request holds costs nothing."""
        reusable = self._reusable(request)
        return len(reusable), sum(1 for _, b in reusable if self.pool.ref_counts[b] == 0)

    def admit(self, request):
        """Extend the request's table with the cached blocks of its prefix and advance its cursor.
        Called at admission and again before every step while the request catches up, so requests
        admitted together still reuse what the first of them computes."""
        if not self.enable_prefix_caching:
            return
        if request.request_id not in self.block_tables and request.sampling_params.prompt_logprobs is None:
            self.prefix_queried_tokens += request.num_tokens
        reusable = self._reusable(request)
        table = self.block_tables.setdefault(request.request_id, [])
        keys = self.block_hashes.setdefault(request.request_id, [])
        for key, block in reusable:
            self.pool.acquire(block)
            table.append(block)
            keys.append(key)
        self.prefix_hit_tokens += len(reusable) * self.block_size
        request.num_computed_tokens += len(reusable) * self.block_size

    def defer(self, plan):
        if not self.enable_prefix_caching:
            return []
        computed_now: set[tuple] = set()
        duplicates = []
        self._planned_keys = {}
        for chunk in plan:
            request = chunk.request
            keys = self._new_block_keys(request, request.num_computed_tokens + chunk.num_tokens)
            self._planned_keys[request.request_id] = (request.num_computed_tokens + chunk.num_tokens, keys)
            if keys and keys[0] in computed_now and self._can_reuse_next(request):
                duplicates.append(request)
            else:
                computed_now.update(keys)
        return duplicates

    def _new_block_keys(self, request: LlmRequest, end: int) -> list[tuple]:
        """Keys of the request's blocks that are full once its first `end` tokens are computed
        and that it has not keyed yet, chained from its last keyed block."""
        hashes = self.block_hashes.get(request.request_id, [])
        return list(self._block_keys(request, len(hashes), end // self.block_size, hashes[-1] if hashes else None))

    def _can_reuse_next(self, request: LlmRequest) -> bool:
        """Whether the request may take cached blocks after the ones it holds: it wants no prompt
        logprobs (those need every prompt position computed) and its cursor sits exactly at the
        end of its full, keyed blocks (a partial block of its own means the prefix diverged)."""
        table = self.block_tables.get(request.request_id, ())
        return (
            request.sampling_params.prompt_logprobs is None
            and len(self.block_hashes.get(request.request_id, ())) == len(table)
            and request.num_computed_tokens == len(table) * self.block_size
        )

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix nobody holds (e.g. between benchmark runs); returns how many."""
        return self.pool.forget_cached()

    # ---- the resource-manager protocol -------------------------------------------------------
    def prepare_resources(self, scheduled):
        for request in scheduled:
            table = self.block_tables.setdefault(request.request_id, [])
            table += self.pool.allocate_many(self.blocks_needed(request, request.num_scheduled_tokens))

    def update_resources(self, scheduled):
        if not self.enable_prefix_caching:
            return
        # the keys `defer` computed for this step's plan, still right where the step computed it all
        planned, self._planned_keys = self._planned_keys, {}
        for request in scheduled:
            table = self.block_tables.get(request.request_id)
            if table is None:
                continue
            hashes = self.block_hashes.setdefault(request.request_id, [])
            end, keys = planned.get(request.request_id, (None, None))
            for key in keys if end == request.num_computed_tokens else self._new_block_keys(request, request.num_computed_tokens):
                self.pool.commit(table[len(hashes)], key)
                hashes.append(key)

    def free_resources(self, request):
        # Released tail first: the end of a sequence is the least likely to be shared, so its
        # blocks are evicted before its prefix.
        for block in reversed(self.block_tables.pop(request.request_id, [])):
            self.pool.release(block)
        self.block_hashes.pop(request.request_id, None)
