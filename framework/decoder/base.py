"""The decoder seam: logits of the sampled positions to new tokens."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from framework.kernels import cpu
from framework.request import LlmRequest


@dataclass(frozen=True)
class DecoderOutput:
    token_ids: list[int]  # one new token per request
    # per request: {token_id: (logprob, rank)} when its SamplingParams ask for logprobs, else None
    logprobs: list[dict[int, tuple[float, int]] | None] | None = None


class Decoder(ABC):
    # per-request state the decoder keeps (penalty counts, a seeded generator), as a resource
    # manager the builder puts in the container: freed with the request. None: it keeps none.
    request_states = None

    def __init__(self, decoder_config, config=None, seed: int = 0):
        self.config = config
        self.seed = seed

    @abstractmethod
    def decode(self, requests: list[LlmRequest], logits) -> DecoderOutput:
        """`logits` is `[len(requests), vocab]` float32, one row per request, in order."""

    def record_prompt_logprobs(self, prompt_logits) -> None:
        """Prompt logprobs of the requests that ask for them, from the raw logits of their chunk
        (see `ForwardOutput.prompt_logits`), appended to `request.prompt_logprobs`."""
        from framework.decoder.logprobs import record_prompt_logprobs

        record_prompt_logprobs(prompt_logits)


def argmax(logits):
    """`logits.argmax(dim=-1)`, by the CPU kernel where the engine has loaded the kernels: PyTorch's
    CPU argmax over a batch of vocabulary rows is scalar code (1.1-1.2 ms for 32 x 49152 here, 0.14 ms
    this way)."""
    kernels = cpu.loaded()
    if kernels is not None and logits.dim() == 2 and logits.is_cpu and logits.is_contiguous() and logits.dtype in cpu.SUFFIXES:
        return kernels.argmax(logits)
    return logits.argmax(dim=-1)
