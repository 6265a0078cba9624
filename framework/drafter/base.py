"""The drafter seam: proposes draft tokens that a step verifies (speculative decoding).

Each step the executor hands the drafter the requests that are decoding (their last token and
nothing else left to compute); the drafter sets `request.draft_token_ids` on those it has a
guess for, and `request.draft_probs` where it drew them from a distribution. The step then
computes and verifies them (framework/executor/verify.py): output follows exactly what decoding
one token at a time gives, only in fewer steps when the guesses are right.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

from framework.request import LlmRequest
from framework.scheduler.base import decoding


@dataclass(frozen=True)
class DraftContext:
    """What the builder gives a drafter beside its settings (a drafter that runs no model of its
    own needs none of it)."""

    target: Any  # the target's ModelEngine: vocab_size, max_model_len, kv_cache_spec()
    kv_cache: Any  # the `kv_cache` config group: a drafter's own cache gets its block size and as many tokens
    load_engine: Callable[[str], Any]  # a ModelEngine on another checkpoint (a folder or .gguf), built as the target's
    seed: int = 0  # `model.seed`, for a drafter's shared sampling generator
    scheduler: Any = None  # the `scheduler` config group: the step's token and batch budgets


class Drafter(ABC):
    # per-request state (a draft model's KV cache included) as a resource manager the builder puts
    # in the container, so it is admitted, grown, rolled back and freed with the request; or None
    request_states = None

    def __init__(self, speculative_config, config=None, context: DraftContext | None = None):
        self.num_tokens = speculative_config.num_tokens  # k: at most this many drafts per request
        self.max_batch_size = speculative_config.max_batch_size  # propose only for batches up to this
        self.config = config
        if self.num_tokens < 0 or self.max_batch_size < 0:
            raise ValueError("speculative.num_tokens and speculative.max_batch_size must be >= 0")

    @abstractmethod
    def propose(self, requests: list[LlmRequest]) -> None:
        """Set `draft_token_ids` (at most `num_tokens`) on any of these decoding requests. Where
        the drafts were drawn from a distribution q, also set `draft_probs` (a row of q per draft),
        so that sampled requests are verified by the accept/resample rule; without it each draft
        counts as proposed with certainty."""

    def propose_step(self, live: list[LlmRequest], kv_cache) -> None:
        """The executor's call each step, before scheduling: `live` is every active request (in
        arrival order), `kv_cache` the KV cache manager as schedulers see it. By default, drafts
        for the decoding ones; a drafter that must see the whole step (the simulator's decode
        runs) overrides this."""
        self.propose(decoding(live))

    def observe(self, request: LlmRequest, proposed: int, accepted: int) -> None:
        """A step verified `proposed` of the request's drafts and accepted `accepted` of them."""


class NoDrafter(Drafter):
    """`speculative=none`: every step is the plain one."""

    def propose(self, requests):
        pass


@dataclass(frozen=True)
class SpeculationStats:
    """Counts since the engine started (`LLM.speculation_stats`)."""

    steps: int  # engine steps
    verify_steps: int  # request-steps that verified at least one draft
    draft_tokens: int  # drafts verified
    accepted_tokens: int  # drafts accepted

    @classmethod
    def of(cls, counters, steps: int) -> "SpeculationStats":
        """From the executor's StepCounters (or a difference of two) and the steps they cover."""
        return cls(steps, counters.verify_steps, counters.draft_tokens, counters.accepted_draft_tokens)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_per_verify_step(self) -> float:
        """Accepted drafts per verify step (add 1 for the tokens a verify step yields)."""
        return self.accepted_tokens / self.verify_steps if self.verify_steps else 0.0

    @property
    def draft_tokens_per_step(self) -> float:
        return self.draft_tokens / self.steps if self.steps else 0.0
