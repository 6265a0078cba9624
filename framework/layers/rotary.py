"""Rotary position embedding (the "rotate half" layout of Hugging Face Llama checkpoints), with
the checkpoint's rope scaling."""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_parameters(config, layer_type: str | None = None) -> dict:
    """The RoPE settings of the config, or of its layers of `layer_type` where the config keeps one
    set per layer type (Gemma 3: its sliding-window and global layers rotate with other bases)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if layer_type in params:
        params = params[layer_type]
    params = dict(params)
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def inverse_frequencies(head_dim: int, params: dict) -> torch.Tensor:
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise NotImplementedError(f"rope_type {rope_type!r} is not supported (default, linear, llama3 are)")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, params: dict):
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.params = params
        self._cos_sin: torch.Tensor | None = None

    def cos_sin(self, device, dtype) -> torch.Tensor:
        """[max_positions, 2, head_dim]: cos and sin of every position, each over the full head
        width (the angle table repeated for both halves); built once per device and dtype."""
        cache = self._cos_sin
        if cache is None or cache.device != device or cache.dtype != dtype:
            inv_freq = inverse_frequencies(self.head_dim, self.params)
            freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32), inv_freq)
            angles = torch.cat([freqs, freqs], dim=-1)
            cache = torch.stack([angles.cos(), angles.sin()], dim=1).to(device=device, dtype=dtype)
            self._cos_sin = cache
        return cache

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """cos and sin at `positions`, `[T, 2, head_dim]`: looked up once per step, applied in
        every layer by the backend's `rotary_and_cache`."""
        return self.cos_sin(positions.device, dtype)[positions]


def apply_rotary(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x `[T, heads, head_dim]` rotated by the angles of its token ("rotate half" layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos_sin[:, :1] + torch.cat([-x2, x1], dim=-1) * cos_sin[:, 1:]
