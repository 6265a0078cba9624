"""A linear layer whose weight the backend may prepare once, after loading, in the layout its matmul
reads fastest (the plain weight stays the source of truth for loading, tying and `state_dict`).

On CPU the `torch` backend keeps oneDNN's blocked layout (`F.linear` re-lays the weight out on every
call); elsewhere (CUDA, no oneDNN) nothing is prepared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from framework.layers.tensor_parallel import current
from framework.layers.weight_loading import copy_into


def can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def pack_onednn(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` in oneDNN's layout, or None where oneDNN does not take it."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, 1) if can_pack(weight) else None


def linear_onednn(x: torch.Tensor, weight: torch.Tensor, bias, packed: torch.Tensor | None) -> torch.Tensor:
    """`F.linear`, from the oneDNN-packed weight where there is one and `x` has its dtype."""
    if packed is None or x.dtype != weight.dtype:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class Linear(nn.Linear):
    prepared = None  # the backend's copy of the weight (see Backend.prepare_linear), or None

    def __init__(self, in_features: int, out_features: int, bias: bool, backend):
        super().__init__(in_features, out_features, bias=bias)
        self.backend = backend

    @torch.no_grad()
    def pack(self) -> bool:
        """Prepare the current weight (call again after changing it); False where the backend keeps
        no prepared copy."""
        self.prepared = self.backend.prepare_linear(self.weight.detach())
        return self.prepared is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.linear(x, self.weight, self.bias, self.prepared)


class RowParallelLinear(Linear):
    """Under tensor parallelism, the rank's columns of the weight (its slice of the input, e.g.
    its heads' attention output), its partial product summed over the ranks; the bias joins once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, backend):
        self.tp = current()
        super().__init__(self.tp.split(in_features, "input features"), out_features, bias, backend)

    def load_weight(self, name: str, tensor: torch.Tensor, part) -> None:
        if name == "weight" and self.tp.size > 1:
            tensor = tensor.narrow(1, self.tp.rank * self.in_features, self.in_features)
        copy_into(getattr(self, name).data, tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(x)
        bias = self.bias if self.tp.rank == 0 else None
        return self.tp.all_reduce(self.backend.linear(x, self.weight, bias, self.prepared))


class MergedLinear(Linear):
    """Several projections of one input as one matmul, their outputs side by side: `[gate | up]`,
    or `[q | k | v]`. Each checkpoint tensor is loaded into its own rows (`part`: its name).
    `shards`: per part, the rows `(first, count)` of its checkpoint tensor this layer keeps: all of
    them, or under tensor parallelism (column-parallel) the rank's heads of q, k and v, its
    columns of gate and up."""

    def __init__(self, in_features: int, shards: dict, bias: bool, backend):
        self.tp = current()
        super().__init__(in_features, sum(count for _, count in shards.values()), bias, backend)
        self.shards = shards
        self.part_rows, start = {}, 0
        for part, (_, count) in shards.items():
            self.part_rows[part] = (start, count)
            start += count
        parts = tuple(shards)
        self.weight_parts = {"weight": parts, "bias": parts}

    def load_weight(self, name: str, tensor: torch.Tensor, part) -> None:
        if part not in self.part_rows:
            raise ValueError(f"{name}: no part {part!r} (parts: {', '.join(map(str, self.part_rows))})")
        start, count = self.part_rows[part]
        if self.tp.size > 1:
            tensor = tensor.narrow(0, self.shards[part][0], count)
        copy_into(getattr(self, name).data.narrow(0, start, count), tensor)


def qkv_linear(hidden_size: int, heads: tuple[int, int], kv_heads: tuple[int, int], head_dim: int, bias: bool, backend) -> MergedLinear:
    """The fused query, key and value projection, `[q | k | v]` (parts "q", "k", "v"), of the
    query heads and KV heads `(first, count)` this layer keeps."""
    q, kv = ((first * head_dim, count * head_dim) for first, count in (heads, kv_heads))
    return MergedLinear(hidden_size, {"q": q, "k": kv, "v": kv}, bias, backend)
