from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    kernels = None  # framework.kernels.cpu.CPUKernels, set by the engine where they apply

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """`weight * rmsnorm(x)`; with `residual`, `(weight * rmsnorm(x + residual), x + residual)`
        (the kernel updates `residual` in place)."""
        if residual is None:
            return self._norm(x) if self.kernels is None else self.kernels.rms_norm(x, self.weight, self.eps)
        if self.kernels is not None:
            return self.kernels.rms_norm(x, self.weight, self.eps, residual), residual
        residual = x + residual
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, scale in the model dtype (as the reference implementation does).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)
