"""Attention over a packed batch and the paged KV cache.

A step's tokens are packed (no padding) as `[T, heads, head_dim]`. Each request's new K/V are
written into its cache blocks through `slot_mapping`; each request's queries then attend to its whole
cached context, gathered through its block table, with a causal mask on absolute positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    block_tables: torch.Tensor  # [B, max_blocks] block ids (padding rows point at a real block)
    query_slot: torch.Tensor  # [T] index of each token in the padded [B * max_query_len] query
    attn_mask: torch.Tensor  # [B, 1, max_query_len, max_blocks * block_size], True where visible
    max_query_len: int

    @property
    def batch_size(self) -> int:
        return self.block_tables.shape[0]


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)

    batch = meta.batch_size
    keys = k_cache[meta.block_tables].view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)
    values = v_cache[meta.block_tables].view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)
    if meta.max_query_len == 1:
        return _decode_attention(q, keys, values, meta.attn_mask, scale)
    queries = q.new_zeros(batch * meta.max_query_len, num_heads, head_dim)
    queries[meta.query_slot] = q
    queries = queries.view(batch, meta.max_query_len, num_heads, head_dim)
    out = F.scaled_dot_product_attention(
        queries.transpose(1, 2), keys, values, attn_mask=meta.attn_mask, scale=scale, enable_gqa=True
    )
    return out.transpose(1, 2).reshape(batch * meta.max_query_len, num_heads, head_dim)[meta.query_slot]


def _decode_attention(q, keys, values, attn_mask, scale):
    """One query per request: two batched matmuls per KV head group, softmax in float32. (The
    fused CPU kernel is several times slower for a single query row with a mask.)"""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[1]
    grouped = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)  # q heads of one KV head
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * scale  # [B, kv_heads, group, S]
    scores = scores.masked_fill(~attn_mask.view(batch, 1, 1, -1), float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values)  # [B, kv_heads, group, D]
    return out.reshape(batch, num_heads, head_dim)
