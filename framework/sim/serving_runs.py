"""The profile's serving runs: the real engine serves a workload while each of its steps is timed,
so the cost model is fitted to the steps serving makes as well as to the grid's. A served engine
steps at batch sizes that come and go, beside prompt chunks of every length, and where a backend
keeps graphs of decode steps some steps run eagerly or record one; the grid times none of that.

A burst first (every request at once) measures the engine's capacity in requests per second; then
the same requests arrive as a Poisson process at each of `profile.serving_loads` times that
capacity. The requests come from the `replay` config (its lengths, or its trace's), so a profile
is taken for the workload it will simulate.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np
from omegaconf import OmegaConf

from framework.replay.arrivals import arrival_times
from framework.replay.driver import replay
from framework.replay.workload import build_workload
from framework.router.round_robin import RoundRobinRouter
from framework.sim.step_shape import StepShape

Sample = tuple[StepShape, float]


class TimedSteps:
    """The LLM as the replay driver sees it, with each step that computed something timed."""

    def __init__(self, llm, timed_step: Callable):
        self._llm, self._timed_step = llm, timed_step
        self.samples: list[Sample] = []

    def step(self):
        shape, seconds, outputs = self._timed_step(self._llm.step)
        if shape is not None:
            self.samples.append((shape, seconds))
        return outputs

    def __getattr__(self, name):
        return getattr(self._llm, name)


def serving_samples(llm, settings, timed_step: Callable, reset: Callable[[], None], progress: Callable[[str], None]) -> tuple[list[Sample], dict]:
    """(samples, what was run) of the serving runs `settings` (the `profile` config) asks for.
    `timed_step(step)` runs `step` as the engine's timed step, returning (shape, seconds, its
    result); `reset` empties the prefix cache between runs."""
    from framework.replay.runner import prompt_token_ids

    if settings.serving_requests <= 0:
        return [], {}
    replay_config = OmegaConf.merge(llm.config.replay, {"num_requests": settings.serving_requests, "seed": settings.seed})
    requests = build_workload(replay_config, prompt_token_ids(llm, replay_config.vocab_size)).requests
    rng = np.random.default_rng(settings.seed)
    samples: list[Sample] = []

    def run(arrivals: np.ndarray) -> tuple[int, float, int]:
        reset()
        timed = TimedSteps(llm, timed_step)
        timed_requests = [replace(r, arrival=t) for r, t in zip(requests, arrivals.tolist())]
        result = replay([timed], timed_requests, RoundRobinRouter(), progress=False)
        samples.extend(timed.samples)
        done = sum(t.finish is not None and t.error is None for t in result.timings)
        return done, result.duration, len(timed.samples)

    done, seconds, steps = run(np.zeros(len(requests)))
    capacity = done / seconds if seconds > 0 else 0.0
    progress(f"serving: {len(requests)} requests at once: {capacity:.2f} req/s ({steps} steps)")
    if capacity <= 0:
        return samples, {"requests": len(requests), "capacity": capacity}
    for load in settings.serving_loads:
        rate = load * capacity
        _, _, steps = run(arrival_times(len(requests), rate, "poisson", 1.0, rng))
        progress(f"serving: Poisson arrivals at {load:.0%} of that ({rate:.2f} req/s): {steps} steps")
    return samples, {"requests": len(requests), "capacity": capacity, "loads": list(settings.serving_loads)}
