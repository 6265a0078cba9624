"""What rank 0 sends the other ranks each step: the forward's inputs as two broadcasts of int64
tensors (a fixed header, then one flat payload), never pickled requests. Each rank builds its own
attention metadata from them (its cache holds its own KV heads)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

STOP, STEP, DECODE = 0, 1, 2  # DECODE: a decode-only step (`StepInputs.decode`)
HEADER = 7  # command, tokens, requests, table width, rows, cache blocks, block size


@dataclass
class StepInputs:
    """A packed step (CPU tensors): what the forward reads, and which rows reach the LM head."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    tables: list[list[int]]  # each request's block table, in packed order
    query_lens: torch.Tensor  # [b] tokens of each request in the step
    context_lens: torch.Tensor  # [b] positions its last token sees
    rows: torch.Tensor  # packed indices whose logits are computed
    cache_blocks: int  # the KV pool's blocks and block size (each rank's cache has the same)
    block_size: int
    # every request adds its last token (and the drafts it verifies) and samples them all: each
    # rank may run it from its backend's decode graphs
    decode: bool = False


def send_step(step: StepInputs, group, device) -> None:
    """Rank 0: broadcast `step`."""
    widths = torch.tensor([len(t) for t in step.tables], dtype=torch.long)
    width = int(widths.max()) if len(widths) else 0
    tables = torch.tensor([t + [0] * (width - len(t)) for t in step.tables], dtype=torch.long).reshape(-1)
    header = [DECODE if step.decode else STEP, len(step.input_ids), len(step.tables), width, len(step.rows), step.cache_blocks, step.block_size]
    payload = torch.cat([step.input_ids.cpu(), step.positions, step.query_lens, step.context_lens, widths, tables, step.rows.cpu()])
    dist.broadcast(torch.tensor(header, dtype=torch.long, device=device), src=0, group=group)
    dist.broadcast(payload.to(device), src=0, group=group)


def send_stop(group, device) -> None:
    dist.broadcast(torch.tensor([STOP] + [0] * (HEADER - 1), dtype=torch.long, device=device), src=0, group=group)


def receive_step(group, device) -> StepInputs | None:
    """The other ranks: the next step, or None when rank 0 stops."""
    header = torch.empty(HEADER, dtype=torch.long, device=device)
    dist.broadcast(header, src=0, group=group)
    command, tokens, requests, width, rows, cache_blocks, block_size = header.tolist()
    if command == STOP:
        return None
    payload = torch.empty(2 * tokens + 3 * requests + requests * width + rows, dtype=torch.long, device=device)
    dist.broadcast(payload, src=0, group=group)
    input_ids, positions, query_lens, context_lens, widths, tables, row_index = payload.cpu().split(
        [tokens, tokens, requests, requests, requests, requests * width, rows]
    )
    tables = [row[:w] for row, w in zip(tables.view(requests, width).tolist(), widths.tolist())]
    return StepInputs(input_ids, positions, tables, query_lens, context_lens, row_index, cache_blocks, block_size, command == DECODE)
