"""The model-engine seam: one packed forward per step."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from framework.engine.clock import Clock, WallClock
from framework.request import LlmRequest
from framework.resources.base import KVCacheSpec, ResourceManager


@dataclass(frozen=True)
class ForwardOutput:
    # float32 [rows, width]: per sampled request, in order, the row of its last token and then one
    # row per draft token it verifies (1 + len(draft_token_ids) rows). `width` is the vocabulary
    # size, or less where the engine knows every id from `width` on has logit -inf and no request
    # of the step reads those ids (penalties, logprobs, a min_tokens mask): the simulated engine
    logits: Any
    sampled: list[LlmRequest]  # requests whose scheduled chunk reached their last token
    # for requests asking for prompt logprobs: (request, first position, logits of every position
    # of its chunk [num_scheduled_tokens, vocab] float32)
    prompt_logits: list[tuple[LlmRequest, int, Any]] = field(default_factory=list)


class ModelEngine(ABC):
    vocab_size: int
    max_model_len: int
    device: Any  # torch.device the model runs on
    dtype: Any  # torch.dtype of weights and KV cache
    backend: Any = None  # the Backend whose ops the model runs on; None: an engine without one
    clock: Clock = WallClock()  # the time request stamps are taken in; a simulated engine may keep its own
    simulated: str | None = None  # a simulated engine: where its step times come from, for reports

    @property
    def backend_name(self) -> str | None:
        """The name of the backend the model runs on, for reports (the CLI's summary, bench JSON)."""
        return None if self.backend is None else self.backend.name

    @abstractmethod
    def kv_cache_spec(self) -> KVCacheSpec:
        """Shape, dtype and device of the KV cache this engine's model reads and writes."""

    @abstractmethod
    def forward(self, scheduled: list[LlmRequest], resource_manager: ResourceManager) -> ForwardOutput:
        """Compute each request's `num_scheduled_tokens` tokens, starting at its
        `num_computed_tokens`, writing their K/V into the cache."""

    def close(self) -> None:
        """Release what the engine holds beyond memory (the rank processes of a tensor-parallel
        engine); the default holds nothing. Called again, it does nothing."""
