"""How a checkpoint tensor reaches a parameter. The module that owns a parameter loads it: a module
with a `load_weight(name, tensor, part)` method decides itself where the tensor goes (a fused
projection puts q, k and v at their rows; Gemma's norm adds its offset); any other takes the tensor
as it is. `part` names a piece of a fused parameter (None: the whole of it), and `weight_parts`
lists the pieces a complete load fills, so a model file declares only its checkpoint names.

A tensor-parallel layer keeps this signature: knowing its rank, it takes its slice of `tensor`."""

from __future__ import annotations

import torch
from torch import nn


def copy_into(target: torch.Tensor, tensor: torch.Tensor) -> None:
    if target.shape != tensor.shape:
        raise ValueError(f"checkpoint shape {tuple(tensor.shape)} != model {tuple(target.shape)}")
    target.copy_(tensor)


@torch.no_grad()
def load_weight(module: nn.Module, name: str, tensor: torch.Tensor, part=None) -> None:
    """Load `tensor` into `module`'s parameter `name` (or into its `part`)."""
    own = getattr(module, "load_weight", None)
    if own is not None:
        return own(name, tensor, part)
    if part is not None:
        raise ValueError(f"{type(module).__name__}.{name} is not a fused parameter (got part {part!r})")
    copy_into(getattr(module, name).data, tensor)


def weight_parts(module: nn.Module, name: str) -> tuple:
    """The parts a complete load of `module`'s parameter `name` fills; `(None,)` for a whole one."""
    return getattr(module, "weight_parts", {}).get(name, (None,))
