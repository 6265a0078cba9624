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

    @abstractmethod
    def describe(self) -> str:
        """One line for logs and reports: where the figures come from."""
