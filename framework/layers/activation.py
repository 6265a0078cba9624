import torch
import torch.nn.functional as F


def silu_and_mul(gate_up: torch.Tensor, kernels=None) -> torch.Tensor:
    """SwiGLU on a fused [gate | up] projection (by the CPU kernel when `kernels` is given)."""
    if kernels is not None:
        return kernels.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
