"""Qwen 3: the Llama decoder with each query and key head RMS-normalised before RoPE (QK-norm)."""

from framework.layers.norm import RMSNorm
from framework.models.llama import LlamaDecoderLayer, LlamaForCausalLM


class Qwen3DecoderLayer(LlamaDecoderLayer):
    qk_norm = RMSNorm


class Qwen3ForCausalLM(LlamaForCausalLM):
    layer_class = Qwen3DecoderLayer
