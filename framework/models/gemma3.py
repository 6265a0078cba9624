"""Gemma 3 (text): Gemma 2 with each query and key head normalised before RoPE, and its sliding and
global layers rotating with RoPE bases of their own (the config's per-layer-type `rope_parameters`)."""

from __future__ import annotations

from framework.layers.norm import UnitOffsetRMSNorm
from framework.models.gemma2 import Gemma2DecoderLayer, Gemma2ForCausalLM


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    qk_norm = UnitOffsetRMSNorm

    @staticmethod
    def attention_variant(config, index: int) -> dict:
        # transformers' Gemma 3 leaves `attn_logit_softcapping` unused (no Gemma 3 checkpoint sets it)
        return {k: v for k, v in Gemma2DecoderLayer.attention_variant(config, index).items() if k != "soft_cap"}


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    layer_class = Gemma3DecoderLayer
