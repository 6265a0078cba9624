"""Prompt lookup: the tokens that followed the latest earlier occurrence of the context's suffix."""

from __future__ import annotations

from dataclasses import dataclass

from framework.drafter.base import Drafter
from framework.drafter.config import NgramConfig
from framework.request import LlmRequest
from framework.resources.request_states import RequestStates


class NgramDrafter(Drafter):
    """For each decoding request, the longest suffix of its tokens (length in [ngram_min,
    ngram_max]) that occurred before proposes the `num_tokens` tokens that followed its latest
    earlier occurrence. One vectorised pass over the context per length: O(context) per request.

    A request whose recent drafts were mostly rejected pauses for `pause_steps` steps, so text
    with nothing to look up costs almost nothing."""

    def __init__(self, speculative_config, config: NgramConfig | None = None, context=None):
        super().__init__(speculative_config, config or NgramConfig(), context)
        if not 1 <= self.config.ngram_min <= self.config.ngram_max:
            raise ValueError("speculative.ngram_min and ngram_max must satisfy 1 <= ngram_min <= ngram_max")
        self.request_states = RequestStates()  # request -> _Pace

    def propose(self, requests):
        if not self.num_tokens or len(requests) > self.max_batch_size:
            return
        for request in requests:
            pace = self.request_states.get(request, _Pace)
            if pace.paused:
                pace.paused -= 1
                continue
            request.draft_token_ids = lookup(request.tokens(0, request.num_tokens), self.config.ngram_min, self.config.ngram_max, self.num_tokens)

    def observe(self, request: LlmRequest, proposed: int, accepted: int) -> None:
        pace = self.request_states.get(request, _Pace)
        pace.acceptance = 0.5 * pace.acceptance + 0.5 * accepted / proposed
        if pace.acceptance < self.config.min_acceptance:
            pace.acceptance, pace.paused = 1.0, self.config.pause_steps


@dataclass
class _Pace:
    acceptance: float = 1.0  # running share of drafts accepted (halved weight per verify step)
    paused: int = 0  # steps left without drafts


def lookup(token_ids: list[int], ngram_min: int, ngram_max: int, k: int) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the longest suffix of
    `token_ids` with a length in [ngram_min, ngram_max]; [] when none occurred."""
    import numpy as np

    tokens = np.asarray(token_ids)
    n_tokens = len(tokens)
    for n in range(min(ngram_max, n_tokens - 1), ngram_min - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: n_tokens - 1], n)  # ends before the suffix's end
        hits = np.flatnonzero((windows == tokens[n_tokens - n :]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start : start + k].tolist()
    return []
