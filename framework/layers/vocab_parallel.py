"""The embedding and the LM head, split by vocabulary rows under tensor parallelism: rank `r` keeps
ids `[r * shard, (r + 1) * shard)`, the last shard padded with zero rows when the vocabulary does
not divide evenly. Whole (plain `nn.Embedding` / `Linear`) without tensor parallelism."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from framework.layers.linear import Linear
from framework.layers.tensor_parallel import TensorParallel, current
from framework.layers.weight_loading import copy_into


def shard_rows(vocab_size: int, tp: TensorParallel) -> int:
    return -(-vocab_size // tp.size)


def load_vocab_shard(target: torch.Tensor, tensor: torch.Tensor, vocab_size: int, tp: TensorParallel) -> None:
    """This rank's rows of a `[vocab, ...]` tensor into `target` (padding rows zero)."""
    if tp.size == 1:
        return copy_into(target, tensor)
    if tensor.shape[0] != vocab_size:
        raise ValueError(f"checkpoint shape {tuple(tensor.shape)} has not {vocab_size} vocabulary rows")
    start = tp.rank * len(target)
    rows = max(0, min(len(target), vocab_size - start))
    target.zero_()
    copy_into(target[:rows], tensor[start : start + rows])


class VocabParallelEmbedding(nn.Embedding):
    def __init__(self, vocab_size: int, hidden_size: int):
        self.tp = current()
        super().__init__(shard_rows(vocab_size, self.tp), hidden_size)
        self.vocab_size = vocab_size

    def load_weight(self, name: str, tensor: torch.Tensor, part) -> None:
        load_vocab_shard(self.weight.data, tensor, self.vocab_size, self.tp)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(input_ids)
        local = input_ids - self.tp.rank * self.num_embeddings
        outside = (local < 0) | (local >= self.num_embeddings)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(x.masked_fill_(outside[:, None], 0))


class ParallelLMHead(Linear):
    """Logits over the whole vocabulary on rank 0 (the shards gathered); on the other ranks, their
    own shard's (which only rank 0 reads)."""

    def __init__(self, hidden_size: int, vocab_size: int, backend):
        self.tp = current()
        super().__init__(hidden_size, shard_rows(vocab_size, self.tp), False, backend)
        self.vocab_size = vocab_size

    def load_weight(self, name: str, tensor: torch.Tensor, part) -> None:
        load_vocab_shard(self.weight.data, tensor, self.vocab_size, self.tp)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().forward(hidden)
        if self.tp.size == 1:
            return logits
        logits = self.tp.gather_columns(logits)
        return logits[:, : self.vocab_size] if self.tp.rank == 0 else logits
