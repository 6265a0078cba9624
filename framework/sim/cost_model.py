"""The cost model seam: seconds a step of a given shape takes."""

from __future__ import annotations

from abc import ABC, abstractmethod

from framework.sim.step_shape import StepShape


class CostModel(ABC):
    # True where the figures come from a description of hardware, not from timing it: reports
    # label them as predictions
    is_prediction: bool = False

    @abstractmethod
    def step_seconds(self, shape: StepShape) -> float:
        """The duration of one whole engine step of this shape (scheduling, forward, decoding)."""

    def decode_steps_seconds(self, batch: int, contexts) -> list[float]:
        """The durations of decode steps of `batch` requests (a token each) whose caches hold
        `contexts[j]` tokens in all at step j (each token attends its whole context): what
        `step_seconds` gives each, computed at once (a model with a faster way overrides this)."""
        return [self.step_seconds(StepShape(batch, batch, int(c), int(c), batch)) for c in contexts]

    @abstractmethod
    def describe(self) -> str:
        """One line for logs and reports: where the figures come from."""
