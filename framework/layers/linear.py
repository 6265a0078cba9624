"""A linear layer whose weight can be repacked once, after loading, for the CPU matmul paths.

oneDNN multiplies faster from its own blocked weight layout; `F.linear` re-lays the weight out on
every call. `pack()` does it once and keeps the packed copy beside the plain weight (which stays the
source of truth for loading, tying and `state_dict`). With the CPU kernels, `pack()` also keeps the
kernels' panel layout, and inputs of up to `LINEAR_MAX_ROWS` rows (decode steps) go to them.
Elsewhere (CUDA, no oneDNN) nothing changes.
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
    packed_weight: torch.Tensor | None = None  # oneDNN's layout
    kernel_weight: torch.Tensor | None = None  # the CPU kernels' layout
    kernels = None  # framework.kernels.cpu.CPUKernels, set by the engine where they apply

    @torch.no_grad()
    def pack(self) -> bool:
        """Pack the current weight (call again after changing it); False where packing does not apply."""
        weight = self.weight.detach()
        self.kernel_weight = None if self.kernels is None else self.kernels.pack_linear(weight)
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1) if can_pack(weight) else None
        return self.packed_weight is not None or self.kernel_weight is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_weight is not None:
            y = self.kernels.linear(x, self.kernel_weight, self.out_features, self.bias)
            if y is not None:
                return y
        if self.packed_weight is None or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
