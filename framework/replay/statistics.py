"""From per-request timings to a run's statistics. All times are seconds on the driver's clock,
counted from the start of the replay; reported latencies are milliseconds.

- TTFT: first token - arrival.   e2e: last token - arrival.
- TPOT (per request): (e2e - TTFT) / (output tokens - 1); requests of one token have none.
- ITL: every gap between consecutive token arrivals of a request (a step, or a stream chunk, that
  brings several tokens at once is one arrival).
- goodput: completed requests that meet every SLO set, per second of the run.
- short requests: completed ones whose prompt + output tokens lie below the median of the
  completed requests' (long: at or above it).
- per tenant (and per priority): its requests' statistics, its share of the output tokens over the
  run, and its share of those made while every tenant was backlogged (had a request waiting for
  its first token: from arrival to first token, the step that makes it included).
"""

from __future__ import annotations

import bisect
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
    tenant: str | None = None
    priority: int | None = None
    token_counts: list[int] = field(default_factory=list)  # tokens per arrival; empty: not known (a stream's chunks)

    def add_tokens(self, count: int, now: float) -> None:
        if count > 0:
            self.output_tokens += count
            self.token_times.append(now)
            self.token_counts.append(count)

    def add_token_times(self, times: list[float]) -> None:
        """One token at each of `times`."""
        self.output_tokens += len(times)
        self.token_times += times
        self.token_counts += [1] * len(times)

    def tokens_per_arrival(self) -> list[float]:
        """Tokens each arrival brought: as counted, else the output spread evenly over the arrivals."""
        if len(self.token_counts) == len(self.token_times):
            return list(self.token_counts)
        return [self.output_tokens / len(self.token_times)] * len(self.token_times)

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
        "by_length": by_length(done),
        **{key: value for name, attribute in GROUPINGS.items() for key, value in cut_by(name, attribute, timings, duration, ttft_ms, tpot_ms).items()},
    }


def by_length(done: list[RequestTiming]) -> dict:
    """TTFT of the short requests (prompt + output tokens below the median of `done`'s) and of the
    long ones (the rest)."""
    sizes = [t.prompt_len + t.output_tokens for t in done]
    median = float(np.median(sizes)) if sizes else None
    short = [t for t, size in zip(done, sizes) if size < median]
    long = [t for t, size in zip(done, sizes) if size >= median]
    return {
        "median_tokens": median,
        "short": {"requests": len(short), "ttft_ms": distribution_ms(t.ttft for t in short)},
        "long": {"requests": len(long), "ttft_ms": distribution_ms(t.ttft for t in long)},
    }


GROUPINGS = {"tenants": "tenant", "priorities": "priority"}  # statistics key -> RequestTiming attribute


def cut_by(name: str, attribute: str, timings: list[RequestTiming], duration: float, ttft_ms=None, tpot_ms=None) -> dict:
    """Statistics per value of `attribute` (keys are strings, "-" for unset), under `name`, and
    how long every group was backlogged at once, under "all_<name>_backlogged_s"; nothing when no
    request sets the attribute."""
    groups: dict[str, list[RequestTiming]] = {}
    for t in timings:
        value = getattr(t, attribute)
        groups.setdefault("-" if value is None else str(value), []).append(t)
    if list(groups) == ["-"]:
        return {}
    contended = all_backlogged([backlog(members) for members in groups.values()]) if len(groups) > 1 else []
    served = {key: tokens_within(members, contended) for key, members in groups.items()}
    total_served = sum(served.values())
    total_output = sum(t.output_tokens for t in timings if t.completed)
    stats = {}
    for key, members in sorted(groups.items()):
        done = [t for t in members if t.completed]
        output = sum(t.output_tokens for t in done)
        stats[key] = {
            "requests": len(members),
            "completed": len(done),
            "output_tokens": output,
            "output_share": output / total_output if total_output else None,
            "backlogged_share": served[key] / total_served if total_served else None,
            "goodput": sum(t.meets(ttft_ms, tpot_ms) for t in done) / duration if duration > 0 else None,
            "ttft_ms": distribution_ms(t.ttft for t in done),
        }
    return {name: stats, f"all_{name}_backlogged_s": sum(end - start for start, end in contended)}


def backlog(timings: list[RequestTiming]) -> list[tuple[float, float]]:
    """When some request of `timings` waited for its first token: the union of their intervals
    (arrival, first token], as disjoint intervals in order."""
    merged: list[list[float]] = []
    for start, end in sorted((t.arrival, t.token_times[0]) for t in timings if t.completed):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        elif end > start:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


def all_backlogged(backlogs: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """The intervals that lie in every one of `backlogs` (each disjoint and in order)."""
    common = backlogs[0]
    for other in backlogs[1:]:
        both, i, j = [], 0, 0
        while i < len(common) and j < len(other):
            start, end = max(common[i][0], other[j][0]), min(common[i][1], other[j][1])
            if start < end:
                both.append((start, end))
            if common[i][1] < other[j][1]:
                i += 1
            else:
                j += 1
        common = both
    return common


def tokens_within(timings: list[RequestTiming], intervals: list[tuple[float, float]]) -> float:
    """Output tokens of the completed `timings` that arrived inside one of `intervals` ((start, end],
    disjoint, in order)."""
    starts = [start for start, _ in intervals]
    total = 0.0
    for t in timings:
        if not t.completed:
            continue
        for time, count in zip(t.token_times, t.tokens_per_arrival()):
            i = bisect.bisect_left(starts, time) - 1
            if i >= 0 and time <= intervals[i][1]:
                total += count
    return total
