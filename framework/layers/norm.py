from __future__ import annotations

import torch
from torch import nn

from framework.layers.weight_loading import copy_into


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * rmsnorm(x)`: normalised in float32, scaled in the model dtype (as the reference
    implementation does)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, backend):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """`weight * rmsnorm(x)`; with `residual`, `(weight * rmsnorm(x + residual), x + residual)`
        (the backend may update `residual` in place)."""
        if residual is None:
            return self.backend.rms_norm(x, self.weight, self.eps)
        return self.backend.add_rms_norm(x, residual, self.weight, self.eps)


class UnitOffsetRMSNorm(RMSNorm):
    """Gemma's RMSNorm, `(1 + w) * rmsnorm(x)`: the checkpoint holds `w`, the parameter `1 + w`, so
    the backend's plain `rms_norm` runs it."""

    def load_weight(self, name: str, tensor: torch.Tensor, part) -> None:
        copy_into(self.weight.data, tensor.float() + 1.0)
