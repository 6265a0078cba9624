"""The priority scheduler's own settings. Its fields sit flat in the `scheduler` config group:
`scheduler=priority scheduler.default_priority=5 scheduler.preempt=false`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PriorityConfig:
    # Priority of a request that sets none. Lower is more important (as in vLLM).
    default_priority: int = 0
    # Release running requests of strictly lower importance when a more important one does not fit.
    preempt: bool = True
