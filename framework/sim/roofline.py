"""A roofline prediction of step times from a model's sizes and a hardware description, for
hardware nobody has profiled. Each part of a step takes the longer of its arithmetic at the
hardware's sustained FLOP/s and its memory traffic at the sustained bandwidth:

- the decoder layers' linear layers: 2 FLOPs per weight per token; their weights read once;
- the LM head: the same, for the sampled rows only;
- attention: 4 FLOPs per (query, key) pair per head and dimension (scores and the weighted sum);
  each request's K and V read once;

plus a fixed host time per step (scheduling, metadata, launches). Activations are ignored.
Figures from it are predictions, never measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from framework.sim.cost_model import CostModel
from framework.sim.hardware import Hardware
from framework.sim.model_shape import ModelShape
from framework.sim.step_shape import StepShape


@dataclass(frozen=True)
class RooflineCostModel(CostModel):
    model_shape: ModelShape
    hardware: Hardware
    bytes_per_value: int  # of weights and KV cache entries (2 for bfloat16)
    is_prediction = True

    def step_seconds(self, shape: StepShape) -> float:
        seconds = self._weights_seconds(shape.tokens, shape.sampled) + self._attention_seconds(shape.attended, shape.context)
        return seconds + self.hardware.step_overhead

    def decode_steps_seconds(self, batch, contexts):
        contexts = np.asarray(contexts, dtype=np.int64)  # (`step_seconds`'s terms in its order: the same floats)
        seconds = self._weights_seconds(batch, batch) + self._attention_seconds(contexts, contexts, np.maximum)
        return (seconds + self.hardware.step_overhead).tolist()

    def _rates(self) -> tuple[float, float]:
        h = self.hardware
        return h.peak_flops * h.flops_efficiency, h.memory_bandwidth * h.bandwidth_efficiency

    def _weights_seconds(self, tokens: int, sampled: int) -> float:
        """The decoder layers' linear layers and the LM head."""
        m, b = self.model_shape, self.bytes_per_value
        flops_rate, byte_rate = self._rates()
        seconds = max(m.layer_flops(tokens) / flops_rate, m.layer_weights * b / byte_rate)
        if sampled:
            seconds += max(m.lm_head_flops(sampled) / flops_rate, m.lm_head_weights * b / byte_rate)
        return seconds

    def _attention_seconds(self, attended, context, maximum=max):
        m, b = self.model_shape, self.bytes_per_value
        flops_rate, byte_rate = self._rates()
        return maximum(m.attention_flops(attended) / flops_rate, m.kv_values_per_token * b * context / byte_rate)

    def describe(self) -> str:
        h = self.hardware
        return (
            f"PREDICTED step times: a roofline of {h.name} ({h.peak_flops / 1e12:.0f} TFLOP/s x {h.flops_efficiency:.0%}, "
            f"{h.memory_bandwidth / 1e9:.0f} GB/s x {h.bandwidth_efficiency:.0%}, {h.step_overhead * 1e3:.1f} ms a step on the host)"
        )
