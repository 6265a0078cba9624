"""The pool of KV blocks: reference counts, the prefix-hash index and an eviction order (LRU
unless told otherwise). Plain Python, no tensors; the cache tensors live in the KV cache manager."""

from __future__ import annotations

from collections import deque

from framework.resources.eviction import EvictionOrder, LRUEviction


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    """Block ids 0..num_blocks-1. A block is in exactly one of three places:

    - `free`: unreferenced, no reusable content; allocated first, lowest ids first at start;
    - `evictable`: unreferenced but holding a cached full block (a hash); evicted in the order of
      `evictable` (an EvictionOrder: least recently released first by default), and only when
      `free` is empty;
    - in use: referenced by one or more requests (ref_count > 0).
    """

    def __init__(self, num_blocks: int, eviction: EvictionOrder | None = None):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[object | None] = [None] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.evictable: EvictionOrder = eviction if eviction is not None else LRUEviction()
        self.cached: dict[object, int] = {}  # block key (hashable) -> block id

    @property
    def num_free_blocks(self) -> int:
        return len(self.free) + len(self.evictable)

    def allocate(self) -> int:
        if self.free:
            block = self.free.popleft()
        elif self.evictable:
            block = self._evict()
        else:
            raise NoFreeBlocksError("no free KV blocks")
        self.ref_counts[block] = 1
        return block

    def _evict(self) -> int:
        """The next evictable block, its cached content forgotten."""
        block = self.evictable.pop()
        del self.cached[self.block_hash[block]]
        self.block_hash[block] = None
        return block

    def allocate_many(self, n: int) -> list[int]:
        """`n` blocks, as `n` calls of `allocate` give them (free ones first, then evicted ones),
        or none and NoFreeBlocksError."""
        if n > self.num_free_blocks:
            raise NoFreeBlocksError(f"{n} KV blocks asked for, {self.num_free_blocks} free")
        free = self.free
        blocks = [free.popleft() for _ in range(min(n, len(free)))]
        blocks += [self._evict() for _ in range(n - len(blocks))]
        for block in blocks:
            self.ref_counts[block] = 1
        return blocks

    def lookup(self, block_hash) -> int | None:
        return self.cached.get(block_hash)

    def acquire(self, block: int) -> None:
        """Take one more reference to a cached block (a prefix hit)."""
        if self.ref_counts[block] == 0:
            self.evictable.remove(block)
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} released more often than acquired"
        if self.ref_counts[block] == 0:
            if self.block_hash[block] is None:
                self.free.append(block)
            else:
                self.evictable.add(block)

    def forget_cached(self) -> int:
        """Drop every unreferenced cached block's content (they become plain free blocks)."""
        dropped = list(self.evictable)
        for block in dropped:
            del self.cached[self.block_hash[block]]
            self.block_hash[block] = None
            self.free.append(block)
        self.evictable.clear()
        return len(dropped)

    def commit(self, block: int, block_hash) -> None:
        """`block` is full and its content is identified by `block_hash`: make it reusable. If an
        identical block is already cached, this one stays private and is freed normally."""
        if block_hash not in self.cached and self.block_hash[block] is None:
            self.cached[block_hash] = block
            self.block_hash[block] = block_hash
            self.evictable.committed(block)
