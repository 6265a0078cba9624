"""Each request to the replica holding the fewest requests (running and waiting)."""

from __future__ import annotations

from framework.router.base import Router, least_loaded


class LeastLoadedRouter(Router):
    def __init__(self, replay_config=None, own_config=None, block_size: int = 16):
        pass

    def route(self, prompt_token_ids, replicas) -> int:
        return least_loaded(replicas)
