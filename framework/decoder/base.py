"""The decoder seam: logits of the sampled positions to new tokens."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from framework.request import LlmRequest


@dataclass(frozen=True)
class DecoderOutput:
    token_ids: list[int]  # one new token per request
    # per request: {token_id: (logprob, rank)} when its SamplingParams ask for logprobs, else None
    logprobs: list[dict[int, tuple[float, int]] | None] | None = None


class Decoder(ABC):
    def __init__(self, decoder_config, config=None, seed: int = 0):
        self.config = config
        self.seed = seed

    @abstractmethod
    def decode(self, requests: list[LlmRequest], logits) -> DecoderOutput:
        """`logits` is `[len(requests), vocab]` float32, one row per request, in order."""
