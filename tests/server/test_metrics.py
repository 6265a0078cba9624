"""ServerMetrics on its own: what a finished request adds to each counter and histogram, computed
by hand from its stamps, and one registry per instance (never prometheus_client's global one)."""

from __future__ import annotations

import prometheus_client
import pytest

from framework.outputs import CompletionOutput, RequestOutput
from framework.server.metrics import ServerMetrics


def finished(tokens: int, **stamps) -> RequestOutput:
    choice = CompletionOutput(index=0, text="x", token_ids=list(range(tokens)), finish_reason="length")
    return RequestOutput(request_id="r", prompt=None, prompt_token_ids=[1, 2, 3], outputs=[choice], finished=True, metrics=stamps)


def test_a_finished_request_feeds_queue_time_ttft_and_tpot_from_its_stamps():
    metrics = ServerMetrics()
    metrics.record(finished(5, arrival_time=10.0, first_scheduled_time=10.25, first_token_time=10.5, finish_time=11.5))
    metrics.record(finished(1, arrival_time=20.0, first_scheduled_time=22.0, first_token_time=23.0, finish_time=23.0))
    value = metrics.registry.get_sample_value
    assert value("framework_request_queue_time_seconds_count") == 2
    assert value("framework_request_queue_time_seconds_sum") == pytest.approx(0.25 + 2.0)
    assert value("framework_request_queue_time_seconds_bucket", {"le": "0.25"}) == 1  # le is inclusive
    assert value("framework_request_queue_time_seconds_bucket", {"le": "2.5"}) == 2
    assert value("framework_time_to_first_token_seconds_sum") == pytest.approx(0.5 + 3.0)
    assert value("framework_time_per_output_token_seconds_count") == 1  # one token: no time per output token
    assert value("framework_time_per_output_token_seconds_sum") == pytest.approx(1.0 / 4)
    assert value("framework_requests_total", {"outcome": "ok"}) == 2
    assert value("framework_generation_tokens_total") == 6


def test_requests_with_a_ttft_deadline_count_as_met_or_missed():
    metrics = ServerMetrics()
    metrics.record(finished(2, arrival_time=1.0, first_token_time=1.25), ttft_slo_ms=250)  # exactly on time
    metrics.record(finished(2, arrival_time=1.0, first_token_time=1.5), ttft_slo_ms=250)
    metrics.record(finished(2, arrival_time=1.0, first_token_time=9.0))  # no deadline: not counted
    metrics.record(finished(0, arrival_time=1.0), aborted=True, ttft_slo_ms=250)  # no first token: not counted
    value = metrics.registry.get_sample_value
    assert value("framework_ttft_slo_requests_total", {"outcome": "met"}) == 1
    assert value("framework_ttft_slo_requests_total", {"outcome": "missed"}) == 1


def test_a_request_never_scheduled_has_no_queue_time():
    metrics = ServerMetrics()
    metrics.record(finished(0, arrival_time=1.0), aborted=True)
    value = metrics.registry.get_sample_value
    assert value("framework_request_queue_time_seconds_count") == 0
    assert value("framework_requests_total", {"outcome": "abort"}) == 1


def test_each_instance_has_its_own_registry():
    first, second = ServerMetrics(), ServerMetrics()  # the same names twice: no "Duplicated timeseries" error
    first.record_unstarted(4)
    assert first.registry.get_sample_value("framework_prompt_tokens_total") == 4
    assert second.registry.get_sample_value("framework_prompt_tokens_total") == 0
    assert prometheus_client.REGISTRY.get_sample_value("framework_prompt_tokens_total") is None


def test_the_executor_stamps_first_admission_on_its_clock_and_counts_scheduler_passes():
    from framework.engine.clock import VirtualClock
    from framework.testing import FakeEngine, make_executor, req

    engine = FakeEngine()
    engine.clock = VirtualClock()
    executor = make_executor(engine=engine, max_batch_size=1)
    a, b = req("a", max_tokens=3), req("b", max_tokens=3)
    executor.enqueue(a)
    executor.enqueue(b)
    steps = 0
    while executor.has_work():
        executor.step()
        steps += 1
        engine.clock.advance(1.0)  # one second a step
    assert (a.first_scheduled_time, a.first_token_time) == (0.0, 0.0)  # admitted and prefilled at step 0
    assert (b.first_scheduled_time, b.first_token_time) == (3.0, 3.0)  # after a's three steps
    assert executor.counters.scheduler_passes == steps == 6
    assert executor.counters.scheduler_cpu_seconds > 0
