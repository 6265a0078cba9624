"""Llama-family decoder (Llama, Mistral; Qwen 2 and 3 change one detail each) for packed batches
and the paged KV cache, assembled from the blocks of `framework/layers/`."""

from __future__ import annotations

import torch
from torch import nn

from framework.layers.gated_mlp import GatedMLP
from framework.layers.norm import RMSNorm
from framework.layers.rotary import RotaryEmbedding, rope_parameters
from framework.layers.self_attention import SelfAttention
from framework.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding
from framework.models.base import CausalLM
from framework.models.checkpoint import head_dim_of, layer_attention, layer_types


class LlamaDecoderLayer(nn.Module):
    qk_norm: type | None = None  # the norm of each query and key head before RoPE (Qwen 3)

    @staticmethod
    def attention_biases(config) -> tuple[bool, bool]:
        """Whether the QKV projection and the output projection have a bias."""
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias

    @staticmethod
    def attention_variant(config, index: int) -> dict:
        """How layer `index` attends besides plain causal (`SelfAttention`'s `sliding_window`, `soft_cap`)."""
        return layer_attention(config, index)

    def __init__(self, config, backend, index: int):
        super().__init__()
        hidden = config.hidden_size
        qkv_bias, out_bias = self.attention_biases(config)
        self.rope = layer_types(config)[index]  # which of the model's RoPE tables it rotates with
        self.self_attn = SelfAttention(
            hidden, config.num_attention_heads, config.num_key_value_heads, head_dim_of(config), backend,
            qkv_bias=qkv_bias, out_bias=out_bias, qk_norm=self.qk_norm, norm_eps=config.rms_norm_eps,
            **self.attention_variant(config, index),
        )
        self.mlp = GatedMLP(hidden, config.intermediate_size, config.hidden_act, getattr(config, "mlp_bias", False), backend)
        self.input_layernorm = RMSNorm(hidden, config.rms_norm_eps, backend)
        self.post_attention_layernorm = RMSNorm(hidden, config.rms_norm_eps, backend)

    def forward(self, x, residual, cos_sin, meta, kv_cache):
        """One layer on the packed tokens `x`; `residual` is the running sum of the layers' outputs
        (None before the first layer), added inside the next norm. Returns both."""
        if residual is None:
            residual, hidden = x, self.input_layernorm(x)
        else:
            hidden, residual = self.input_layernorm(x, residual)
        hidden, residual = self.post_attention_layernorm(self.self_attn(hidden, cos_sin, meta, kv_cache), residual)
        return self.mlp(hidden), residual


class LlamaForCausalLM(CausalLM):
    layer_class = LlamaDecoderLayer
    norm_class = RMSNorm
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(self, config, backend):
        super().__init__()
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.layer_class(config, backend, i) for i in range(config.num_hidden_layers))
        self.norm = self.norm_class(config.hidden_size, config.rms_norm_eps, backend)
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, backend)
        if getattr(config, "tie_word_embeddings", False):
            self.tied = {"lm_head.weight": "embed_tokens.weight"}
        # one RoPE table per layer type (Gemma 3's sliding and global layers rotate with other bases)
        self.rotary = nn.ModuleDict({
            kind: RotaryEmbedding(self.head_dim, config.max_position_embeddings, rope_parameters(config, kind))
            for kind in dict.fromkeys(layer_types(config))
        })

    @classmethod
    def attention_variants(cls, config) -> frozenset[str]:
        return frozenset(v for i in range(config.num_hidden_layers) for v in cls.layer_class.attention_variant(config, i))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_kv_heads(self) -> int:
        return self.layers[0].self_attn.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.layers[0].self_attn.head_dim

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids, positions, meta, kv_caches):
        x = self.embed(input_ids)
        cos_sin = {kind: rotary(positions, x.dtype) for kind, rotary in self.rotary.items()}
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, cos_sin[layer.rope], meta, kv_cache)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
