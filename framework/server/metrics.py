"""Server metrics in the Prometheus text format, through prometheus_client.

Each `ServerMetrics` (one per app) has a `CollectorRegistry` of its own, never the process-wide
default one, so several servers or tests in one process do not collide. Counts of HTTP requests are
prometheus_client counters and histograms fed as requests finish; the engine's figures are read
from the LLM (its executor, KV cache and counters) at scrape time by `EngineCollector`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from framework.outputs import RequestOutput

TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
OUTCOMES = ("ok", "error", "abort")


class EngineCollector:
    """The engine's gauges and counters, read from `llm` when /metrics is scraped."""

    def __init__(self, llm):
        self.llm = llm

    def collect(self):
        llm, executor = self.llm, self.llm.executor
        stats, speculation, counters = llm.kv_cache_stats, llm.speculation_stats, executor.counters
        gauges = [
            ("framework_requests_running", "requests in prefill or decode", executor.num_running()),
            ("framework_requests_running_peak", "the most requests computed in one step since start", executor.peak_running),
            ("framework_requests_waiting", "requests queued or not yet picked up by a step", executor.num_waiting()),
            ("framework_kv_cache_usage_ratio", "KV blocks referenced by running requests / all blocks", stats.usage),
            ("framework_kv_cache_free_blocks", "KV blocks allocatable now, cached prefix blocks included", stats.num_free_blocks),
            ("framework_prefix_cache_hit_rate", "prompt tokens found in the prefix cache / prompt tokens looked up", stats.prefix_hit_rate),
            ("framework_spec_decode_acceptance_rate", "accepted / verified draft tokens", speculation.acceptance_rate),
        ]
        totals = [
            ("framework_engine_steps", "engine steps that ran a batch", executor.num_steps),
            ("framework_scheduler_cpu_seconds", "CPU time of the executor thread in the capacity and micro-batch schedulers", counters.scheduler_cpu_seconds),
            ("framework_scheduler_passes", "scheduling passes (steps with active requests)", counters.scheduler_passes),
            ("framework_spec_decode_verify_steps", "request-steps that verified draft tokens", speculation.verify_steps),
            ("framework_spec_decode_draft_tokens", "draft tokens verified", speculation.draft_tokens),
            ("framework_spec_decode_accepted_tokens", "draft tokens accepted", speculation.accepted_tokens),
        ]
        for name, documentation, value in gauges:
            yield GaugeMetricFamily(name, documentation, value=value)
        for name, documentation, value in totals:
            yield CounterMetricFamily(name, documentation, value=value)


class ServerMetrics:
    """The HTTP requests' counters and histograms, and (given an `llm`) the engine's figures."""

    def __init__(self, llm=None):
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter("framework_requests", "finished requests by outcome", ["outcome"], registry=registry)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # every outcome is exposed from the start, at 0
        self.prompt_tokens = Counter("framework_prompt_tokens", "prompt tokens of counted requests", registry=registry)
        self.generation_tokens = Counter("framework_generation_tokens", "generated tokens of counted requests", registry=registry)
        self.ttft = Histogram(
            "framework_time_to_first_token_seconds", "engine request created -> first token", buckets=TIME_BUCKETS, registry=registry
        )
        self.tpot = Histogram(
            "framework_time_per_output_token_seconds", "(finish - first token) / later tokens", buckets=TIME_BUCKETS, registry=registry
        )
        self.queue_time = Histogram(
            "framework_request_queue_time_seconds", "engine request created -> first admitted by the scheduler", buckets=TIME_BUCKETS, registry=registry
        )
        self.ttft_slo = Counter(
            "framework_ttft_slo_requests", "requests with a ttft_slo_ms that got a first token, by whether it came in time", ["outcome"], registry=registry
        )
        for outcome in ("met", "missed"):
            self.ttft_slo.labels(outcome)
        if llm is not None:
            registry.register(EngineCollector(llm))

    def record(self, out: RequestOutput, aborted: bool = False, ttft_slo_ms: float | None = None) -> None:
        """Count a finished request, or (`aborted`) the last output of one its client abandoned;
        `ttft_slo_ms`: its deadline for the first token, if it set one."""
        reasons = [c.finish_reason for c in out.outputs]
        self.requests.labels("error" if "error" in reasons else "abort" if aborted or "abort" in reasons else "ok").inc()
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        generated = sum(len(c.token_ids) for c in out.outputs)
        self.generation_tokens.inc(generated)
        m = out.metrics
        if "first_scheduled_time" in m:
            self.queue_time.observe(m["first_scheduled_time"] - m["arrival_time"])
        if "first_token_time" in m:
            ttft = m["first_token_time"] - m["arrival_time"]
            self.ttft.observe(ttft)
            if ttft_slo_ms is not None:
                self.ttft_slo.labels("met" if ttft * 1000 <= ttft_slo_ms else "missed").inc()
            if "finish_time" in m and generated > len(out.outputs):
                self.tpot.observe((m["finish_time"] - m["first_token_time"]) / (generated - len(out.outputs)))

    def record_unstarted(self, prompt_tokens: int) -> None:
        """Count a request abandoned before its first output as aborted."""
        self.requests.labels("abort").inc()
        self.prompt_tokens.inc(prompt_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Tally:
    """The engine requests of one HTTP request, each counted exactly once: when it finishes, or at
    `settle()` as aborted, with or without an output seen (its client went away, possibly before
    its first token)."""

    def __init__(self, metrics: ServerMetrics, prompt_lengths: list[int], ttft_slo_ms: float | None = None):
        self.metrics = metrics
        self.prompt_lengths = prompt_lengths
        self.ttft_slo_ms = ttft_slo_ms
        self.last: dict[int, RequestOutput] = {}
        self.open = set(range(len(prompt_lengths)))

    def see(self, i: int, out: RequestOutput) -> None:
        if i not in self.open:
            return
        self.last[i] = out
        if out.finished:
            self.open.discard(i)
            self.metrics.record(out, ttft_slo_ms=self.ttft_slo_ms)

    def settle(self) -> None:
        for i in sorted(self.open):
            if i in self.last:
                self.metrics.record(self.last[i], aborted=True, ttft_slo_ms=self.ttft_slo_ms)
            else:
                self.metrics.record_unstarted(self.prompt_lengths[i])
        self.open.clear()
