"""The `sjf` and `fair` capacity policies: exact decisions against the real paged KV cache manager
(blocks of 4 tokens), and whole runs through the real executor on the fake engine, each beside the
arrival-order policy (`guaranteed_no_evict`) that does the opposite on the same requests."""

from __future__ import annotations

import pytest

from framework.scheduler.fair import FairConfig, FairShareScheduler
from framework.scheduler.sjf import ShortestJobFirstScheduler, SJFConfig, remaining_work
from framework.testing import ids, make_executor, make_scheduler, req, run_to_completion, start, tiny_kv_cache


def sjf(aging: float = 16.0, **budgets):
    return make_scheduler(ShortestJobFirstScheduler, SJFConfig(aging=aging), **budgets)


def fair(**budgets):
    return make_scheduler(FairShareScheduler, FairConfig(), **budgets)


def first_admitted(trace, request_id: str) -> int:
    return next(i for i, step in enumerate(trace.steps) if request_id in step.fitting)


# ---- sjf ----------------------------------------------------------------------------------------


def test_remaining_work_counts_uncached_prompt_and_allowed_outputs():
    kv = tiny_kv_cache(64)
    request = req("a", prompt_len=8, max_tokens=5)
    assert remaining_work(request) == 13
    start(kv, request)  # prompt computed, first token out (not yet in the cache)
    assert remaining_work(request) == 5


def test_sjf_serves_a_short_request_before_a_long_one_that_arrived_earlier():
    def run(capacity):
        requests = [req("long", prompt_len=8, max_tokens=40), req("short", prompt_len=8, max_tokens=2)]
        return run_to_completion(make_executor(capacity=capacity, max_batch_size=1), requests)

    assert run(sjf(max_batch_size=1)).finished == ["short", "long"]
    assert run(None).finished == ["long", "short"]  # guaranteed_no_evict: arrival order


def test_sjf_orders_the_running_requests_too():
    kv = tiny_kv_cache(128)
    long, short = req("long", prompt_len=8, max_tokens=20), req("short", prompt_len=8, max_tokens=3)
    start(kv, long, short)
    assert ids(sjf(aging=0).schedule([long, short], kv).fitting) == ["short", "long"]


def test_sjf_admits_the_shortest_queued_while_blocks_fit_and_the_head_blocks_the_rest():
    kv = tiny_kv_cache(40)  # 10 blocks
    a, b, c = req("a", prompt_len=8, max_tokens=20), req("b", prompt_len=8, max_tokens=4), req("c", prompt_len=4, max_tokens=12)
    # work: a 28 (7 blocks), b 12 (3 blocks), c 16 (4 blocks): b, then c (7 blocks in all); a would need 7 more
    out = sjf().schedule([a, b, c], kv)
    assert ids(out.fitting) == ["b", "c"] and out.preempted == []


def test_aging_bounds_how_long_a_long_request_waits_behind_a_stream_of_short_ones():
    aging, stream_steps = 4.0, 60
    work_long, work_short = 8 + 40, 4 + 1

    def run(aging):
        arrivals = {0: [req("long", prompt_len=8, max_tokens=40)]}
        for step in range(stream_steps):  # one short request a step, each done in one step
            arrivals.setdefault(step, []).append(req(f"short{step}", prompt_len=4, max_tokens=1))
        return run_to_completion(make_executor(capacity=sjf(aging, max_batch_size=1), max_batch_size=1), arrivals)

    # it overtakes every later arrival once aged below their work; +1: the short one running then
    assert first_admitted(run(aging), "long") <= (work_long - work_short) / aging + 1
    assert first_admitted(run(0.0), "long") >= stream_steps  # without aging it starves until the stream stops


def test_sjf_refuses_a_negative_aging():
    with pytest.raises(ValueError, match="scheduler.aging must be >= 0"):
        sjf(aging=-1)


# ---- fair ---------------------------------------------------------------------------------------


def test_fair_takes_turns_between_backlogged_tenants():
    kv = tiny_kv_cache(256)
    requests = [req(f"a{i}", tenant="a") for i in range(3)] + [req(f"b{i}", tenant="b") for i in range(2)]
    out = fair(max_batch_size=4).schedule(requests, kv)
    assert set(ids(out.fitting)) == {"a0", "b0", "a1", "b1"}  # arrival order would take a0 a1 a2 b0
    scheduler = fair(max_batch_size=4)
    scheduler.schedule(requests[:3] + [req("anon0"), req("anon1")], kv)  # requests without a tenant share one
    assert set(scheduler.counters) == {"a", None}


def test_fair_keeps_a_flooding_tenant_from_starving_another():
    def run(capacity):
        flood = [req(f"a{i}", tenant="a") for i in range(8)]
        other = [req(f"b{i}", tenant="b") for i in range(2)]
        return run_to_completion(make_executor(capacity=capacity, max_batch_size=2), {0: flood, 1: other})

    trace = run(fair(max_batch_size=2))
    admitted = sorted(["b0", "b1"] + [f"a{i}" for i in range(8)], key=lambda rid: first_admitted(trace, rid))
    assert admitted[:6] == ["a0", "a1", "b0", "a2", "b1", "a3"]  # b gets every other free slot
    assert trace.finished.index("b1") < trace.finished.index("a4")
    assert run(None).finished[-2:] == ["b0", "b1"]  # guaranteed_no_evict: b waits for all of a's flood


def test_a_tenant_arriving_late_starts_level_with_the_least_served():
    kv = tiny_kv_cache(256)
    scheduler = fair()
    a, b = req("a", tenant="a", max_tokens=8), req("b", tenant="b", max_tokens=8)
    scheduler.schedule([a, b], kv)
    assert scheduler.counters == {"a": 8 + 2, "b": 8 + 2}  # prompt tokens x 1 + the first token x 2
    start(kv, a, b)
    a.output_token_ids += [1, 2]  # two more tokens than b since admission
    c = req("c", tenant="c")
    scheduler.schedule([a, b, c], kv)  # c starts at b's 10, then is admitted and charged 10
    assert scheduler.counters == {"a": 10 + 2 * 2, "b": 10, "c": 10 + 10}
    scheduler.schedule([c], kv)  # a and b have left (forgotten); c, still queued, is not charged twice
    assert scheduler.counters == {"c": 20}


def test_fair_refuses_negative_weights():
    with pytest.raises(ValueError, match="scheduler.output_token_weight must be >= 0"):
        make_scheduler(FairShareScheduler, FairConfig(output_token_weight=-1))
