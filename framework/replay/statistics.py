"""From per-request timings to a run's statistics. All times are seconds on the driver's clock,
counted from the start of the replay; reported latencies are milliseconds.

- TTFT: first token - arrival.   e2e: last token - arrival.
- TPOT (per request): (e2e - TTFT) / (output tokens - 1); requests of one token have none.
- ITL: every gap between consecutive token arrivals of a request (a step, or a stream chunk, that
  brings several tokens at once is one arrival).
- goodput: completed requests that meet every SLO set, per second of the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestTiming:
    arrival: float
    prompt_len: int
    output_tokens: int = 0
    token_times: list[float] = field(default_factory=list)  # one per arrival of new tokens
    finish: float | None = None
    preemptions: int = 0
    error: str | None = None

    def add_tokens(self, count: int, now: float) -> None:
        if count > 0:
            self.output_tokens += count
            self.token_times.append(now)

    @property
    def completed(self) -> bool:
        return self.error is None and self.finish is not None and self.output_tokens > 0

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival if self.completed else None

    @property
    def e2e(self) -> float | None:
        return self.token_times[-1] - self.arrival if self.completed else None

    @property
    def tpot(self) -> float | None:
        if not self.completed or self.output_tokens < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return np.diff(self.token_times).tolist() if self.completed else []

    def meets(self, ttft_ms: float | None, tpot_ms: float | None) -> bool:
        """Completed within both SLOs (an unset one always holds; TPOT holds for one token)."""
        if not self.completed:
            return False
        if ttft_ms is not None and self.ttft * 1000 > ttft_ms:
            return False
        return tpot_ms is None or self.tpot is None or self.tpot * 1000 <= tpot_ms


def distribution_ms(seconds) -> dict:
    """mean and the percentiles (numpy's linear interpolation) of `seconds`, in milliseconds;
    None for each when there is no sample."""
    values = np.asarray(list(seconds), dtype=float) * 1000
    keys = ["mean", *(f"p{p}" for p in PERCENTILES)]
    if values.size == 0:
        return dict.fromkeys(keys)
    return dict(zip(keys, [float(values.mean()), *(float(v) for v in np.percentile(values, PERCENTILES))]))


def summarize(timings: list[RequestTiming], duration: float, ttft_ms: float | None = None, tpot_ms: float | None = None) -> dict:
    """The run's statistics; `duration` is the run's length in seconds (its start to the last finish)."""
    done = [t for t in timings if t.completed]
    per_second = (lambda count: count / duration) if duration > 0 else (lambda count: None)
    output_tokens = sum(t.output_tokens for t in done)
    good = sum(t.meets(ttft_ms, tpot_ms) for t in done)
    return {
        "requests": len(timings),
        "completed": len(done),
        "failed": len(timings) - len(done),
        "duration_s": duration,
        "input_tokens": sum(t.prompt_len for t in done),
        "output_tokens": output_tokens,
        "request_throughput": per_second(len(done)),
        "output_throughput": per_second(output_tokens),
        "goodput": per_second(good),
        "slo": {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms, "met": good},
        "ttft_ms": distribution_ms(t.ttft for t in done),
        "tpot_ms": distribution_ms(t.tpot for t in done if t.tpot is not None),
        "itl_ms": distribution_ms(gap for t in done for gap in t.itls),
        "e2e_ms": distribution_ms(t.e2e for t in done),
        "preemptions": sum(t.preemptions for t in timings),
    }
