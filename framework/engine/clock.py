"""The engine's time. A real engine lives in wall-clock time; a simulated one (a cost model instead
of a forward) may keep a virtual clock that each step advances by its predicted duration, so a
whole day of traffic replays in seconds. Whoever stamps request times (the executor, the replay
driver) asks the engine's clock, never `time` directly."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod


class Clock(ABC):
    @abstractmethod
    def now(self) -> float:
        """Seconds on this clock (monotonic; the origin is arbitrary)."""

    @abstractmethod
    def advance(self, seconds: float) -> None:
        """Let `seconds` pass: a wall clock sleeps, a virtual clock jumps."""

    def sleep_until(self, when: float) -> None:
        """Wait until `now() >= when` (at once if it already is)."""
        self.advance(max(0.0, when - self.now()))


class WallClock(Clock):
    def now(self) -> float:
        return time.monotonic()

    def advance(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class VirtualClock(Clock):
    """Time that passes only when told to: a simulation runs as fast as its code does."""

    def __init__(self, start: float = 0.0):
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock cannot go back ({seconds} s)")
        self._now += seconds
