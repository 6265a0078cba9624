"""The KV cache manager on the `meta` device (no cache memory, as the sim engine asks for) keeps
exactly the block accounting it keeps with real tensors: the same tables, reference counts,
prefix hits, evictions and preemptions, step by step."""

from __future__ import annotations

import dataclasses

import torch

from framework.engine.config import SimEngineConfig
from framework.engine.sim_engine import SimModelEngine
from framework.plugins import conformance
from framework.testing import FakeEngine, make_engine, make_executor, make_scheduler, observe, tiny_kv_cache, watch

BUDGETS = conformance.TIGHT.budgets


def accounting(engine, spec, seed: int = 0) -> tuple[list, int]:
    """Per step: the batch, the preempted, the pool's statistics and every block table; and how
    many cached blocks were evicted."""
    kv = tiny_kv_cache(64, spec=spec)
    capacity = make_scheduler("framework.scheduler.capacity:MaxUtilizationScheduler", **BUDGETS)
    executor = make_executor(engine=engine, kv_cache=kv, capacity=capacity, **BUDGETS)
    evictions, steps = [], []

    def after_step(*_):
        return lambda updated: steps[-1].update(stats=kv.stats(), tables={k: list(v) for k, v in kv.block_tables.items()}, refs=list(kv.pool.ref_counts))

    requests = conformance.workload(seed, n=16, vocab=512)  # the sim engine's tiny checkpoint has 512 tokens
    with observe(executor) as trace, watch(executor, "step", after_step), watch(kv.pool.evictable, "pop", lambda: evictions.append):
        steps.append({})
        for request in requests:
            executor.enqueue(request)
        while executor.has_work():
            executor.step()
            steps.append({})
    steps.pop()
    assert all(r.error is None and len(r.output_token_ids) == r.sampling_params.max_tokens for r in requests)
    for step, seen in zip(steps, trace.steps):
        step.update(batch=seen.batch, preempted=seen.preempted)
    return steps, len(evictions)


def test_block_accounting_without_tensors_equals_accounting_with_them():
    sim = make_engine(SimModelEngine, SimEngineConfig())
    meta = sim.kv_cache_spec()
    assert meta.device.type == "meta"
    with_tensors = dataclasses.replace(meta, device=torch.device("cpu"))
    without, evicted = accounting(sim, meta)
    assert accounting(make_engine(SimModelEngine, SimEngineConfig()), with_tensors) == (without, evicted)
    # the same with the fake engine, which writes every token into real tensors and reads its
    # context back through the block tables before it samples (the schedule depends on lengths
    # and prompts only, so it is the same schedule)
    fake = FakeEngine()
    assert accounting(fake, fake.kv_cache_spec())[0] == without
    # the workload exercised what the accounting is for
    assert sum(len(step["preempted"]) for step in without) > 0
    assert without[-1]["stats"].prefix_hit_tokens > 0
    assert evicted > 0


def test_meta_tensors_hold_no_memory_and_keep_their_shapes():
    sim = make_engine(SimModelEngine, SimEngineConfig())
    kv = tiny_kv_cache(1 << 20, spec=sim.kv_cache_spec())  # a million tokens of cache
    k, v = kv.get_kv_caches()[0]
    assert k.device.type == v.device.type == "meta"
    assert k.shape == (sim.model_shape.num_kv_heads, kv.get_max_resource_count(), kv.block_size, sim.model_shape.head_dim)
