"""The built-in engines' own settings: plain dataclasses (no torch), registered with them, whose
fields sit in the `engine` config group (`engine=sim engine.profile=cpu.json`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SimEngineConfig:
    profile: str | None = None  # a profile from `mode=profile`: step times measured on a machine
    hardware: str = "h100"  # without a profile: predict step times with the roofline of conf/hardware/<name>.yaml (or a YAML path)
    clock: str = "auto"  # virtual (steps jump) | wall (steps sleep) | auto: wall for mode=serve, else virtual
    token_id: int | None = None  # the token every step emits; None: the smallest id that is no special token
    eos_after: int = 128  # a request that honours EOS gets it as this many-th output token
    full_vocab_logits: bool = False  # always return logits over the whole vocabulary (a decoder that reads all of it)
