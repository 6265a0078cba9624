"""The gated MLP of a decoder layer: fused gate|up projection, `act(gate) * up` on the backend, down
projection. Under tensor parallelism a rank keeps its columns of gate and up and its rows of down,
whose partial sums the ranks add."""

from __future__ import annotations

import torch
from torch import nn

from framework.layers.linear import MergedLinear, RowParallelLinear
from framework.layers.tensor_parallel import current

# Hugging Face activation name -> the backend op that gates with it
GATED_ACTIVATIONS = {"silu": "silu_and_mul", "gelu_pytorch_tanh": "gelu_tanh_and_mul"}


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, bias: bool, backend):
        super().__init__()
        if activation not in GATED_ACTIVATIONS:
            raise NotImplementedError(f"activation {activation!r} is not supported ({', '.join(GATED_ACTIVATIONS)} are)")
        columns = current().shard(intermediate_size, "MLP width")  # this rank's, of gate and of up
        self.gate_up_proj = MergedLinear(hidden_size, {"gate": columns, "up": columns}, bias, backend)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias, backend)
        self.act_and_mul = getattr(backend, GATED_ACTIVATIONS[activation])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))
