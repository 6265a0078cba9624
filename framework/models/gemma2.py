"""Gemma 2: sliding-window layers between global ones; norms of the form `(1 + w) * rmsnorm(x)`,
four per layer (before and after attention and MLP); a GELU-tanh gated MLP; the embedding scaled by
sqrt(hidden); attention scores and final logits soft-capped where the config says so."""

from __future__ import annotations

import torch
from torch import nn

from framework.layers.gated_mlp import GatedMLP
from framework.layers.norm import UnitOffsetRMSNorm
from framework.layers.self_attention import SelfAttention
from framework.models.checkpoint import head_dim_of, layer_attention, layer_types
from framework.models.llama import LlamaForCausalLM


class Gemma2DecoderLayer(nn.Module):
    qk_norm: type | None = None
    attention_variant = staticmethod(layer_attention)

    def __init__(self, config, backend, index: int):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.rope = layer_types(config)[index]
        self.self_attn = SelfAttention(
            hidden, config.num_attention_heads, config.num_key_value_heads, head_dim_of(config), backend,
            qkv_bias=config.attention_bias, out_bias=config.attention_bias, qk_norm=self.qk_norm, norm_eps=eps,
            scale=config.query_pre_attn_scalar**-0.5, **self.attention_variant(config, index),
        )
        self.mlp = GatedMLP(hidden, config.intermediate_size, config.hidden_activation, False, backend)
        self.input_layernorm = UnitOffsetRMSNorm(hidden, eps, backend)
        self.post_attention_layernorm = UnitOffsetRMSNorm(hidden, eps, backend)
        self.pre_feedforward_layernorm = UnitOffsetRMSNorm(hidden, eps, backend)
        self.post_feedforward_layernorm = UnitOffsetRMSNorm(hidden, eps, backend)

    def forward(self, x, residual, cos_sin, meta, kv_cache):
        if residual is None:
            residual, hidden = x, self.input_layernorm(x)
        else:
            hidden, residual = self.input_layernorm(x, residual)
        hidden = self.post_attention_layernorm(self.self_attn(hidden, cos_sin, meta, kv_cache))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma2ForCausalLM(LlamaForCausalLM):
    layer_class = Gemma2DecoderLayer
    norm_class = UnitOffsetRMSNorm

    def __init__(self, config, backend):
        super().__init__(config, backend)
        # sqrt(hidden) as the activations' dtype holds it (transformers rounds it so before multiplying)
        as_float32 = torch.tensor(config.hidden_size**0.5, dtype=torch.float32, device="cpu")
        self.embed_scale = {dtype: as_float32.to(dtype).item() for dtype in (torch.float32, torch.bfloat16, torch.float16)}
        self.final_soft_cap = getattr(config, "final_logit_softcapping", None)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        return x * self.embed_scale[x.dtype]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.final_soft_cap:
            logits = torch.tanh(logits / self.final_soft_cap) * self.final_soft_cap
        return logits
