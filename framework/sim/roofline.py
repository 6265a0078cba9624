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
        m, b = self.model_shape, self.bytes_per_value
        flops_rate = self.hardware.peak_flops * self.hardware.flops_efficiency
        byte_rate = self.hardware.memory_bandwidth * self.hardware.bandwidth_efficiency

        def part(flops: float, bytes_moved: float) -> float:
            return max(flops / flops_rate, bytes_moved / byte_rate)

        seconds = part(m.layer_flops(shape.tokens), m.layer_weights * b)
        if shape.sampled:
            seconds += part(m.lm_head_flops(shape.sampled), m.lm_head_weights * b)
        seconds += part(m.attention_flops(shape.attended), m.kv_values_per_token * b * shape.context)
        return seconds + self.hardware.step_overhead

    def describe(self) -> str:
        h = self.hardware
        return (
            f"PREDICTED step times: a roofline of {h.name} ({h.peak_flops / 1e12:.0f} TFLOP/s x {h.flops_efficiency:.0%}, "
            f"{h.memory_bandwidth / 1e9:.0f} GB/s x {h.bandwidth_efficiency:.0%}, {h.step_overhead * 1e3:.1f} ms a step on the host)"
        )
