"""The two scheduler seams. Each step the executor asks the CapacityScheduler which active requests
get resources, then the MicroBatchScheduler which of those run and how many tokens each computes.

Schedulers see requests and the KV cache only through `KVCacheCapacity`; never tensors, the model
or the pool's internals.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Protocol

from framework.request import LlmRequest, RequestState


class KVCacheCapacity(Protocol):
    """What a scheduler may ask of the KV cache manager."""

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now (free ones and evictable cached ones)."""

    def blocks_needed(self, request: LlmRequest, num_new_tokens: int) -> int:
        """New blocks `request` needs to compute `num_new_tokens` more tokens."""

    def get_needed_resource_to_completion(self, request: LlmRequest) -> int:
        """New blocks `request` needs to run to its last possible token."""

    def num_exclusive_blocks(self, request: LlmRequest) -> int:
        """Blocks that would return to the pool if `request` released its cache now."""

    def get_max_resource_count(self) -> int:
        """Blocks in the whole pool."""


@dataclass
class CapacityOutput:
    fitting: list[LlmRequest] = field(default_factory=list)  # admitted or kept, in priority order
    preempted: list[LlmRequest] = field(default_factory=list)  # to release and recompute later


def running(active: list[LlmRequest]) -> list[LlmRequest]:
    return [r for r in active if RequestState.CONTEXT <= r.state <= RequestState.GENERATION]


def queued(active: list[LlmRequest]) -> list[LlmRequest]:
    return [r for r in active if r.state is RequestState.QUEUED]


def is_decoding(request: LlmRequest) -> bool:
    """Generating, with only its last token (and any drafts to verify) left to compute."""
    return request.state is RequestState.GENERATION and request.num_computed_tokens == request.num_tokens - 1


def decoding(active: list[LlmRequest]) -> list[LlmRequest]:
    return [r for r in active if is_decoding(r)]


def _limits(scheduler_config) -> tuple[int, int]:
    batch, tokens = scheduler_config.max_batch_size, scheduler_config.max_num_tokens
    if batch < 1:
        raise ValueError(f"scheduler.max_batch_size must be >= 1, got {batch}")
    if tokens < 1:
        raise ValueError(f"scheduler.max_num_tokens must be >= 1, got {tokens}")
    return batch, tokens


class CapacityScheduler(ABC):
    """Decides which requests hold KV resources this step. `active` is in arrival order."""

    def __init__(self, scheduler_config, config=None):
        self.max_batch_size, self.max_num_tokens = _limits(scheduler_config)
        self.config = config

    @abstractmethod
    def schedule(self, active: list[LlmRequest], kv_cache: KVCacheCapacity) -> CapacityOutput: ...


@dataclass(frozen=True)
class Chunk:
    """One request's share of a step: its next `num_tokens` tokens from its cursor (a prompt or
    recompute chunk, or a decode token and the drafts it verifies): 1 <= num_tokens <=
    request.num_missing_tokens."""

    request: LlmRequest
    num_tokens: int


class MicroBatchScheduler(ABC):
    """Chooses, among fitting requests, the ones that run this step and how many tokens each
    computes. It returns the plan, one Chunk per request in batch order, and changes no request:
    the executor applies the plan."""

    def __init__(self, scheduler_config, config=None):
        self.max_batch_size, self.max_num_tokens = _limits(scheduler_config)
        self.config = config

    @abstractmethod
    def schedule(self, fitting: list[LlmRequest]) -> list[Chunk]: ...

    def _decode_rows(self, fitting: list[LlmRequest]) -> list[LlmRequest]:
        """The decoding requests, in order, as many as one token each fits the step's limits."""
        return decoding(fitting)[: min(self.max_batch_size, self.max_num_tokens)]
