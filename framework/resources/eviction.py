"""Eviction orders: which unreferenced cached block an allocation takes once no free block is left.

The block pool tells its order four things: a cached block lost its last reference (`add`), it was
referenced again or forgotten (`remove`), and a block was committed to the prefix index
(`committed`, for orders that care when content arrived). `pop` names the block to evict, and
iterating yields the evictable blocks in eviction order. A KV cache variant with another order is
a subclass of one of these plus `PagedKVCacheManager.eviction = MyOrder` (docs/kv_cache_manager.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Iterator


class EvictionOrder(ABC):
    @abstractmethod
    def add(self, block: int) -> None: ...

    @abstractmethod
    def remove(self, block: int) -> None: ...

    @abstractmethod
    def pop(self) -> int: ...

    @abstractmethod
    def __iter__(self) -> Iterator[int]: ...

    @abstractmethod
    def __len__(self) -> int: ...

    def __contains__(self, block: int) -> bool:
        return block in iter(self)

    def committed(self, block: int) -> None:
        """`block` now holds cached content (before any `add` of it)."""

    def clear(self) -> None:
        for block in list(self):
            self.remove(block)


class LRUEviction(EvictionOrder):
    """Least recently released first: a block that lost its last reference long ago is the least
    likely to be asked for again."""

    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()

    def add(self, block: int) -> None:
        self._order[block] = None

    def remove(self, block: int) -> None:
        del self._order[block]

    def pop(self) -> int:
        block, _ = self._order.popitem(last=False)
        return block

    def __iter__(self) -> Iterator[int]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, block: int) -> bool:
        return block in self._order

    def clear(self) -> None:
        self._order.clear()
