"""Attention over a packed batch and the paged KV cache, in PyTorch ops (the `torch` backend's).

A step's tokens are packed (no padding) as `[T, heads, head_dim]`. Each request's new K/V are
written into its cache blocks through `slot_mapping`; each request's queries then attend to its whole
cached context, gathered through its block table, with a causal mask on absolute positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass
class AttentionGroup:
    """Requests that attend together: all decode rows (one query each), or all prefill chunks."""

    token_index: torch.Tensor  # [t] packed index of each of the group's tokens
    query_slot: torch.Tensor  # [t] index of each token in the padded [b * max_query_len] query
    max_query_len: int
    chunks: list[tuple[int, int]]  # (start position, query length) of each request, in packed order
    # The causal mask (hiding padding too), in the form its path reads: for plain prompt chunks
    # (SDPA) `attn_mask` [b, 1, max_query_len, context], True where visible; for the matmul paths
    # (decode rows, shared prefixes) `attn_bias`, 0 / -inf in the model dtype,
    # [b * kv_heads, max_query_len, 1, context].
    attn_mask: torch.Tensor | None = None
    attn_bias: torch.Tensor | None = None
    shared_blocks: int = 0  # leading block-table columns that every row has in common
    own_rows: torch.Tensor | None = None  # cache rows (see `gather`) of the blocks after the shared ones
    shared_rows: torch.Tensor | None = None  # cache rows of the shared blocks
    query_positions: torch.Tensor | None = None  # [b, max_query_len] absolute position of each query row (any device)
    window: int | None = None  # the sliding window the masks apply (None: plain causal)

    @property
    def batch_size(self) -> int:
        return len(self.chunks)


@dataclass
class AttentionMetadata:
    """The `torch` backend's view of a step: decode rows (one token) and prefill chunks attend
    separately, so a long chunk in the step does not pad every decode row to its length."""

    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    decode: AttentionGroup | None
    prefill: AttentionGroup | None
    # (group, window) -> the group with its masks narrowed to the window: built by the first
    # sliding-window layer of the step, reused by the others
    windowed: dict = field(default_factory=dict)


def pad_tables(tables: list[list[int]], columns: int = 1) -> torch.Tensor:
    """Block tables as one int64 tensor, its width rounded up to a multiple of `columns`; short rows
    repeat their first block (masked out anyway)."""
    width = -(-max(len(t) for t in tables) // columns) * columns
    return torch.tensor([t + [t[0]] * (width - len(t)) for t in tables], dtype=torch.long)


def slot_mapping(positions: torch.Tensor, block_tables: torch.Tensor, query_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """The flat cache slot of each packed token `[T]`, from its position and its request's table."""
    request = torch.repeat_interleave(torch.arange(len(query_lens)), query_lens)
    return block_tables[request, positions // block_size] * block_size + positions % block_size


def shared_columns(block_tables: torch.Tensor) -> int:
    """Leading columns in which every row holds the same block (a prefix all requests share);
    at most all but the last column, so each row keeps a part of its own."""
    if block_tables.shape[0] < 2:
        return 0
    same = (block_tables == block_tables[0]).all(dim=0)
    return min(int(same.cumprod(dim=0).sum()), block_tables.shape[1] - 1)


def attention_metadata(positions, tables, query_lens, context_lens, cache_shape, dtype, device) -> AttentionMetadata:
    """The metadata of a step (see `Backend.attention_metadata`) for the PyTorch paths."""
    block_size = cache_shape[2]
    slots = slot_mapping(positions, pad_tables(tables), query_lens, block_size)
    starts = context_lens - query_lens
    first_token = torch.cumsum(query_lens, 0) - query_lens
    decoding = query_lens == 1
    common = (starts, query_lens, first_token, tables, cache_shape, dtype, device)
    return AttentionMetadata(slot_mapping=slots.to(device), decode=_group(decoding, *common), prefill=_group(~decoding, *common))


def _group(members, starts, lengths, first_token, tables, cache_shape, dtype, device) -> AttentionGroup | None:
    """Attention metadata for the requests selected by the bool mask `members`; `cache_shape` is
    the per-layer cache's `[kv_heads, num_blocks, block_size, head_dim]`, `dtype` the model's."""
    index = members.nonzero().flatten()
    if len(index) == 0:
        return None
    block_size = cache_shape[2]
    starts, lengths, firsts = starts[index], lengths[index], first_token[index]
    block_tables = pad_tables([tables[i] for i in index.tolist()])
    max_query_len = int(lengths.max())
    request = torch.repeat_interleave(torch.arange(len(index)), lengths)
    offset = torch.arange(int(lengths.sum())) - (torch.cumsum(lengths, 0) - lengths)[request]
    common = dict(
        token_index=(firsts[request] + offset).to(device),
        query_slot=(request * max_query_len + offset).to(device),
        max_query_len=max_query_len,
        chunks=list(zip(starts.tolist(), lengths.tolist())),
    )
    query_positions = starts[:, None] + torch.arange(max_query_len)[None, :]  # [b, max_q]
    shared = shared_columns(block_tables)
    visible = torch.arange(block_tables.shape[1] * block_size)[None, None, :] <= query_positions[:, :, None]
    mask = bias = None
    if max_query_len == 1 or shared:  # the matmul paths add the mask to the scores
        bias = additive_mask(visible, cache_shape[0], dtype)
    else:  # the prompt chunks pass it to SDPA
        mask = visible.unsqueeze(1)
    return AttentionGroup(
        **common,
        attn_mask=None if mask is None else mask.to(device),
        attn_bias=None if bias is None else bias.to(device),
        shared_blocks=shared,
        own_rows=cache_rows(block_tables[:, shared:], *cache_shape[:2]).to(device),
        shared_rows=cache_rows(block_tables[:1, :shared], *cache_shape[:2]).to(device) if shared else None,
        query_positions=query_positions,  # (moved to the device only by the layers that need it)
    )


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping) -> None:
    """k/v `[T, kv_heads, head_dim]` into their slots of the caches `[kv_heads, blocks, block_size, head_dim]`."""
    num_kv_heads, _, _, head_dim = k_cache.shape
    k_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, slot_mapping, k.transpose(0, 1))
    v_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, slot_mapping, v.transpose(0, 1))


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q `[T, heads, head_dim]` over the caches `[kv_heads, blocks, block_size, head_dim]`, which
    already hold the step's own keys and values (`write_kv_cache`)."""
    return _each_group(_attend, q, k_cache, v_cache, [meta.decode, meta.prefill], scale)


def _each_group(attend, q, k_cache, v_cache, groups, scale: float) -> torch.Tensor:
    """`attend` over each group's queries, back in packed order."""
    groups = [g for g in groups if g is not None]
    if len(groups) == 1:  # the whole batch is one kind: no scatter needed
        return attend(q, k_cache, v_cache, groups[0], scale)
    out = torch.empty_like(q)
    for group in groups:
        out[group.token_index] = attend(q[group.token_index], k_cache, v_cache, group, scale)
    return out


def gather(cache: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    """Context of `batch` requests, `[batch, kv_heads, context, head_dim]`, from the cache seen as
    rows of one block of one head (`rows` lists them request by request, then head by head)."""
    num_kv_heads, _, block_size, head_dim = cache.shape
    flat = cache.view(-1, block_size * head_dim)
    return flat.index_select(0, rows).view(batch, num_kv_heads, -1, head_dim)


def cache_rows(block_tables: torch.Tensor, num_kv_heads: int, num_blocks: int) -> torch.Tensor:
    """Rows of the cache seen as `[kv_heads * num_blocks, block_size * head_dim]` that hold the
    tables' blocks, request by request and head by head: `gather` over them yields every request's
    context as `[requests, kv_heads, context, head_dim]`."""
    heads = torch.arange(num_kv_heads, device=block_tables.device)[None, :, None] * num_blocks
    return (heads + block_tables[:, None, :]).flatten()


def additive_mask(visible: torch.Tensor, num_kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """The bool mask `visible` `[b, q, context]` as the matmul paths' `attn_bias`: 0 where visible,
    -inf elsewhere, `[b * kv_heads, q, 1, context]`."""
    bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))
    batch, queries, context = visible.shape
    return bias[:, None, :, None, :].expand(-1, num_kv_heads, -1, -1, -1).reshape(batch * num_kv_heads, queries, 1, context)


def _attend(q, k_cache, v_cache, group: AttentionGroup, scale: float) -> torch.Tensor:
    """Attention of one group's packed queries `[t, heads, head_dim]` over its cached context."""
    if group.shared_blocks == 0:
        if group.max_query_len == 1:
            return _decode_attention(q, k_cache, v_cache, group, scale)
        return _chunk_attention(q, k_cache, v_cache, group, scale)
    if group.max_query_len == 1:
        return _shared_prefix_attention(q, k_cache, v_cache, group, scale)
    queries = q.new_zeros(group.batch_size * group.max_query_len, *q.shape[1:])
    queries[group.query_slot] = q  # each request's chunk padded to max_query_len rows
    return _shared_prefix_attention(queries, k_cache, v_cache, group, scale)[group.query_slot]


def _decode_attention(q, k_cache, v_cache, group: AttentionGroup, scale: float) -> torch.Tensor:
    """One query per request. Gathered request-major, a request's KV heads are consecutive, so the
    query heads of one KV head are consecutive rows too: every reshape here is a free view."""
    num_kv_heads, head_dim = k_cache.shape[0], k_cache.shape[-1]
    batch = group.batch_size
    keys = gather(k_cache, group.own_rows, batch).view(batch * num_kv_heads, -1, head_dim)
    values = gather(v_cache, group.own_rows, batch).view(batch * num_kv_heads, -1, head_dim)
    queries = q.reshape(batch * num_kv_heads, -1, head_dim)  # [b * kv_heads, group, d]
    bias = group.attn_bias.view(batch * num_kv_heads, 1, -1)
    scores = torch.baddbmm(bias, queries, keys.transpose(1, 2), alpha=scale)
    # softmax of bfloat16 scores accumulates in float32 and rounds once, at the end
    return torch.bmm(torch.softmax(scores, dim=-1), values).view_as(q)


# SDPA's backends less cuDNN's: cuDNN builds an execution plan for every new pair of query and
# context lengths (W4's prompt steps: 7.6 s instead of 0.5 s on an H200), and prompt lengths rarely repeat
_CHUNK_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _chunk_attention(q, k_cache, v_cache, group: AttentionGroup, scale: float) -> torch.Tensor:
    """Prompt chunks one request at a time through the fused SDPA kernel, each over its own
    context length: no padding to the longest chunk, and a chunk that starts its prompt is plain
    causal (the kernel then skips the masked half)."""
    with sdpa_kernel(_CHUNK_BACKENDS):
        return _chunks_through_sdpa(q, k_cache, v_cache, group, scale)


def _chunks_through_sdpa(q, k_cache, v_cache, group: AttentionGroup, scale: float) -> torch.Tensor:
    batch = group.batch_size
    keys, values = gather(k_cache, group.own_rows, batch), gather(v_cache, group.own_rows, batch)
    out = torch.empty_like(q)
    offset = 0
    for i, (start, length) in enumerate(group.chunks):
        context = start + length
        # (a 4-D mask: SDPA falls back to its slow math kernel for a 3-D one)
        mask = None if start == 0 and group.window is None else group.attn_mask[i : i + 1, :, :length, :context]
        chunk = F.scaled_dot_product_attention(
            q[offset : offset + length].transpose(0, 1).unsqueeze(0),
            keys[i : i + 1, :, :context],
            values[i : i + 1, :, :context],
            attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True,
        )
        out[offset : offset + length] = chunk[0].transpose(0, 1)
        offset += length
    return out


def _shared_prefix_attention(queries, k_cache, v_cache, group: AttentionGroup, scale: float) -> torch.Tensor:
    """Queries padded to `[b * max_query_len, heads, d]`. The first `shared_blocks` blocks, common
    to every request, are gathered once and multiplied by all the requests' queries together (one
    real matrix product instead of one thin product per request); the softmax spans shared and own
    positions together, so the result is exact."""
    num_kv_heads, _, block_size, head_dim = k_cache.shape
    batch, max_query_len, num_heads = group.batch_size, group.max_query_len, queries.shape[1]
    rows = max_query_len * (num_heads // num_kv_heads)  # query rows of a request per KV head
    # [b, q, kv_heads, group, d] -> [b, kv_heads, q * group, d]: rows of one request under one KV head
    grouped = queries.view(batch, max_query_len, num_kv_heads, -1, head_dim).transpose(1, 2)
    grouped = grouped.reshape(batch, num_kv_heads, rows, head_dim)
    own_keys, own_values = gather(k_cache, group.own_rows, batch), gather(v_cache, group.own_rows, batch)
    shared_keys, shared_values = gather(k_cache, group.shared_rows, 1)[0], gather(v_cache, group.shared_rows, 1)[0]
    by_head = grouped.transpose(0, 1).reshape(num_kv_heads, batch * rows, head_dim)
    shared_scores = torch.bmm(by_head, shared_keys.transpose(1, 2)).view(num_kv_heads, batch, rows, -1)
    scores = torch.cat([shared_scores.transpose(0, 1), torch.matmul(grouped, own_keys.transpose(-1, -2))], dim=-1)
    context = scores.shape[-1]
    bias = group.attn_bias.view(batch, num_kv_heads, max_query_len, 1, context)
    scores = torch.add(bias, scores.view(batch, num_kv_heads, max_query_len, -1, context), alpha=scale)
    probs = torch.softmax(scores, dim=-1).view(batch, num_kv_heads, rows, context)
    shared = group.shared_blocks * block_size
    shared_probs = probs[..., :shared].transpose(0, 1).reshape(num_kv_heads, batch * rows, shared)
    out = torch.matmul(probs[..., shared:], own_values)  # [b, kv_heads, rows, d]
    out += torch.bmm(shared_probs, shared_values).view(num_kv_heads, batch, rows, head_dim).transpose(0, 1)
    # [b, kv_heads, q, group, d] -> [b * q, heads, d]
    out = out.view(batch, num_kv_heads, max_query_len, -1, head_dim).transpose(1, 2)
    return out.reshape(-1, num_heads, head_dim)


def variant_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, sliding_window=None, soft_cap=None):
    """`paged_attention` where each query sees only its own position and the `sliding_window - 1`
    before it, and/or the scores pass through `soft_cap * tanh(scores / soft_cap)` before the mask."""
    groups = [g for g in (meta.decode, meta.prefill) if g is not None]
    if sliding_window is not None:
        groups = [_windowed(meta, g, sliding_window) for g in groups]
    attend = _attend if soft_cap is None else lambda *args: _capped_attention(*args, soft_cap)
    return _each_group(attend, q, k_cache, v_cache, groups, scale)


def _windowed(meta: AttentionMetadata, group: AttentionGroup, window: int) -> AttentionGroup:
    """`group` with its mask narrowed to keys at most `window - 1` positions behind each query."""
    key = (id(group), window)
    if key not in meta.windowed:
        mask = group.attn_bias if group.attn_bias is not None else group.attn_mask
        key_positions = torch.arange(mask.shape[-1], device=mask.device)
        query_positions = group.query_positions.to(mask.device)
        near = key_positions[None, None, :] > query_positions[:, :, None] - window  # [b, q, context]
        if group.attn_bias is not None:
            num_kv_heads = group.attn_bias.shape[0] // group.batch_size
            narrowed = replace(group, attn_bias=group.attn_bias + additive_mask(near, num_kv_heads, group.attn_bias.dtype))
        else:
            narrowed = replace(group, attn_mask=group.attn_mask & near.unsqueeze(1))
        meta.windowed[key] = replace(narrowed, window=window)
    return meta.windowed[key]


def _capped_attention(q, k_cache, v_cache, group: AttentionGroup, scale: float, soft_cap: float) -> torch.Tensor:
    """Attention with soft-capped scores, in plain matmuls over each request's whole context
    (shared blocks included): queries padded to `[b, max_query_len]`, mask added after the cap."""
    num_kv_heads, _, _, head_dim = k_cache.shape
    batch, max_query_len, num_heads = group.batch_size, group.max_query_len, q.shape[1]
    queries = q if max_query_len == 1 else q.new_zeros(batch * max_query_len, num_heads, head_dim).index_copy_(0, group.query_slot, q)
    keys, values = gather(k_cache, group.own_rows, batch), gather(v_cache, group.own_rows, batch)
    if group.shared_blocks:
        shared_keys, shared_values = gather(k_cache, group.shared_rows, 1), gather(v_cache, group.shared_rows, 1)
        keys = torch.cat([shared_keys.expand(batch, -1, -1, -1), keys], dim=2)
        values = torch.cat([shared_values.expand(batch, -1, -1, -1), values], dim=2)
    # [b, q, kv_heads, group, d] -> [b, kv_heads, q * group, d]
    grouped = queries.view(batch, max_query_len, num_kv_heads, -1, head_dim).transpose(1, 2).reshape(batch, num_kv_heads, -1, head_dim)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / soft_cap) * soft_cap
    context = scores.shape[-1]
    if group.attn_bias is not None:
        bias = group.attn_bias.view(batch, num_kv_heads, max_query_len, 1, context)
    else:
        bias = additive_mask(group.attn_mask[:, 0], num_kv_heads, scores.dtype).view(batch, num_kv_heads, max_query_len, 1, context)
    scores = scores.view(batch, num_kv_heads, max_query_len, -1, context) + bias
    probs = torch.softmax(scores, dim=-1).view(batch, num_kv_heads, -1, context)
    out = torch.matmul(probs, values).view(batch, num_kv_heads, max_query_len, -1, head_dim).transpose(1, 2)
    out = out.reshape(batch * max_query_len, num_heads, head_dim)
    return out if max_query_len == 1 else out[group.query_slot]
