"""`sjf`: shortest remaining work first, with aging so that no request waits forever.

A request's work is the tokens it may still put through the model: the part of its prompt (or of a
recompute) not in the cache, plus the outputs its `max_tokens` still allows. The engine cannot know
where a request will stop, so `max_tokens` stands for its length: a client that asks for 16 tokens
is served before one that asks for 2,000.

Aging: each step a request spends in the engine (queued or running) takes `aging` tokens off its
work for ordering, so a request K tokens longer than the others overtakes every later arrival after
at most K / `aging` steps. Blocks are reserved to completion as `guaranteed_no_evict` reserves them,
and the head of the order that does not fit blocks the ones behind it, so once a long request has
aged to the front, shorter ones cannot keep taking the blocks it waits for. Nothing is preempted.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from framework.request import LlmRequest
from framework.scheduler.base import CapacityOutput, CapacityScheduler, queued, running
from framework.scheduler.capacity import admit_to_completion


@dataclass
class SJFConfig:
    # Tokens of work forgiven per step a request has been in the engine; 0: pure SJF (long
    # requests may starve while shorter ones keep arriving).
    aging: float = 16.0


def remaining_work(request: LlmRequest) -> int:
    """Tokens the request may still compute: those not in the cache, up to its last allowed output."""
    return request.max_total_tokens - request.num_computed_tokens


class ShortestJobFirstScheduler(CapacityScheduler):
    """Admits and serves the requests with the least remaining work first (aged by time in the
    engine), reserving their blocks to completion; never preempts."""

    config: SJFConfig

    def __init__(self, scheduler_config, config: SJFConfig | None = None):
        super().__init__(scheduler_config, config if config is not None else SJFConfig())
        if not self.config.aging >= 0:
            raise ValueError(f"scheduler.aging must be >= 0 (tokens per step), got {self.config.aging}")
        self._steps = 0
        self._first_seen: weakref.WeakKeyDictionary[LlmRequest, int] = weakref.WeakKeyDictionary()

    def schedule(self, active, kv_cache):
        self._steps += 1
        for request in active:
            self._first_seen.setdefault(request, self._steps)
        fitting = admit_to_completion(running(active), sorted(queued(active), key=self.aged_work), kv_cache, self.max_batch_size)
        return CapacityOutput(sorted(fitting, key=self.aged_work))  # sorted() is stable: ties keep arrival order

    def aged_work(self, request: LlmRequest) -> float:
        waited = self._steps - self._first_seen.get(request, self._steps)
        return remaining_work(request) - self.config.aging * waited
