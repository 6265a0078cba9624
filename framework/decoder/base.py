"""The decoder seam: logits of the sampled positions to new tokens."""

from __future__ import annotations

from abc import ABC, abstractmethod

from framework.request import LlmRequest


class Decoder(ABC):
    def __init__(self, decoder_config, config=None, seed: int = 0):
        self.config = config
        self.seed = seed

    @abstractmethod
    def decode(self, requests: list[LlmRequest], logits) -> list[int]:
        """One new token per request; `logits` is `[len(requests), vocab]` float32."""
