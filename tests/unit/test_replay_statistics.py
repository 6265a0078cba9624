"""Replay statistics against hand-computed cases (times in eighths of a second: exact in binary)."""

import pytest

from framework.replay.report import format_table, offered_rate
from framework.replay.statistics import RequestTiming, all_backlogged, backlog, distribution_ms, summarize, tokens_within


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


def test_short_requests_lie_below_the_median_length():
    # prompt + output: a 13, b 21, c 34; the median is 21, so only a is short
    lengths = summarize(timings(), duration=4.0)["by_length"]
    assert lengths["median_tokens"] == 21
    assert lengths["short"] == {"requests": 1, "ttft_ms": {"mean": 125, "p50": 125, "p90": 125, "p99": 125}}
    assert lengths["long"]["requests"] == 2  # b at the median, and c
    assert lengths["long"]["ttft_ms"] == pytest.approx({"mean": 375, "p50": 375, "p90": 475, "p99": 497.5})
    same = [RequestTiming(0.0, 8, 2, [0.5, 1.0], finish=1.0)] * 3
    assert summarize(same, duration=1.0)["by_length"]["short"] == {"requests": 0, "ttft_ms": distribution_ms([])}


def tenant_timings():
    """Tenant a is backlogged over (0, 0.5] and (0.25, 1.5], so (0, 1.5]; b over (0.25, 0.75] and
    (1, 2]: both are backlogged in (0.25, 0.75] and (1, 1.5], 1 s in all."""
    return [
        RequestTiming(0.0, 10, 3, [0.5, 0.75, 1.0], finish=1.0, tenant="a", priority=0, token_counts=[1, 1, 1]),
        RequestTiming(0.25, 10, 2, [1.5, 1.75], finish=1.75, tenant="a", priority=0, token_counts=[1, 1]),
        RequestTiming(0.25, 20, 4, [0.75, 1.0, 1.25], finish=1.25, tenant="b", token_counts=[1, 2, 1]),
        RequestTiming(1.0, 20, 1, [2.0], finish=2.0, tenant="b", token_counts=[1]),
        RequestTiming(1.5, 20, tenant="b", error="refused"),
    ]


def test_backlogged_intervals_are_unions_then_intersections():
    a, b = tenant_timings()[:2], tenant_timings()[2:]
    assert backlog(a) == [(0.0, 1.5)] and backlog(b) == [(0.25, 0.75), (1.0, 2.0)]
    both = all_backlogged([backlog(a), backlog(b)])
    assert both == [(0.25, 0.75), (1.0, 1.5)]
    # intervals are (start, end]: a token at 1.0 lies in neither
    assert tokens_within(a, both) == 3  # 0.5, 0.75 and 1.5
    assert tokens_within(b, both) == 2  # 0.75 and 1.25; the two tokens at 1.0 and the one at 2.0 lie outside


def test_per_tenant_statistics():
    s = summarize(tenant_timings(), duration=4.0, ttft_ms=600)
    assert s["all_tenants_backlogged_s"] == 1.0
    a, b = s["tenants"]["a"], s["tenants"]["b"]
    assert (a["requests"], a["completed"], a["output_tokens"], b["requests"], b["completed"], b["output_tokens"]) == (2, 2, 5, 3, 2, 5)
    assert (a["output_share"], b["output_share"]) == (0.5, 0.5)
    assert (a["backlogged_share"], b["backlogged_share"]) == (0.6, 0.4)
    assert a["goodput"] == b["goodput"] == 0.25  # TTFTs: a 500, 1250; b 500, 1000
    assert a["ttft_ms"]["p90"] == pytest.approx(1175) and b["ttft_ms"]["p90"] == pytest.approx(950)
    # priorities: a's requests set 0, b's none ("-"); the same partition, so the same shares
    assert set(s["priorities"]) == {"-", "0"} and s["priorities"]["0"]["backlogged_share"] == 0.6
    assert "tenants" not in summarize(timings(), duration=4.0) and "priorities" not in summarize(timings(), duration=4.0)


def test_one_tenant_is_never_contended_and_unknown_counts_spread_evenly():
    alone = summarize([RequestTiming(0.0, 5, 2, [0.5, 1.0], finish=1.0, tenant="a")], duration=1.0)
    assert alone["all_tenants_backlogged_s"] == 0 and alone["tenants"]["a"]["backlogged_share"] is None
    assert alone["tenants"]["a"]["output_share"] == 1.0
    assert RequestTiming(0.0, 5, 4, [1.0, 2.0], finish=2.0).tokens_per_arrival() == [2.0, 2.0]  # a stream's chunks
    counted = RequestTiming(0.0, 5)
    counted.add_tokens(3, 1.0)
    counted.add_tokens(1, 2.0)
    assert counted.tokens_per_arrival() == [3, 1] and counted.output_tokens == 4


def test_the_table_shows_short_requests_and_tenants():
    s = summarize(tenant_timings(), duration=4.0, ttft_ms=600)
    table = format_table({"statistics": {**s, "prefix_hit_rate": None, "peak_waiting": None, "peak_kv_cache_usage": None}})
    # prompt + output: a 13 and 12, b 24 and 21 (completed): median 17, so a's are the short ones
    assert "TTFT p90 of short requests (prompt + output < 17 tokens): 1175.0 ms (2); of the others: 950.0 ms (2)" in table
    assert "while every tenant had a request waiting, 1.00 s" in table
    assert [line.split()[:5] for line in table.splitlines() if line.startswith(("a ", "b "))] == [
        ["a", "2", "50.0%", "60.0%", "1175.0"], ["b", "3", "50.0%", "40.0%", "950.0"],
    ]
