"""Built-in capacity policies."""

from __future__ import annotations

from typing import Iterable

from framework.request import LlmRequest
from framework.scheduler.base import CapacityOutput, CapacityScheduler, KVCacheCapacity, queued, running


def admit_to_completion(kept: list[LlmRequest], candidates: Iterable[LlmRequest], kv_cache: KVCacheCapacity, max_batch_size: int) -> list[LlmRequest]:
    """`kept` (the running requests) followed by the `candidates` admitted, taken in the order given
    while the blocks each needs to run to completion fit beside what the kept ones still need, and
    `max_batch_size` allows. The first candidate that does not fit stops admission: the ones
    behind it (smaller, perhaps) cannot overtake and starve it. A candidate is drawn only once the
    previous one was admitted, so `candidates` may be a generator that reorders as it goes."""
    fitting = list(kept)
    available = kv_cache.num_free_blocks - sum(kv_cache.get_needed_resource_to_completion(r) for r in kept)
    for request in candidates:
        need = kv_cache.get_needed_resource_to_completion(request)
        if len(fitting) >= max_batch_size or need > available:
            break
        available -= need
        fitting.append(request)
    return fitting


class GuaranteedNoEvictScheduler(CapacityScheduler):
    """Admits a queued request only if the blocks it needs to run to completion are free after the
    running requests' own remaining needs are set aside. Never preempts; admits in arrival order
    (a request that does not fit blocks the ones behind it, so none starves)."""

    def schedule(self, active, kv_cache):
        return CapacityOutput(admit_to_completion(running(active), queued(active), kv_cache, self.max_batch_size))


class StaticBatchScheduler(GuaranteedNoEvictScheduler):
    """Classic static batching: a new batch is admitted only once every request of the previous
    batch has finished."""

    def schedule(self, active, kv_cache):
        current = running(active)
        if current:
            return CapacityOutput(current)
        return super().schedule(active, kv_cache)


class MaxUtilizationScheduler(CapacityScheduler):
    """Admits greedily: a request needs blocks only for its next step. When the running requests
    cannot all get their next step's blocks, the most recently arrived one is preempted (its blocks
    are released and it is recomputed later, from its prompt and the tokens it already produced)."""

    def _next_step_blocks(self, request: LlmRequest, kv_cache: KVCacheCapacity) -> int:
        return kv_cache.blocks_needed(request, min(request.num_missing_tokens, self.max_num_tokens))

    def schedule(self, active, kv_cache):
        candidates = running(active)  # arrival order: the last one is the most recent
        free = kv_cache.num_free_blocks
        fitting: list[LlmRequest] = []
        preempted: list[LlmRequest] = []
        while candidates:
            request = candidates.pop(0)
            need = self._next_step_blocks(request, kv_cache)
            while need > free and candidates:
                victim = candidates.pop()
                free += kv_cache.num_exclusive_blocks(victim)
                preempted.append(victim)
            if need > free:
                free += kv_cache.num_exclusive_blocks(request)
                preempted.append(request)
                continue
            free -= need
            fitting.append(request)
        if preempted:
            return CapacityOutput(fitting, preempted)
        for request in queued(active):
            need = self._next_step_blocks(request, kv_cache)
            if len(fitting) >= self.max_batch_size or need > free:
                break
            free -= need
            fitting.append(request)
        return CapacityOutput(fitting, preempted)
