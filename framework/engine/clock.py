"""The engine's time. A real engine lives in wall-clock time; a simulated one (a cost model instead
of a forward) may keep a virtual clock that each step advances by its predicted duration, so a
whole day of traffic replays in seconds. Whoever stamps request times (the executor, the replay
driver) asks the engine's clock, never `time` directly."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from itertools import accumulate


class Clock(ABC):
    @abstractmethod
    def now(self) -> float:
        """Seconds on this clock (monotonic; the origin is arbitrary)."""

    @abstractmethod
    def advance(self, seconds: float) -> None:
        """Let `seconds` pass: a wall clock sleeps, a virtual clock jumps."""

    def advance_each(self, seconds: list[float]) -> list[float]:
        """`advance` by each of `seconds` in turn; the times after each."""
        times = []
        for step in seconds:
            self.advance(step)
            times.append(self.now())
        return times

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
        # when the next outside event (an arrival) is due, set by whoever drives the clock (the
        # replay driver; inf: none is coming); None: unknown. A simulated engine runs several
        # steps in one only while they start before it.
        self.horizon: float | None = None

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock cannot go back ({seconds} s)")
        self._now += seconds

    def advance_each(self, seconds):
        if any(step < 0 for step in seconds):
            raise ValueError(f"a clock cannot go back ({min(seconds)} s)")
        times = list(accumulate(seconds, initial=self._now))[1:]  # (the same additions, in order)
        self._now = times[-1] if times else self._now
        return times
