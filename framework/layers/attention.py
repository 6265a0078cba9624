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
class AttentionGroup:
    """Requests that attend together: all decode rows (one query each), or all prefill chunks."""

    token_index: torch.Tensor  # [t] packed index of each of the group's tokens
    block_tables: torch.Tensor  # [b, max_blocks] block ids (short rows padded with a real block)
    query_slot: torch.Tensor  # [t] index of each token in the padded [b * max_query_len] query
    attn_mask: torch.Tensor  # [b, 1, max_query_len, max_blocks * block_size], True where visible
    max_query_len: int


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    decode: AttentionGroup | None
    prefill: AttentionGroup | None


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q `[T, heads, head_dim]`, k/v `[T, kv_heads, head_dim]`; caches `[kv_heads, blocks, block_size, head_dim]`."""
    num_kv_heads, _, _, head_dim = k_cache.shape
    k_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
    v_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
    groups = [g for g in (meta.decode, meta.prefill) if g is not None]
    if len(groups) == 1:  # the whole batch is one kind: no scatter needed
        return _attend(q, k_cache, v_cache, groups[0], scale)
    out = torch.empty_like(q)
    for group in groups:
        out[group.token_index] = _attend(q[group.token_index], k_cache, v_cache, group, scale)
    return out


def _gather(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """Each request's context `[kv_heads, b, context, head_dim]`, contiguous per (head, request)."""
    num_kv_heads, _, block_size, head_dim = cache.shape
    batch, width = block_tables.shape
    return cache.index_select(1, block_tables.flatten()).view(num_kv_heads, batch, width * block_size, head_dim)


def _attend(q, k_cache, v_cache, group: AttentionGroup, scale: float) -> torch.Tensor:
    """Attention of one group's packed queries `[t, heads, head_dim]` over its cached context."""
    keys, values = _gather(k_cache, group.block_tables), _gather(v_cache, group.block_tables)
    if group.max_query_len == 1:
        return _decode_attention(q, keys, values, group.attn_mask, scale)
    num_heads, head_dim = q.shape[1], q.shape[2]
    batch = group.block_tables.shape[0]
    queries = q.new_zeros(batch * group.max_query_len, num_heads, head_dim)
    queries[group.query_slot] = q
    queries = queries.view(batch, group.max_query_len, num_heads, head_dim)
    out = F.scaled_dot_product_attention(
        queries.transpose(1, 2), keys.transpose(0, 1), values.transpose(0, 1),
        attn_mask=group.attn_mask, scale=scale, enable_gqa=True,
    )
    return out.transpose(1, 2).reshape(batch * group.max_query_len, num_heads, head_dim)[group.query_slot]


def _decode_attention(q, keys, values, attn_mask, scale):
    """One query per request, as two batched matmuls over (KV head, request) pairs, softmax in
    float32. (The fused CPU kernel is several times slower for a single query row with a mask.)"""
    batch, num_heads, head_dim = q.shape
    num_kv_heads, _, context, _ = keys.shape
    group = num_heads // num_kv_heads  # query heads sharing one KV head
    grouped = q.view(batch, num_kv_heads, group, head_dim).transpose(0, 1).reshape(num_kv_heads * batch, group, head_dim)
    keys, values = keys.view(-1, context, head_dim), values.view(-1, context, head_dim)
    scores = torch.matmul(grouped, keys.transpose(1, 2)).float() * scale  # [kv_heads * b, group, context]
    scores = scores.view(num_kv_heads, batch, group, context).masked_fill(~attn_mask.view(1, batch, 1, context), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype).view(-1, group, context)
    out = torch.bmm(probs, values).view(num_kv_heads, batch, group, head_dim)
    return out.transpose(0, 1).reshape(batch, num_heads, head_dim)
