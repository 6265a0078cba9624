"""`kv_cache=sliding_window`: blocks that fall out of every layer's window go back to the pool
while their request runs; the fake engine, which checks every slot a windowed layer reads, still
gets each request's greedy continuation, under the conformance scenarios."""

from __future__ import annotations

import pytest

from framework.plugins.conformance import SCENARIOS, TIGHT, run_conforming, workload
from framework.resources.sliding_window_kv_cache import SlidingWindowKVCacheManager
from framework.testing import FakeEngine, make_executor, make_scheduler, tiny_kv_cache

WINDOW = 8


def windowed_executor(scenario, capacity="framework.scheduler.capacity:MaxUtilizationScheduler", window=WINDOW):
    engine = FakeEngine(vocab_size=1024, sliding_window=window)
    kv = tiny_kv_cache(factory=SlidingWindowKVCacheManager, spec=engine.kv_cache_spec())
    drafter = None
    if scenario.drafts:
        from framework.testing import OracleDrafter

        drafter = OracleDrafter(engine.next_token, engine.vocab_size)
    capacity = make_scheduler(capacity, **scenario.budgets)
    return make_executor(engine=engine, kv_cache=kv, capacity=capacity, drafter=drafter, **scenario.budgets)


@pytest.mark.parametrize("name", [*SCENARIOS, "no_preemption"])
def test_windowed_requests_get_their_greedy_tokens_and_the_pool_comes_back_whole(name):
    scenario = SCENARIOS.get(name, TIGHT)
    capacity = "framework.scheduler.capacity:GuaranteedNoEvictScheduler" if name == "no_preemption" else "framework.scheduler.capacity:MaxUtilizationScheduler"
    executor = windowed_executor(scenario, capacity)
    freed = []
    original = executor.kv_cache_manager.update_resources

    def watching(scheduled):  # the most slots any request has had freed, after each step
        original(scheduled)
        freed.append(max(executor.kv_cache_manager.dead.values(), default=0))

    executor.kv_cache_manager.update_resources = watching
    run_conforming(executor, scenario, workload(scenario.seed))
    assert max(freed) >= 2  # blocks really went back early
    assert not executor.kv_cache_manager.dead


def test_a_request_holds_only_the_blocks_its_window_reads():
    executor = windowed_executor(TIGHT)
    kv = executor.kv_cache_manager
    (request,) = workload(0, n=1)
    request.sampling_params.max_tokens = 40
    executor.enqueue(request)
    held = []
    while executor.has_work():
        executor.step()
        table = kv.block_tables.get(request.request_id)
        if table is not None:
            live = table[kv.dead.get(request.request_id, 0) :]
            held.append(len(live))
            first_read, dead = max(0, request.num_computed_tokens - WINDOW + 1), kv.dead.get(request.request_id, 0)
            assert dead * kv.block_size <= first_read < (dead + 1) * kv.block_size  # no block read is freed; every other one is
    assert max(held) <= (WINDOW - 1) // kv.block_size + 2 and len(held) > 20
    assert kv.num_free_blocks == kv.get_max_resource_count()


def test_without_a_window_nothing_is_freed_early():
    executor = windowed_executor(TIGHT, window=None)
    run_conforming(executor, TIGHT, workload(0))
    assert executor.kv_cache_manager.window is None and not executor.kv_cache_manager.dead
