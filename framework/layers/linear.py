"""A linear layer whose weight can be repacked once, after loading, for the CPU matmul library.

oneDNN multiplies faster from its own blocked weight layout; `F.linear` re-lays the weight out on
every call. `pack()` does it once and keeps the packed copy beside the plain weight (which stays the
source of truth for loading, tying and `state_dict`). Elsewhere (CUDA, no oneDNN) nothing changes.
With the CPU kernels, inputs of one or two rows (batch-1 decode) go to `small_linear` instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class Linear(nn.Linear):
    packed_weight: torch.Tensor | None = None
    kernels = None  # framework.kernels.cpu.CPUKernels, set by the engine where they apply

    @torch.no_grad()
    def pack(self) -> bool:
        """Pack the current weight (call again after changing it); False where packing does not apply."""
        self.packed_weight = None
        if not can_pack(self.weight):
            return False
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:  # one or two rows: the C++ kernel streams the weight faster
            y = self.kernels.small_linear(x, self.weight, self.bias)
            if y is not None:
                return y
        if self.packed_weight is None or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
