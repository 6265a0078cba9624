"""The router seam: one decision per arriving request, from what a cluster's front end can see."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class ReplicaLoad:
    """What a router sees of one replica when a request arrives."""

    index: int
    num_running: int  # requests computing (prefill or decode)
    num_waiting: int  # requests queued, not yet admitted (or preempted)
    kv_cache_usage: float  # share of KV blocks held by requests, 0..1

    @property
    def num_requests(self) -> int:
        return self.num_running + self.num_waiting


class Router(ABC):
    """Built by the replay driver as `factory(replay_config, own_config, block_size)`, where
    `block_size` is the replicas' KV block size (a prefix-aware router hashes prompts in blocks
    of it). A router must decide deterministically from what it is given and what it saw before,
    so that a seeded simulation repeats exactly."""

    # False where `route` never reads the loads (only how many replicas there are): the driver
    # then routes each request before its arrival, and simulated replicas run on independently
    reads_loads: bool = True

    @abstractmethod
    def route(self, prompt_token_ids: Sequence[int], replicas: Sequence[ReplicaLoad]) -> int:
        """The index (into `replicas`) of the replica that serves this request."""


def least_loaded(replicas: Sequence[ReplicaLoad]) -> int:
    """The replica with the fewest requests, then the least KV in use, then the lowest index."""
    return min(replicas, key=lambda r: (r.num_requests, r.kv_cache_usage, r.index)).index
