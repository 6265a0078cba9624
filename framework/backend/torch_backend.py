"""The built-in `torch` backend: the PyTorch paths of `framework/layers/`, on any device, with CUDA
graphs as its capture of decode-only steps on CUDA."""

from __future__ import annotations

from framework.backend.base import Backend
from framework.backend.config import TorchBackendConfig
from framework.backend.cuda_graphs import CUDADecodeGraphs
from framework.layers import activation, attention, linear, norm
from framework.layers.rotary import apply_rotary


class TorchBackend(Backend):
    name = "torch"
    priority = 0
    attention_variants = frozenset({"sliding_window", "soft_cap"})

    def __init__(self, engine_config, config, device, dtype):
        super().__init__(engine_config, config or TorchBackendConfig(), device, dtype)
        if self.config.cuda_graph_max_batch < 1:
            raise ValueError(f"engine.cuda_graph_max_batch must be >= 1, got {self.config.cuda_graph_max_batch}")

    @classmethod
    def supports(cls, device, dtype, head_dim: int) -> bool:
        return True

    def prepare_linear(self, weight):
        return linear.pack_onednn(weight)

    def linear(self, x, weight, bias, prepared):
        return linear.linear_onednn(x, weight, bias, prepared)

    def rms_norm(self, x, weight, eps):
        return norm.rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        residual = x + residual
        return norm.rms_norm(residual, weight, eps), residual

    def rotary_and_cache(self, qkv, cos_sin, k_cache, v_cache, meta, num_heads, num_kv_heads):
        num_tokens, head_dim = qkv.shape[0], cos_sin.shape[-1]
        q_and_k = (num_heads + num_kv_heads) * head_dim
        qk = apply_rotary(qkv[:, :q_and_k].view(num_tokens, -1, head_dim), cos_sin)
        v = qkv[:, q_and_k:].view(num_tokens, num_kv_heads, head_dim)
        attention.write_kv_cache(qk[:, num_heads:], v, k_cache, v_cache, meta.slot_mapping)
        return qk[:, :num_heads]

    def silu_and_mul(self, gate_up):
        return activation.silu_and_mul(gate_up)

    def attention_metadata(self, positions, block_tables, query_lens, context_lens, cache_shape):
        return attention.attention_metadata(positions, block_tables, query_lens, context_lens, cache_shape, self.dtype, self.device)

    def attention(self, q, k_cache, v_cache, meta, scale):
        return attention.paged_attention(q, k_cache, v_cache, meta, scale)

    def variant_attention(self, q, k_cache, v_cache, meta, scale, sliding_window=None, soft_cap=None):
        return attention.variant_attention(q, k_cache, v_cache, meta, scale, sliding_window, soft_cap)

    def decode_graphs(self, model, kv_caches, block_size, max_model_len):
        if not (self.config.cuda_graphs and self.device.type == "cuda"):
            return None
        max_blocks = -(-max_model_len // block_size)
        # under tensor parallelism the LM head's gather to rank 0 runs after the replay
        logits_in_graph = getattr(self.engine_config, "tensor_parallel_size", 1) == 1
        return CUDADecodeGraphs(model, kv_caches, block_size, self.config.cuda_graph_max_batch, max_blocks, logits_in_graph=logits_in_graph)
