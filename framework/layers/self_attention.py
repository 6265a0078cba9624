"""The attention block of a decoder layer: fused QKV projection (optional bias), optional QK-norm,
RoPE and the KV cache write, the backend's paged attention (plain causal, or with a sliding window
and/or soft-capped scores), output projection. Under tensor parallelism a rank computes its share
of the query and KV heads (column-parallel QKV; one KV head, replicated, where the ranks outnumber
them) and sums the output projection over the ranks."""

from __future__ import annotations

import torch
from torch import nn

from framework.layers.linear import RowParallelLinear, qkv_linear
from framework.layers.tensor_parallel import current


class SelfAttention(nn.Module):
    def __init__(
        self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, backend, *,
        qkv_bias: bool = False, out_bias: bool = False, qk_norm: type | None = None, norm_eps: float = 1e-6,
        scale: float | None = None, sliding_window: int | None = None, soft_cap: float | None = None,
    ):
        super().__init__()
        self.backend = backend
        tp = current()
        heads, kv_heads = tp.shard(num_heads, "attention heads"), tp.kv_heads(num_kv_heads)  # this rank's (first, count)
        self.num_heads, self.num_kv_heads = heads[1], kv_heads[1]
        self.head_dim = head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.qkv_proj = qkv_linear(hidden_size, heads, kv_heads, head_dim, qkv_bias, backend)
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden_size, out_bias, backend)
        self.q_norm = None if qk_norm is None else qk_norm(head_dim, norm_eps, backend)
        self.k_norm = None if qk_norm is None else qk_norm(head_dim, norm_eps, backend)
        variant = {"sliding_window": sliding_window, "soft_cap": soft_cap}
        self.variant = {k: v for k, v in variant.items() if v is not None}  # empty: plain causal

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor, meta, kv_cache) -> torch.Tensor:
        backend = self.backend
        qkv = self.qkv_proj(x)
        if self.q_norm is not None:
            qkv = backend.qk_norm(qkv, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, self.num_heads, self.num_kv_heads)
        q = backend.rotary_and_cache(qkv, cos_sin, *kv_cache, meta, self.num_heads, self.num_kv_heads)
        if self.variant:
            attn = backend.variant_attention(q, kv_cache[0], kv_cache[1], meta, self.scale, **self.variant)
        else:
            attn = backend.attention(q, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(attn.reshape(len(x), -1))
