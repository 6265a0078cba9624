"""The request as the engine sees it: token ids, a chunk cursor and a state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from framework.sampling_params import SamplingParams


class RequestState(enum.IntEnum):
    QUEUED = 0  # waiting for admission (new, or preempted and waiting to be recomputed)
    CONTEXT = 1  # admitted; catching up its prompt (possibly over several chunks)
    GENERATION = 2  # producing one token per step
    FINISHED = 3


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass(eq=False)
class LlmRequest:
    """A sequence being generated.

    The cursor `num_computed_tokens` counts the tokens whose K/V sit in the cache. Prefill, chunked
    prefill, decode and recompute after preemption are one mechanism: each step a request computes
    some of its `num_tokens - num_computed_tokens` missing tokens; when it has none left after a step,
    the logits of its last token are sampled and the new token appended.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    prompt: str | None = None
    # Scheduling metadata, read by policies (docs/scheduler.md); None: unset.
    priority: int | None = None  # lower is more important
    tenant: str | None = None  # who asks: fair shares are per tenant (requests without one share one)
    ttft_slo_ms: float | None = None  # the first token is wanted within this many ms of arrival
    eos_token_ids: tuple[int, ...] = ()
    output_token_ids: list[int] = field(default_factory=list)
    draft_token_ids: list[int] = field(default_factory=list)  # proposed continuation this step verifies
    # the drafter's probability distribution each draft was drawn from (a [>= len(draft_token_ids),
    # vocab] float tensor); None: each draft proposed with certainty (a point mass, e.g. prompt lookup)
    draft_probs: Any = None
    num_computed_tokens: int = 0
    num_scheduled_tokens: int = 0  # this step's chunk, set by the executor from the micro-batch scheduler's plan
    state: RequestState = RequestState.QUEUED
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None  # first admitted by a capacity scheduler (end of its queue time)
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    output_text: str = ""
    logprobs: list | None = None  # per generated token, when asked for
    prompt_logprobs: list | None = None  # per prompt token, when asked for
    follows: "LlmRequest | None" = None  # n > 1: siblings wait until the first one has its prompt cached
    validated: bool = False  # the executor's `validate` found nothing wrong (a prompt and its settings never change)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_missing_tokens(self) -> int:
        """Tokens to compute before the next sample: the ones not in the cache, plus any drafts."""
        return self.num_tokens + len(self.draft_token_ids) - self.num_computed_tokens

    @property
    def scheduled_attention(self) -> int:
        """(query, key) pairs this step's scheduled tokens attend: each sees the cached tokens and,
        causally, the chunk's own."""
        start, n = self.num_computed_tokens, self.num_scheduled_tokens
        return n * start + n * (n + 1) // 2

    @property
    def max_total_tokens(self) -> int:
        """Tokens the cache must hold if the request runs to max_tokens."""
        return self.prompt_len + self.sampling_params.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.state is RequestState.FINISHED

    def tokens(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end) of prompt + output (+ drafts, past the outputs),
        without copying the rest."""
        n = self.prompt_len
        if end > self.num_tokens:
            return self.tokens(start, self.num_tokens) + self.draft_token_ids[max(0, start - self.num_tokens) : end - self.num_tokens]
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    def draft_room(self, max_model_len: int) -> int:
        """Drafts a step may still verify: the tokens left under max_tokens and the length limit,
        less the one the target samples itself (0 or less: none)."""
        return min(self.sampling_params.max_tokens - len(self.output_token_ids), max_model_len - self.num_tokens) - 1

    def clear_drafts(self) -> None:
        self.draft_token_ids = []
        self.draft_probs = None

    def reset_for_recompute(self) -> None:
        """Preempted: drop the cache cursor; prompt and outputs so far are recomputed later."""
        self.num_computed_tokens = 0
        self.clear_drafts()
        self.state = RequestState.QUEUED
        self.num_preemptions += 1
