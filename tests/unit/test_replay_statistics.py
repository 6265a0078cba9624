"""Replay statistics against hand-computed cases (times in eighths of a second: exact in binary)."""

import pytest

from framework.replay.report import format_table, offered_rate
from framework.replay.statistics import RequestTiming, distribution_ms, summarize


def timings():
    a = RequestTiming(0.0, 10, 3, [0.125, 0.25, 0.5], finish=0.5)  # TTFT 125, TPOT 187.5, ITL 125 250
    b = RequestTiming(1.0, 20, 1, [1.5], finish=1.5, preemptions=2)  # TTFT 500, no TPOT, no ITL
    c = RequestTiming(2.0, 30, 4, [2.25, 2.375, 2.5, 2.625], finish=2.625)  # TTFT 250, TPOT 125, ITL 125 x3
    d = RequestTiming(3.0, 40, error="the prompt is empty")
    return [a, b, c, d]


def test_per_request_latencies():
    a, b, c, d = timings()
    assert (a.ttft, a.tpot, a.e2e, a.itls) == (0.125, 0.1875, 0.5, [0.125, 0.25])
    assert (b.ttft, b.tpot, b.e2e, b.itls) == (0.5, None, 0.5, [])
    assert (c.ttft, c.tpot, c.e2e) == (0.25, 0.125, 0.625)
    assert not d.completed and d.ttft is None and d.itls == []


def test_summary_counts_throughput_and_percentiles():
    s = summarize(timings(), duration=4.0)
    assert (s["requests"], s["completed"], s["failed"]) == (4, 3, 1)
    assert (s["input_tokens"], s["output_tokens"]) == (60, 8)
    assert s["request_throughput"] == 0.75 and s["output_throughput"] == 2.0
    assert s["preemptions"] == 2
    # numpy's linear interpolation: TTFT sorted 125, 250, 500; p90 sits at rank 1.8
    assert s["ttft_ms"] == pytest.approx({"mean": 875 / 3, "p50": 250, "p90": 450, "p99": 495})
    assert s["tpot_ms"] == pytest.approx({"mean": 156.25, "p50": 156.25, "p90": 181.25, "p99": 186.875})
    assert s["itl_ms"] == pytest.approx({"mean": 150, "p50": 125, "p90": 200, "p99": 245})
    assert s["e2e_ms"] == pytest.approx({"mean": 1625 / 3, "p50": 500, "p90": 600, "p99": 622.5})


@pytest.mark.parametrize(
    "ttft_ms, tpot_ms, met",
    [
        (None, None, 3),  # no SLO: every completed request counts, the failed one never
        (250, None, 2),  # a: 125 and c: 250 (on the bound) meet it, b: 500 does not
        (None, 125, 2),  # b has one token (no TPOT: meets it), c on the bound, a: 187.5 misses
        (250, 125, 1),  # only c meets both
        (100, None, 0),
    ],
)
def test_goodput_counts_requests_within_every_slo(ttft_ms, tpot_ms, met):
    s = summarize(timings(), duration=4.0, ttft_ms=ttft_ms, tpot_ms=tpot_ms)
    assert s["slo"] == {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms, "met": met}
    assert s["goodput"] == met / 4.0


def test_no_samples_and_one_sample():
    assert distribution_ms([]) == {"mean": None, "p50": None, "p90": None, "p99": None}
    assert distribution_ms([0.5]) == {"mean": 500, "p50": 500, "p90": 500, "p99": 500}
    s = summarize([RequestTiming(0.0, 5, error="refused")], duration=0.0)
    assert s["completed"] == 0 and s["goodput"] is None and s["ttft_ms"]["p90"] is None


def test_offered_rate_and_table():
    assert offered_rate([0.0, 1.0, 2.0, 4.0]) == 0.75
    assert offered_rate([3.0]) is None
    s = summarize(timings(), duration=4.0, ttft_ms=250)
    table = format_table({"statistics": {**s, "prefix_hit_rate": 0.5, "peak_waiting": 3, "peak_kv_cache_usage": 0.25}})
    assert "3 completed, 1 failed" in table and "2 requests met the SLO: ttft <= 250 ms" in table
    assert "TTFT" in table and "450.0" in table
    assert "prefix hit rate: 50.0%; peak waiting: 3; peak KV cache use: 25.0%" in table


def test_timelines_are_thinned_to_a_bound():
    from framework.replay.driver import Timeline

    line = Timeline(list(range(10)), list(range(10)), [0] * 10, [0.5] * 10)
    assert line.thinned(4) == {"time": [0, 3, 6, 9], "running": [0, 3, 6, 9], "waiting": [0] * 4, "kv_cache_usage": [0.5] * 4}
    assert line.thinned(20)["time"] == list(range(10))
