"""The model seam: what the engine calls on a causal language model, and loading weights through
the layers that own them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterable

import torch
from torch import nn

from framework.layers.weight_loading import load_weight, weight_parts


class CausalLM(nn.Module, ABC):
    """Built by the engine as `factory(hf_config, backend)` on the meta device, then moved to the
    engine's device and dtype and filled by `load_weights`. Sees packed tensors and the backend's
    attention metadata, never requests."""

    # checkpoint module name -> (our module name, part): the projections a layer fuses into one
    packed_modules: dict[str, tuple[str, object]] = {}
    checkpoint_prefix = "model."  # stripped from checkpoint names (Hugging Face's inner model)

    def __init__(self):
        super().__init__()
        self.tied: dict[str, str] = {}  # our parameter -> the one it shares (tied embeddings)

    @classmethod
    def attention_variants(cls, config) -> frozenset[str]:
        """The attention variants this config's layers use (`Backend.attention_variants`): the engine
        runs the model on a backend that implements them."""
        return frozenset()

    # ---- KV cache layout ----------------------------------------------------------------------
    @property
    @abstractmethod
    def num_layers(self) -> int:
        """Layers that keep a K and V cache, in the order `forward` takes `kv_caches`."""

    @property
    @abstractmethod
    def num_kv_heads(self) -> int: ...

    @property
    @abstractmethod
    def head_dim(self) -> int: ...

    # ---- the step ------------------------------------------------------------------------------
    @abstractmethod
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta, kv_caches) -> torch.Tensor:
        """Hidden states `[T, hidden]` of the packed tokens `input_ids` `[T]` at `positions` `[T]`;
        `meta` is the backend's attention metadata of the step, `kv_caches` a `(K, V)` pair per layer."""

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits `[rows, vocab]` of the hidden states of the sampled positions."""

    # ---- weights -------------------------------------------------------------------------------
    def parameter_name(self, checkpoint_name: str) -> tuple[str, object] | None:
        """(our parameter, part) a checkpoint tensor fills, or None for one we do not keep."""
        name = checkpoint_name.removeprefix(self.checkpoint_prefix)
        if name.endswith("rotary_emb.inv_freq") or name in self.tied:
            return None
        module, _, leaf = name.rpartition(".")
        path, _, last = module.rpartition(".")
        if last in self.packed_modules:
            ours, part = self.packed_modules[last]
            return f"{path}.{ours}.{leaf}" if path else f"{ours}.{leaf}", part
        return name, None

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fill every parameter from `(checkpoint name, tensor)` pairs, each through the layer that
        owns it; then tie what `tied` names."""
        params = {n: p for n, p in self.named_parameters() if n not in self.tied}
        loaded: dict[str, set] = {name: set() for name in params}
        for checkpoint_name, tensor in weights:
            target = self.parameter_name(checkpoint_name)
            if target is None:
                continue
            name, part = target
            if name not in params:
                raise KeyError(f"checkpoint tensor {checkpoint_name!r} has no place in {type(self).__name__}")
            module, _, leaf = name.rpartition(".")
            try:
                load_weight(self.get_submodule(module), leaf, tensor, part)
            except ValueError as exc:
                raise ValueError(f"{checkpoint_name}: {exc}") from None
            loaded[name].add(part)
        missing = [
            name for name, parts in loaded.items()
            if parts != set(weight_parts(self.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]))
        ]
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {', '.join(missing[:8])}")
        for name, source in self.tied.items():
            module, _, leaf = name.rpartition(".")
            setattr(self.get_submodule(module), leaf, self.get_parameter(source))
