"""Runs of decode steps as one scheduler pass: `speculative=decode_runs`, for `engine=sim` on a
virtual clock (a replay turns it on by itself, `replay.decode_runs`).

Between two outside events a busy simulated engine mostly repeats one step: the same requests
each decode a token, nothing queued, nothing mid-prompt, nothing arriving. Each such step costs
the simulator its whole host path (executor, schedulers, KV cache manager, decoder) to move the
clock a few milliseconds. This drafter folds a run of k of them into one: every request gets k-1
drafts of the sim engine's own token (so all are accepted), the real schedulers and KV cache
manager schedule and allocate the k tokens in one pass, and the sim engine advances its clock by
the k steps' predicted durations one after another, each token stamped with the end of its own
step (`SimModelEngine.run_step_ends`). A run stops where stepping one at a time would do
anything else:

- before the first step that would start at or after the clock's horizon (the next arrival);
- at the first token that may finish a request (max_tokens, the model's length, the sim's EOS);
- within the step's token budget and the pool's free blocks (a scheduler that preempts for
  blocks must not see the run's blocks asked for early);

and only while every active request decodes and all fit one step. So a replay times the same
with and without runs (tests/sim/test_decode_runs.py); it only takes fewer steps.
"""

from __future__ import annotations

import logging

import numpy as np

from framework.drafter.base import Drafter
from framework.engine.clock import VirtualClock
from framework.scheduler.base import is_decoding

logger = logging.getLogger(__name__)


class DecodeRunDrafter(Drafter):
    """A run is at most `speculative.num_tokens` + 1 steps of at most `speculative.max_batch_size`
    requests (a replay sets them to the scheduler's budgets)."""

    def __init__(self, speculative_config, config=None, context=None):
        super().__init__(speculative_config, config, context)
        from framework.engine.sim_engine import SimModelEngine

        engine = context.target if context is not None else None
        self.engine = engine if isinstance(engine, SimModelEngine) else None
        if self.engine is None:
            logger.warning("speculative=decode_runs folds simulated steps only; %s runs one step at a time", type(engine).__name__)
        scheduler = context.scheduler if context is not None else None
        self.max_batch_size = min(self.max_batch_size, scheduler.max_batch_size) if scheduler is not None else self.max_batch_size
        self.max_num_tokens = scheduler.max_num_tokens if scheduler is not None else self.num_tokens + 1

    def propose(self, requests):
        pass  # (`propose_step` sees the whole step)

    def propose_step(self, live, kv_cache) -> None:
        if self.engine is None:
            return
        seconds = self._run(live, kv_cache)
        for request in live if len(seconds) > 1 else ():
            request.draft_token_ids = [self.engine.token_id] * (len(seconds) - 1)
        self.engine.expect_run(live if len(seconds) > 1 else [], seconds)

    def _run(self, live, kv_cache) -> list[float]:
        """The predicted seconds of each step that stepping one at a time would take just as
        this one (one step or none: no run)."""
        clock = self.engine.clock
        if not isinstance(clock, VirtualClock) or clock.horizon is None or clock.now() >= clock.horizon:
            return []
        if not live or len(live) > min(self.max_batch_size, self.max_num_tokens) or not all(map(is_decoding, live)):
            return []
        steps = min(self.num_tokens + 1, self.max_num_tokens // len(live), *(self._steps_left(r) for r in live))
        steps = self._within_free_blocks(live, kv_cache, steps)
        return self._before_horizon(live, steps, clock)

    def _steps_left(self, request) -> int:
        """Steps until the first one whose token may finish the request (that one included)."""
        params, produced = request.sampling_params, len(request.output_token_ids)
        left = min(params.max_tokens - produced, self.engine.max_model_len - request.num_tokens)
        if self.engine.token_id in params.stop_token_ids or params.stop:
            return 1  # (stop strings: the text decides, token by token)
        if not params.ignore_eos and request.eos_token_ids:
            left = min(left, self.engine.eos_after - produced)
        return max(1, left)

    @staticmethod
    def _within_free_blocks(live, kv_cache, steps: int) -> int:
        """The most steps (up to `steps`) whose tokens the pool's free blocks hold for every request."""
        free, fits, most = kv_cache.num_free_blocks, 1, steps
        while fits < most:  # (bisect: the blocks needed grow with the steps)
            mid = (fits + most + 1) // 2
            if sum(kv_cache.blocks_needed(r, mid) for r in live) <= free:
                fits = mid
            else:
                most = mid - 1
        return fits

    def _before_horizon(self, live, steps: int, clock) -> list[float]:
        """The seconds of the steps (up to `steps`) that start before the horizon."""
        seconds = self.engine.decode_step_seconds([r.num_computed_tokens for r in live], steps)
        starts = np.add.accumulate([clock.now(), *seconds[:-1]])  # (the clock's own additions, in order)
        return seconds[: int(np.searchsorted(starts, clock.horizon))]
