"""`fair`: per-tenant fairness by virtual token counters (VTC: Sheng et al., "Fairness in Serving
Large Language Models", OSDI 2024).

Each tenant present in the engine has a counter of the tokens it has been served, weighted:
`prompt_token_weight` per prompt token and `output_token_weight` per generated token. A request is
charged its prompt and its first token when it is admitted, each later token as the scheduler sees
it (the last token of a request, made in the step it finishes, goes uncharged). Queued requests are
admitted from the tenant with the lowest counter (its earliest request first; ties: the earlier
arrival), each admission charged at once, so several backlogged tenants take turns however many
requests each has queued. Running requests are served
(given the step's token budget) in the same order. A tenant that arrives, or returns after all its
requests finished, starts level with the least-served tenant present: being idle earns no credit,
and past use is no debt. Requests without a tenant share one. Blocks are reserved to completion as
`guaranteed_no_evict` reserves them, and the chosen request that does not fit blocks admission, so
one tenant's small requests cannot starve another's large one. Nothing is preempted.
"""

from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass
from typing import Iterator

from framework.request import LlmRequest
from framework.scheduler.base import CapacityOutput, CapacityScheduler, queued, running
from framework.scheduler.capacity import admit_to_completion


@dataclass
class FairConfig:
    # What a tenant's counter is charged per prompt token and per generated token (VTC's defaults:
    # a generated token costs a step of its own, a prompt token a share of a batched one).
    prompt_token_weight: float = 1.0
    output_token_weight: float = 2.0


class FairShareScheduler(CapacityScheduler):
    """Admits and serves the least-served tenant's requests first, by virtual token counters;
    reserves blocks to completion and never preempts."""

    config: FairConfig

    def __init__(self, scheduler_config, config: FairConfig | None = None):
        super().__init__(scheduler_config, config if config is not None else FairConfig())
        for name in ("prompt_token_weight", "output_token_weight"):
            if not getattr(self.config, name) >= 0:
                raise ValueError(f"scheduler.{name} must be >= 0, got {getattr(self.config, name)}")
        self.counters: dict[str | None, float] = {}  # tenant -> weighted tokens served, for tenants present
        self._charged: weakref.WeakKeyDictionary[LlmRequest, int] = weakref.WeakKeyDictionary()  # admitted: outputs charged

    def schedule(self, active, kv_cache):
        self._update_counters(active)
        arrival = {id(r): i for i, r in enumerate(active)}
        kept = running(active)
        fitting = admit_to_completion(kept, self._turns(queued(active), arrival), kv_cache, self.max_batch_size)
        for request in fitting[len(kept) :]:
            if request not in self._charged:  # once, though a request a resource manager turns away comes back
                self.counters[request.tenant] += self._admission_cost(request)
                self._charged[request] = 1
        return CapacityOutput(sorted(fitting, key=lambda r: (self.counters[r.tenant], arrival[id(r)])))

    def _update_counters(self, active: list[LlmRequest]) -> None:
        """Forget absent tenants, start new ones at the lowest counter present, charge running requests."""
        present = {r.tenant for r in active}
        floor = min((self.counters[t] for t in present if t in self.counters), default=0.0)
        self.counters = {t: self.counters.get(t, floor) for t in present}
        for request in running(active):
            charged, outputs = self._charged.get(request, 0), len(request.output_token_ids)
            if outputs > charged:
                self.counters[request.tenant] += self.config.output_token_weight * (outputs - charged)
                self._charged[request] = outputs

    def _admission_cost(self, request: LlmRequest) -> float:
        return self.config.prompt_token_weight * request.prompt_len + self.config.output_token_weight

    def _turns(self, waiting: list[LlmRequest], arrival: dict[int, int]) -> Iterator[LlmRequest]:
        """The queued requests in admission order: each next one is the earliest of the tenant with
        the lowest counter, counting those admitted before it in this step."""
        counters = dict(self.counters)
        queues: dict[str | None, deque[LlmRequest]] = {}
        for request in waiting:
            queues.setdefault(request.tenant, deque()).append(request)
        while queues:
            tenant = min(queues, key=lambda t: (counters[t], arrival[id(queues[t][0])]))
            request = queues[tenant].popleft()
            if not queues[tenant]:
                del queues[tenant]
            yield request
            counters[tenant] += self._admission_cost(request)
