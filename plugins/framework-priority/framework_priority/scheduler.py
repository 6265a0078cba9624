"""The priority capacity scheduler.

Each request has an integer priority; lower is more important (as in vLLM's priority scheduling).
It is read, first match wins, from

1. `request.priority` (an attribute set on the LlmRequest),
2. `request.sampling_params.priority` (an attribute set on the SamplingParams object:
   `params = SamplingParams(max_tokens=64); params.priority = -1`),
3. `PriorityConfig.default_priority`.

Admission reserves KV blocks to completion, as `guaranteed_no_evict` does, but takes queued requests
in priority order (ties: arrival order). The most important queued request that does not fit blocks
the ones behind it, so a stream of small unimportant requests cannot starve it. When it does not fit
and `preempt` is on, running requests of strictly lower importance are preempted (least important
first, newest first among equals) until it fits; if even all of them would not make room, none is.
A request never preempts an equally or more important one, so preemption cannot cycle.
"""

from __future__ import annotations

import logging
import operator

from framework.request import LlmRequest
from framework.scheduler.base import CapacityOutput, CapacityScheduler, KVCacheCapacity, queued, running

from framework_priority.config import PriorityConfig

logger = logging.getLogger(__name__)


def request_priority(request: LlmRequest, default: int) -> int:
    """The request's priority (lower is more important); `default` when it sets none.
    Raises TypeError for a value that is not an integer."""
    value = getattr(request, "priority", None)
    if value is None:
        value = getattr(request.sampling_params, "priority", None)
    if value is None:
        return default
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"request {request.request_id!r}: priority must be an integer, got {value!r}"
        ) from None


class PriorityScheduler(CapacityScheduler):
    """Admits by priority with blocks reserved to completion; preempts strictly less important
    running requests to make room for a more important one."""

    config: PriorityConfig

    def __init__(self, scheduler_config, config: PriorityConfig | None = None):
        super().__init__(scheduler_config, config if config is not None else PriorityConfig())
        self._warned: set[str] = set()

    def priority(self, request: LlmRequest) -> int:
        try:
            return request_priority(request, self.config.default_priority)
        except TypeError as exc:
            # The scheduler runs outside the executor's per-request error handling: a bad value
            # must not stop the engine, so it falls back to the default, with a warning.
            if request.request_id not in self._warned:
                self._warned.add(request.request_id)
                logger.warning("%s; using default_priority=%d", exc, self.config.default_priority)
            return self.config.default_priority

    def schedule(self, active: list[LlmRequest], kv_cache: KVCacheCapacity) -> CapacityOutput:
        arrival = {id(r): i for i, r in enumerate(active)}  # `active` is in arrival order
        prio = {id(r): self.priority(r) for r in active}

        def key(r: LlmRequest) -> tuple[int, int]:
            return prio[id(r)], arrival[id(r)]

        kept = running(active)
        # Blocks left once every running request's remaining need to completion is set aside.
        available = kv_cache.num_free_blocks - sum(kv_cache.get_needed_resource_to_completion(r) for r in kept)
        admitted: list[LlmRequest] = []
        preempted: list[LlmRequest] = []
        for request in sorted(queued(active), key=key):
            need = kv_cache.get_needed_resource_to_completion(request)
            slots = self.max_batch_size - len(kept) - len(admitted)
            if need > available or slots < 1:
                victims = self._victims(request, kept, need - available, 1 - slots, prio, arrival, kv_cache)
                if victims is None:
                    break  # it waits, and so does everything less important behind it
                for victim in victims:
                    kept.remove(victim)
                    preempted.append(victim)
                    available += self._released(victim, kv_cache)
            admitted.append(request)
            available -= need
        return CapacityOutput(sorted(kept + admitted, key=key), preempted)

    @staticmethod
    def _released(request: LlmRequest, kv_cache: KVCacheCapacity) -> int:
        """Blocks that preempting a running request gives back: its reservation and its own blocks."""
        return kv_cache.get_needed_resource_to_completion(request) + kv_cache.num_exclusive_blocks(request)

    def _victims(self, request, kept, missing_blocks, missing_slots, prio, arrival, kv_cache):
        """The fewest running requests, taken least important first and newest first among equals,
        whose preemption makes room for `request`; None if there are none or they would not suffice."""
        if not self.config.preempt:
            return None
        mine = prio[id(request)]
        candidates = sorted(
            (r for r in kept if prio[id(r)] > mine),
            key=lambda r: (-prio[id(r)], -arrival[id(r)]),
        )
        victims = []
        for victim in candidates:
            if missing_blocks <= 0 and missing_slots <= 0:
                break
            victims.append(victim)
            missing_blocks -= self._released(victim, kv_cache)
            missing_slots -= 1
        if missing_blocks > 0 or missing_slots > 0:
            return None
        return victims
