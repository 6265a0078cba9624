"""Server metrics in the Prometheus text format."""

from __future__ import annotations

import bisect
import threading

from framework.outputs import RequestOutput

TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets=TIME_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.n}')
        out += [f"{name}_sum {self.total}", f"{name}_count {self.n}"]
        return out


class ServerMetrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = {"ok": 0, "error": 0, "abort": 0}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram()
        self.tpot = Histogram()

    def record(self, out: RequestOutput, aborted: bool = False) -> None:
        """Count a finished request, or (`aborted`) the last output of one its client abandoned."""
        with self._lock:
            reasons = [c.finish_reason for c in out.outputs]
            kind = "error" if "error" in reasons else "abort" if aborted or "abort" in reasons else "ok"
            self.requests[kind] += 1
            self.prompt_tokens += len(out.prompt_token_ids)
            generated = sum(len(c.token_ids) for c in out.outputs)
            self.generation_tokens += generated
            m = out.metrics
            if "first_token_time" in m:
                self.ttft.observe(m["first_token_time"] - m["arrival_time"])
                per_output = max(1, generated - len(out.outputs))
                if "finish_time" in m and generated > len(out.outputs):
                    self.tpot.observe((m["finish_time"] - m["first_token_time"]) / per_output)

    def record_unstarted(self, prompt_tokens: int) -> None:
        """Count a request abandoned before its first output as aborted."""
        with self._lock:
            self.requests["abort"] += 1
            self.prompt_tokens += prompt_tokens

    def render(self, llm) -> str:
        executor = llm.executor
        stats, speculation = llm.kv_cache_stats, llm.speculation_stats
        running, waiting = executor.num_running(), executor.num_waiting()
        with self._lock:
            lines = [
                "# TYPE framework_requests_running gauge",
                f"framework_requests_running {running}",
                "# TYPE framework_requests_running_peak gauge",
                f"framework_requests_running_peak {executor.peak_running}",
                "# TYPE framework_requests_waiting gauge",
                f"framework_requests_waiting {waiting}",
                "# TYPE framework_kv_cache_usage_ratio gauge",
                f"framework_kv_cache_usage_ratio {stats.usage}",
                "# TYPE framework_kv_cache_free_blocks gauge",
                f"framework_kv_cache_free_blocks {stats.num_free_blocks}",
                "# TYPE framework_prefix_cache_hit_rate gauge",
                f"framework_prefix_cache_hit_rate {stats.prefix_hit_rate}",
                "# TYPE framework_engine_steps_total counter",
                f"framework_engine_steps_total {executor.num_steps}",
                "# TYPE framework_requests_total counter",
                *[f'framework_requests_total{{outcome="{k}"}} {v}' for k, v in self.requests.items()],
                "# TYPE framework_prompt_tokens_total counter",
                f"framework_prompt_tokens_total {self.prompt_tokens}",
                "# TYPE framework_generation_tokens_total counter",
                f"framework_generation_tokens_total {self.generation_tokens}",
                "# TYPE framework_spec_decode_verify_steps_total counter",
                f"framework_spec_decode_verify_steps_total {speculation.verify_steps}",
                "# TYPE framework_spec_decode_draft_tokens_total counter",
                f"framework_spec_decode_draft_tokens_total {speculation.draft_tokens}",
                "# TYPE framework_spec_decode_accepted_tokens_total counter",
                f"framework_spec_decode_accepted_tokens_total {speculation.accepted_tokens}",
                "# TYPE framework_spec_decode_acceptance_rate gauge",
                f"framework_spec_decode_acceptance_rate {speculation.acceptance_rate}",
                "# TYPE framework_time_to_first_token_seconds histogram",
                *self.ttft.lines("framework_time_to_first_token_seconds"),
                "# TYPE framework_time_per_output_token_seconds histogram",
                *self.tpot.lines("framework_time_per_output_token_seconds"),
            ]
        return "\n".join(lines) + "\n"


class Tally:
    """The engine requests of one HTTP request, each counted exactly once: when it finishes, or at
    `settle()` as aborted, with or without an output seen (its client went away, possibly before
    its first token)."""

    def __init__(self, metrics: ServerMetrics, prompt_lengths: list[int]):
        self.metrics = metrics
        self.prompt_lengths = prompt_lengths
        self.last: dict[int, RequestOutput] = {}
        self.open = set(range(len(prompt_lengths)))

    def see(self, i: int, out: RequestOutput) -> None:
        if i not in self.open:
            return
        self.last[i] = out
        if out.finished:
            self.open.discard(i)
            self.metrics.record(out)

    def settle(self) -> None:
        for i in sorted(self.open):
            if i in self.last:
                self.metrics.record(self.last[i], aborted=True)
            else:
                self.metrics.record_unstarted(self.prompt_lengths[i])
        self.open.clear()
