"""Requests that share a prompt prefix go to the replica that served it before, where its KV
blocks are likely still cached; a prefix never seen goes to the least loaded replica.

The router remembers, for the chained hash of every full block of every prompt it routed, the
replica it sent that prompt to (the last one, should a prefix move). A new request follows its
longest remembered prefix, unless that replica holds `max_imbalance` more requests than the least
loaded one: then the prefix moves there (a hot prefix must not pin a whole load on one replica).
"""

from __future__ import annotations

from framework.router.base import Router, least_loaded
from framework.router.config import PrefixAffinityConfig


class PrefixAffinityRouter(Router):
    def __init__(self, replay_config=None, own_config: PrefixAffinityConfig | None = None, block_size: int = 16):
        self.block_size = block_size
        self.max_imbalance = (own_config or PrefixAffinityConfig()).max_imbalance
        self._owner: dict[int, int] = {}  # chained block hash -> replica index

    def block_hashes(self, prompt_token_ids) -> list[int]:
        """One hash per full block, each over the whole prefix up to that block's end."""
        hashes, previous = [], 0
        for end in range(self.block_size, len(prompt_token_ids) + 1, self.block_size):
            previous = hash((previous, tuple(prompt_token_ids[end - self.block_size : end])))
            hashes.append(previous)
        return hashes

    def route(self, prompt_token_ids, replicas) -> int:
        hashes = self.block_hashes(prompt_token_ids)
        emptiest = least_loaded(replicas)
        chosen = emptiest
        for block_hash in reversed(hashes):  # the longest remembered prefix
            if block_hash in self._owner:
                owner = self._owner[block_hash]
                if owner < len(replicas) and replicas[owner].num_requests - replicas[emptiest].num_requests <= self.max_imbalance:
                    chosen = owner
                break
        for block_hash in hashes:
            self._owner[block_hash] = chosen
        return chosen
