"""What a run is measured against: the machine's matmul peak and the model's FLOPs."""

from __future__ import annotations

import time

import torch


def matmul_peak_gflops(dtype: torch.dtype, device: torch.device, size: int = 2048, repeats: int = 5, seconds: float = 1.0) -> float:
    """Best GFLOP/s of a square matrix product in this dtype, on this device and thread count: at
    least `repeats` products and `seconds` of them, so that a slow moment of a shared machine does
    not pass for its peak."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.mm(a, b)  # warm-up
    best, count, deadline = float("inf"), 0, time.perf_counter() + seconds
    while count < repeats or time.perf_counter() < deadline:
        _sync(device)
        started = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - started)
        count += 1
    return 2 * size**3 / best / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_flops(model, counters) -> float:
    """2 x non-embedding linear params per forwarded token, 2 x hidden x vocab per sampled token,
    and attention (QK^T and PV: 4 x layers x heads x head_dim per attended position)."""
    from framework.sim.model_shape import ModelShape

    return ModelShape.of(model.config).flops(counters.tokens_forwarded, counters.tokens_sampled, counters.attended_positions)
