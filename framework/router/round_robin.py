"""Each request to the next replica in turn."""

from __future__ import annotations

from framework.router.base import Router


class RoundRobinRouter(Router):
    reads_loads = False

    def __init__(self, replay_config=None, own_config=None, block_size: int = 16):
        self._next = 0

    def route(self, prompt_token_ids, replicas) -> int:
        chosen = self._next % len(replicas)
        self._next = chosen + 1
        return chosen
