"""The decoder seam: logits of the sampled positions to new tokens."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from framework.request import LlmRequest


@dataclass(frozen=True)
class DecoderOutput:
    token_ids: list[int]  # one new token per request
    # per request: {token_id: (logprob, rank)} when its SamplingParams ask for logprobs, else None
    logprobs: list[dict[int, tuple[float, int]] | None] | None = None


@dataclass(frozen=True)
class DraftRows:
    """The drafts one position of a verify step checks, one entry per row of the logits."""

    token_ids: list[int | None]  # the row's draft token; None: no draft (the bonus token after the last)
    # the distribution the drafter drew each draft from (a [vocab] tensor); None: proposed with certainty
    probs: list[Any | None]


class Decoder(ABC):
    # per-request state the decoder keeps (penalty counts, a seeded generator), as a resource
    # manager the builder puts in the container: freed with the request. None: it keeps none.
    request_states = None

    def __init__(self, decoder_config, config=None, seed: int = 0, backend=None):
        self.config = config
        self.seed = seed
        self.backend = backend  # the engine's Backend (its `argmax`), or None: PyTorch's

    def argmax(self, logits):
        """`logits.argmax(dim=-1)`, by the backend where there is one (PyTorch's CPU argmax over a
        batch of vocabulary rows is scalar code; the C++ kernels' is vectorised)."""
        return argmax(logits, self.backend)

    @abstractmethod
    def decode(self, requests: list[LlmRequest], logits) -> DecoderOutput:
        """`logits` is `[len(requests), vocab]` float32, one row per request, in order."""

    def decodes_rows_alone(self, requests: list[LlmRequest]) -> bool:
        """Whether each of these requests' tokens depends on its logits row alone (no penalty,
        mask or draw that reads the tokens before it): then a verify step decodes all its rows
        in one `decode` call instead of one position at a time. Default: no."""
        return False

    def verify(self, requests: list[LlmRequest], logits, drafts: DraftRows) -> DecoderOutput:
        """One position of a verify step: a token per row that equals the row's draft exactly when
        the draft is accepted, drawn so that the tokens follow the target's distribution p (the
        processed, filtered one `decode` draws from). A draft d drawn from q is accepted with
        probability min(1, p(d) / q(d)); on rejection the token comes from max(p - q, 0)
        renormalised (never d). A draft proposed with certainty (q a point mass) is therefore
        accepted with probability p(d), which is what `decode` and a comparison give: the default
        here, exact for such drafts and for greedy rows. A sampling decoder overrides it to honour
        `drafts.probs`."""
        return self.decode(requests, logits)

    def processed_logits(self, requests: list[LlmRequest], logits):
        """The logits after this decoder's own transform (penalties, a bias, a grammar mask), the
        distribution temperature 0 takes the argmax of. The conformance check holds greedy
        decoding to it. Default: the logits as they are."""
        return logits

    def record_prompt_logprobs(self, prompt_logits) -> None:
        """Prompt logprobs of the requests that ask for them, from the raw logits of their chunk
        (see `ForwardOutput.prompt_logits`), appended to `request.prompt_logprobs`."""
        from framework.decoder.logprobs import record_prompt_logprobs

        record_prompt_logprobs(prompt_logits)


def argmax(logits, backend=None):
    """`logits.argmax(dim=-1)`, by `backend` where one is given."""
    return logits.argmax(dim=-1) if backend is None else backend.argmax(logits)
