"""A layer's view of tensor parallelism: its rank among `size` ranks and the collectives that join
the shards. Layers read the view in force while the model is built (`building(tp)`, as
`torch.device("meta")` sets where parameters go), so a model file names its blocks once and they
shard themselves; without one, every layer is whole and calls no collective."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: Any = None  # the torch.distributed group of the forward's collectives

    def split(self, count: int, what: str) -> int:
        """This rank's share of `count` (heads, columns), which must divide evenly."""
        if count % self.size:
            raise ValueError(f"{what} ({count}) is not divisible by engine.tensor_parallel_size={self.size}")
        return count // self.size

    def shard(self, count: int, what: str) -> tuple[int, int]:
        """This rank's slice `(first, size)` of `count` things split evenly."""
        size = self.split(count, what)
        return self.rank * size, size

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """This rank's KV heads `(first, count)`: its even share or, where the ranks outnumber them
        (a multiple of them), the one KV head its query heads read, replicated on
        `size // num_kv_heads` ranks. Query heads split evenly too, so each rank's query heads
        share that one KV head."""
        if num_kv_heads >= self.size:
            return self.shard(num_kv_heads, "KV heads")
        if self.size % num_kv_heads:
            raise ValueError(
                f"engine.tensor_parallel_size={self.size} is more than the KV heads ({num_kv_heads}) but not a multiple of them"
            )
        return self.rank * num_kv_heads // self.size, 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's `x` (in place)."""
        torch.distributed.all_reduce(x, group=self.group)
        return x

    def gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0: every rank's `x` side by side (`[rows, size * cols]`); the other ranks: their own `x`."""
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        torch.distributed.gather(x.contiguous(), parts, dst=0, group=self.group)
        return torch.cat(parts, dim=-1) if self.rank == 0 else x


WHOLE = TensorParallel()
_building: ContextVar[TensorParallel] = ContextVar("tensor_parallel", default=WHOLE)


@contextmanager
def building(tp: TensorParallel):
    """Layers made inside take their shard of `tp`."""
    token = _building.set(tp)
    try:
        yield tp
    finally:
        _building.reset(token)


def current() -> TensorParallel:
    return _building.get()
