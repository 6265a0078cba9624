"""Decode-only steps replayed from CUDA graphs: the `torch` backend's `decode_graphs` on CUDA.

On a GPU, a decode step of a small model is bound by launching its few hundred kernels from Python,
not by the GPU itself. A CUDA graph records a step's kernels once and replays them with one launch.
A graph has fixed shapes and reads fixed addresses, so steps are padded to buckets (the batch and
the block-table width, each to a power of two) and every graph reads its inputs from one set of
static buffers; a bucket's graph is recorded the first time a step needs it.

Under tensor parallelism (`logits_in_graph=False`) a graph records the model's forward only, whose
all-reduces NCCL captures; the LM head, which ends in a gather to rank 0, runs eagerly after the
replay on the real requests' rows. Every rank records and replays the same bucket at the same step.

With `capture=False` the same padded step runs eagerly: the path the graphs record, on any device.
"""

from __future__ import annotations

import torch

from framework.layers.attention import AttentionGroup, AttentionMetadata, additive_mask, cache_rows

# columns of the static input buffer, before each row's block table
TOKEN, POSITION, SLOT, CONTEXT, TABLE = range(5)


def bucket(n: int, limit: int) -> int:
    """The smallest power of two >= n, at most `limit` (a bucket of its own when not a power)."""
    return min(1 << (n - 1).bit_length(), limit)


class CUDADecodeGraphs:
    def __init__(
        self, model, kv_caches, block_size: int, max_batch: int, max_blocks: int, capture: bool = True, logits_in_graph: bool = True,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_batch = max_batch
        self.max_blocks = max_blocks
        self.capture = capture
        self.logits_in_graph = logits_in_graph
        k_cache = kv_caches[0][0]
        self.num_kv_heads, self.num_blocks = k_cache.shape[:2]
        self.dtype, device = k_cache.dtype, k_cache.device
        # one copy from the host per step: each row is a request's token, position, slot, context
        # length, then its block table
        self.inputs = torch.zeros(max_batch, TABLE + max_blocks, dtype=torch.long, device=device)
        self.key_positions = torch.arange(max_blocks * block_size, device=device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None  # the graphs share one memory pool: they never run at the same time

    def covers(self, batch: int, width: int, query_len: int = 1) -> bool:
        return query_len == 1 and batch <= self.max_batch and width <= self.max_blocks

    def run(self, tokens: list[int], positions: list[int], tables: list[list[int]], query_len: int = 1) -> torch.Tensor:
        """Float32 logits `[len(tokens), vocab]` of one decode step: each request's `tokens[i]` at
        `positions[i]`, its K/V written to the cache at that position of its block table."""
        batch = bucket(len(tokens), self.max_batch)
        width = bucket(max(len(t) for t in tables), self.max_blocks)
        bs = self.block_size
        rows = [
            [token, pos, table[pos // bs] * bs + pos % bs, pos + 1] + table + [table[0]] * (width - len(table))
            for token, pos, table in zip(tokens, positions, tables)
        ]
        # Padding rows repeat the first request: identical rows of one step come out identical, so
        # the duplicate K/V writes to its slot agree whatever their order.
        rows += [rows[0]] * (batch - len(rows))
        self.inputs[:batch, : TABLE + width].copy_(torch.tensor(rows))
        if not self.capture:
            return self._logits(self._forward(batch, width), len(tokens))
        if (batch, width) not in self.graphs:
            self.graphs[batch, width] = self._record(batch, width)
        graph, output = self.graphs[batch, width]
        graph.replay()
        return self._logits(output, len(tokens))

    def _logits(self, output: torch.Tensor, rows: int) -> torch.Tensor:
        """Logits of the first `rows` rows of a step's output (the logits, or the hidden states)."""
        if self.logits_in_graph:
            return output[:rows].clone()  # the next replay overwrites the static output
        return self.model.compute_logits(output[:rows]).float()

    def _forward(self, batch: int, width: int) -> torch.Tensor:
        """The padded step's logits (or hidden states), from the static buffers alone (nothing read
        from the host)."""
        inputs = self.inputs[:batch]
        tables = inputs[:, TABLE : TABLE + width]
        visible = self.key_positions[: width * self.block_size] < inputs[:, CONTEXT : CONTEXT + 1]
        decode = AttentionGroup(
            token_index=None,
            query_slot=None,
            max_query_len=1,
            chunks=[(0, 1)] * batch,
            attn_bias=additive_mask(visible[:, None, :], self.num_kv_heads, self.dtype),
            own_rows=cache_rows(tables, self.num_kv_heads, self.num_blocks),
            query_positions=inputs[:, POSITION : POSITION + 1],
        )
        meta = AttentionMetadata(slot_mapping=inputs[:, SLOT].contiguous(), decode=decode, prefill=None)
        hidden = self.model(inputs[:, TOKEN].contiguous(), inputs[:, POSITION].contiguous(), meta, self.kv_caches)
        return self.model.compute_logits(hidden).float() if self.logits_in_graph else hidden

    def _record(self, batch: int, width: int):
        """Record the bucket's graph. The step is run once first, outside the graph (lazy set-ups
        such as cuBLAS handles and the rotary table must not happen while recording); that run
        computes the current step for real (its collectives too, on every rank), and the replay
        that follows writes the same K/V again."""
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self._forward(batch, width)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread (NCCL's watchdog under tensor parallelism) may query events meanwhile
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            output = self._forward(batch, width)
        self.pool = graph.pool()
        return graph, output
