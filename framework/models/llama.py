"""Llama-family decoder for packed batches and the paged KV cache: RMSNorm, RoPE, grouped-query
attention, SwiGLU, optionally tied embeddings. Q/K/V and gate/up projections are fused at load; the
hot ops run on the backend the model is built with."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from framework.layers.linear import Linear
from framework.layers.norm import RMSNorm
from framework.layers.rotary import RotaryEmbedding, rope_parameters
from framework.models.checkpoint import head_dim_of


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, backend):
        super().__init__()
        hidden = config.hidden_size
        self.backend = backend
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        self.scale = self.head_dim**-0.5
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_sizes = (q_size, kv_size, kv_size)
        attn_bias = getattr(config, "attention_bias", False)
        mlp_bias = getattr(config, "mlp_bias", False)
        self.qkv_proj = Linear(hidden, q_size + 2 * kv_size, attn_bias, backend)
        self.o_proj = Linear(q_size, hidden, attn_bias, backend)
        self.gate_up_proj = Linear(hidden, 2 * config.intermediate_size, mlp_bias, backend)
        self.down_proj = Linear(config.intermediate_size, hidden, mlp_bias, backend)
        self.input_layernorm = RMSNorm(hidden, config.rms_norm_eps, backend)
        self.post_attention_layernorm = RMSNorm(hidden, config.rms_norm_eps, backend)

    def forward(self, x, residual, cos_sin, meta, kv_cache):
        """One layer on the packed tokens `x`; `residual` is the running sum of the layers' outputs
        (None before the first layer), added inside the next norm. Returns both."""
        if residual is None:
            residual, hidden = x, self.input_layernorm(x)
        else:
            hidden, residual = self.input_layernorm(x, residual)
        backend = self.backend
        q = backend.rotary_and_cache(self.qkv_proj(hidden), cos_sin, *kv_cache, meta, self.num_heads, self.num_kv_heads)
        attn = backend.attention(q, kv_cache[0], kv_cache[1], meta, self.scale)
        hidden, residual = self.post_attention_layernorm(self.o_proj(attn.reshape(len(x), -1)), residual)
        return self.down_proj(backend.silu_and_mul(self.gate_up_proj(hidden))), residual


class LlamaForCausalLM(nn.Module):
    # checkpoint name suffix -> (our parameter suffix, shard index within a fused parameter)
    FUSED = {
        "self_attn.q_proj": ("qkv_proj", 0),
        "self_attn.k_proj": ("qkv_proj", 1),
        "self_attn.v_proj": ("qkv_proj", 2),
        "self_attn.o_proj": ("o_proj", None),
        "mlp.gate_proj": ("gate_up_proj", 0),
        "mlp.up_proj": ("gate_up_proj", 1),
        "mlp.down_proj": ("down_proj", None),
    }

    def __init__(self, config, backend):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, backend) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = Linear(config.hidden_size, config.vocab_size, False, backend)  # tied at load if asked
        layer = self.layers[0]
        self.rotary = RotaryEmbedding(layer.head_dim, config.max_position_embeddings, rope_parameters(config))

    @property
    def num_kv_heads(self) -> int:
        return self.layers[0].num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.layers[0].head_dim

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta, kv_caches) -> torch.Tensor:
        """Hidden states `[T, hidden]` of the packed tokens; `meta` is the backend's attention
        metadata of the step, `kv_caches` a `(K, V)` pair per layer."""
        x = self.embed_tokens(input_ids)
        cos_sin = self.rotary(positions, x.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, cos_sin, meta, kv_cache)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def _target(self, name: str) -> tuple[str, int | None] | None:
        """Map a Hugging Face parameter name to ours (and a shard index for fused ones)."""
        if name.startswith("model."):
            name = name[len("model.") :]
        if name.endswith("rotary_emb.inv_freq"):
            return None
        if name == "lm_head.weight" and self.tie_word_embeddings:
            return None
        for hf, (ours, shard) in self.FUSED.items():
            if f".{hf}." in f".{name}":
                return name.replace(hf, ours), shard
        return name, None

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = {n: p for n, p in self.named_parameters() if not (n == "lm_head.weight" and self.tie_word_embeddings)}
        loaded: set[tuple[str, int | None]] = set()
        for hf_name, tensor in weights:
            target = self._target(hf_name)
            if target is None:
                continue
            name, shard = target
            if name not in params:
                raise KeyError(f"checkpoint tensor {hf_name!r} has no place in {type(self).__name__}")
            param = params[name]
            if shard is not None:
                sizes = self._shard_sizes(name)
                param = param.narrow(0, sum(sizes[:shard]), sizes[shard])
            if param.shape != tensor.shape:
                raise ValueError(f"{hf_name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(param.shape)}")
            param.copy_(tensor)
            loaded.add((name, shard))
        missing = [n for n in params if not any(n == name for name, _ in loaded)]
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {', '.join(missing[:8])}")
        if self.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _shard_sizes(self, name: str) -> list[int]:
        layer = self.layers[0]
        if "qkv_proj" in name:
            return list(layer.qkv_sizes)
        return [self.config.intermediate_size] * 2
