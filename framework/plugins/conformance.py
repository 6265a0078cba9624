"""Conformance checks every implementation of a kind must pass. The framework's own test suite runs
them against every registered name; a plugin author runs them against their class:

    from framework.plugins.conformance import check_capacity_scheduler
    def test_conforms():
        check_capacity_scheduler(MyScheduler, MyConfig())

The checks drive the component through a model-free copy of the executor's step loop (a fake
sampler stands in for the model), with a tiny KV cache, and assert the seam's contract: types,
budgets, no leaked blocks, and that every request finishes.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

from framework.request import LlmRequest, RequestState
from framework.sampling_params import SamplingParams
from framework.scheduler.base import CapacityOutput, CapacityScheduler, MicroBatchScheduler


def tiny_kv_cache(max_tokens=64, block_size=4, factory=None, config=None, enable_prefix_caching=True):
    import torch

    from framework.resources.base import KVCacheSpec
    from framework.resources.paged_kv_cache import PagedKVCacheManager

    kv_config = SimpleNamespace(
        name="conformance", block_size=block_size, max_tokens=max_tokens, memory_fraction=0.0,
        enable_prefix_caching=enable_prefix_caching,
    )
    spec = KVCacheSpec(num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float32, device=torch.device("cpu"), max_model_len=256)
    return (factory or PagedKVCacheManager)(kv_config, config, spec)


def workload(seed=0, n=10, vocab=100) -> list[LlmRequest]:
    """Requests of mixed lengths, some sharing a prefix."""
    rng = random.Random(seed)
    shared = [rng.randrange(vocab) for _ in range(12)]
    requests = []
    for i in range(n):
        own = [rng.randrange(vocab) for _ in range(rng.randrange(1, 20))]
        prompt = (shared + own) if i % 2 else own
        params = SamplingParams(max_tokens=rng.randrange(1, 12), temperature=0.0, ignore_eos=True)
        requests.append(LlmRequest(str(i), prompt, params))
    return requests


def simulate(capacity, micro_batch, kv, requests, max_num_tokens, max_batch_size, max_steps=2000):
    """The executor's step without a model. Checks every contract on the way; returns step count."""
    active = list(requests)
    for step in range(max_steps):
        if not active:
            return step
        out = capacity.schedule(active, kv)
        assert isinstance(out, CapacityOutput), f"{type(capacity).__name__}.schedule must return CapacityOutput"
        ids = {id(r) for r in active}
        assert all(id(r) in ids for r in out.fitting + out.preempted), "scheduled a request that is not active"
        assert not {id(r) for r in out.fitting} & {id(r) for r in out.preempted}, "a request both fits and is preempted"
        for request in out.preempted:
            assert request.state is not RequestState.QUEUED, "preempted a request that was not running"
            kv.free_resources(request)
            request.reset_for_recompute()
        for request in out.fitting:
            if request.state is RequestState.QUEUED:
                request.state = RequestState.CONTEXT
                kv.admit(request)
        scheduled = micro_batch.schedule(out.fitting)
        fitting_ids = {id(r) for r in out.fitting}
        assert all(id(r) in fitting_ids for r in scheduled), "micro-batch scheduled a request that does not fit"
        assert len(scheduled) <= max_batch_size, "micro-batch exceeded max_batch_size"
        assert sum(r.num_scheduled_tokens for r in scheduled) <= max_num_tokens, "micro-batch exceeded max_num_tokens"
        for request in scheduled:
            assert 1 <= request.num_scheduled_tokens <= request.num_missing_tokens, "chunk outside [1, missing]"
        kv.prepare_resources(scheduled)
        for request in scheduled:
            table = kv.get_block_table(request)
            needed = request.num_computed_tokens + request.num_scheduled_tokens
            assert len(table) * kv.block_size >= needed, "prepare_resources left a chunk without blocks"
            request.num_computed_tokens += request.num_scheduled_tokens
            if request.num_computed_tokens == request.num_tokens:
                request.output_token_ids.append(7 + len(request.output_token_ids))
                request.state = RequestState.GENERATION
                if len(request.output_token_ids) >= request.sampling_params.max_tokens:
                    request.state = RequestState.FINISHED
        kv.update_resources(scheduled)
        for request in scheduled:
            request.num_scheduled_tokens = 0
        for request in [r for r in active if r.is_finished]:
            kv.free_resources(request)
        active = [r for r in active if not r.is_finished]
    raise AssertionError(f"requests still unfinished after {max_steps} steps: no progress")


def _run(capacity, micro_batch, kv, sched_cfg, seed):
    requests = workload(seed)
    simulate(capacity, micro_batch, kv, requests, sched_cfg.max_num_tokens, sched_cfg.max_batch_size)
    assert all(r.is_finished and len(r.output_token_ids) == r.sampling_params.max_tokens for r in requests)
    assert kv.num_free_blocks == kv.get_max_resource_count(), "blocks leaked"


def _scheduler_configs():
    return [SimpleNamespace(max_batch_size=4, max_num_tokens=16), SimpleNamespace(max_batch_size=16, max_num_tokens=64)]


def check_capacity_scheduler(factory, config=None):
    from framework.scheduler.micro_batch import FCFSMicroBatchScheduler

    for seed, sched_cfg in enumerate(_scheduler_configs()):
        capacity = factory(sched_cfg, config)
        assert isinstance(capacity, CapacityScheduler)
        _run(capacity, FCFSMicroBatchScheduler(sched_cfg, None), tiny_kv_cache(), sched_cfg, seed)


def check_micro_batch_scheduler(factory, config=None):
    from framework.scheduler.capacity import GuaranteedNoEvictScheduler, MaxUtilizationScheduler

    for seed, sched_cfg in enumerate(_scheduler_configs()):
        for capacity_cls in (GuaranteedNoEvictScheduler, MaxUtilizationScheduler):
            micro = factory(sched_cfg, config)
            assert isinstance(micro, MicroBatchScheduler)
            _run(capacity_cls(sched_cfg, None), micro, tiny_kv_cache(), sched_cfg, seed)


def check_kv_cache_manager(factory, config=None):
    from framework.resources.base import KVCacheManager
    from framework.scheduler.capacity import MaxUtilizationScheduler
    from framework.scheduler.micro_batch import FCFSMicroBatchScheduler

    kv = tiny_kv_cache(factory=factory, config=config)
    assert isinstance(kv, KVCacheManager)
    assert kv.num_free_blocks == kv.get_max_resource_count() > 0
    for k, v in kv.get_kv_caches():
        assert k.shape == v.shape and k.shape[0] == 1 and k.shape[2:] == (kv.block_size, 4)
    sched_cfg = SimpleNamespace(max_batch_size=8, max_num_tokens=24)
    _run(MaxUtilizationScheduler(sched_cfg, None), FCFSMicroBatchScheduler(sched_cfg, None), kv, sched_cfg, 3)
    stats = kv.stats()
    assert stats.num_used_blocks == 0 and stats.num_blocks == kv.get_max_resource_count()


def check_decoder(factory, config=None):
    import torch

    from framework.decoder.base import Decoder

    decoder = factory(SimpleNamespace(name="conformance"), config, seed=0)
    assert isinstance(decoder, Decoder)
    assert decoder.decode([], torch.zeros(0, 10)).token_ids == []
    requests = [LlmRequest(str(i), [1], SamplingParams(max_tokens=1, temperature=0.0)) for i in range(3)]
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    out = decoder.decode(requests, logits)
    assert out.token_ids == logits.argmax(-1).tolist(), "temperature 0 must be greedy"
    assert out.logprobs is None or len(out.logprobs) == 3


def check_model_engine(factory, checkpoint_dir, config=None):
    """The engine computes the same logits for a prompt in one chunk or in several, and for a
    request alone or packed beside another."""
    import torch

    from framework.config import EngineConfig, ModelConfig
    from framework.engine.base import ForwardOutput, ModelEngine
    from framework.plugins.manager import create_plugin_manager
    from framework.resources.base import ResourceManager

    engine = factory(EngineConfig(), config, ModelConfig(dtype="float32", device="cpu"), checkpoint_dir,
                     create_plugin_manager(autoload=False))
    assert isinstance(engine, ModelEngine)
    spec = engine.kv_cache_spec()

    def last_logits(chunks, prompt, neighbour=None):
        from framework.resources.paged_kv_cache import PagedKVCacheManager

        kv = PagedKVCacheManager(SimpleNamespace(block_size=4, max_tokens=256, memory_fraction=0.0, enable_prefix_caching=False), None, spec)
        rm = ResourceManager({"kv_cache": kv})
        request = LlmRequest("r", list(prompt), SamplingParams(max_tokens=1), state=RequestState.CONTEXT)
        others = [LlmRequest("n", list(neighbour), SamplingParams(max_tokens=1), state=RequestState.CONTEXT)] if neighbour else []
        out = None
        for n in chunks:
            request.num_scheduled_tokens = n
            for other in others:
                other.num_scheduled_tokens = other.num_missing_tokens
            batch = others + [request]
            rm.prepare_resources(batch)
            out = engine.forward(batch, rm)
            assert isinstance(out, ForwardOutput)
            for r in batch:
                r.num_computed_tokens += r.num_scheduled_tokens
            others = []
        assert out.sampled[-1] is request and out.logits.shape == (len(out.sampled), engine.vocab_size)
        return out.logits[-1]

    prompt = list(range(3, 23))
    whole = last_logits([20], prompt)
    torch.testing.assert_close(last_logits([7, 9, 4], prompt), whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last_logits([20], prompt, neighbour=list(range(40, 51))), whole, rtol=1e-4, atol=1e-4)
