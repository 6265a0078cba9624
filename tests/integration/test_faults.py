"""Faults stay with their request: a component from a plugin that raises fails the request it raised
for (or, where that cannot be told, the requests of that step), names itself and its plugin, frees
what they held, and the engine goes on serving. Every kind is registered from an in-test plugin."""

from __future__ import annotations

import pytest

from framework import LLM, SamplingParams
from framework.decoder.sampling import SamplingDecoder
from framework.engine.pytorch_model_engine import PyTorchModelEngine
from framework.plugins.hookspecs import hookimpl
from framework.plugins.manager import create_plugin_manager
from framework.resources.paged_kv_cache import PagedKVCacheManager
from framework.scheduler.capacity import GuaranteedNoEvictScheduler
from framework.scheduler.micro_batch import FCFSMicroBatchScheduler

POISON = 666  # the seed that marks the request a faulty component chokes on
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
GOOD = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
POISONED = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, seed=POISON)


class Fault:
    """Where and how the in-test components raise: at `point`, either while a poisoned request is
    among their arguments ("poison") or on the first call only ("once")."""

    point: str | None = None
    mode = "poison"
    raised = 0

    @classmethod
    def check(cls, point, requests):
        if point != cls.point:
            return
        if cls.mode == "once" and cls.raised:
            return
        if cls.mode == "poison" and not any(r.sampling_params.seed == POISON for r in requests):
            return
        cls.raised += 1
        raise RuntimeError(f"injected fault in {point}")


class FaultyCapacity(GuaranteedNoEvictScheduler):
    def schedule(self, active, kv_cache):
        Fault.check("capacity", active)
        return super().schedule(active, kv_cache)


class FaultyMicroBatch(FCFSMicroBatchScheduler):
    def schedule(self, fitting):
        Fault.check("micro_batch", fitting)
        return super().schedule(fitting)


class FaultyKVCache(PagedKVCacheManager):
    def admit(self, request):
        Fault.check("admit", [request])
        super().admit(request)

    def prepare_resources(self, scheduled):
        Fault.check("prepare", scheduled)
        super().prepare_resources(scheduled)

    def update_resources(self, scheduled):
        Fault.check("update", scheduled)
        super().update_resources(scheduled)


class FaultyDecoder(SamplingDecoder):
    def decode(self, requests, logits):
        Fault.check("decoder", requests)
        return super().decode(requests, logits)


class FaultyEngine(PyTorchModelEngine):
    def forward(self, scheduled, resource_manager):
        Fault.check("engine", scheduled)
        return super().forward(scheduled, resource_manager)


class FaultyPlugin:
    @hookimpl
    def register_capacity_schedulers(self, register):
        register("faulty_capacity", FaultyCapacity)

    @hookimpl
    def register_micro_batch_schedulers(self, register):
        register("faulty_micro_batch", FaultyMicroBatch)

    @hookimpl
    def register_kv_cache_managers(self, register):
        register("faulty_kv", FaultyKVCache)

    @hookimpl
    def register_decoders(self, register):
        register("faulty_decoder", FaultyDecoder)

    @hookimpl
    def register_model_engines(self, register):
        register("faulty_engine", FaultyEngine)


# point -> (the component's name in the error, the LLM options that select it)
POINTS = {
    "capacity": ("capacity scheduler 'faulty_capacity' (FaultyPlugin)", {"scheduler": "faulty_capacity"}),
    "micro_batch": ("micro batch scheduler 'faulty_micro_batch' (FaultyPlugin)", {"scheduler": "faulty_micro_batch"}),
    "admit": ("kv cache manager 'faulty_kv' (FaultyPlugin)", {"kv_cache": "faulty_kv"}),
    "prepare": ("kv cache manager 'faulty_kv' (FaultyPlugin)", {"kv_cache": "faulty_kv"}),
    "update": ("kv cache manager 'faulty_kv' (FaultyPlugin)", {"kv_cache": "faulty_kv"}),
    "decoder": ("decoder 'faulty_decoder' (FaultyPlugin)", {"decoder": "faulty_decoder"}),
    "engine": ("model engine 'faulty_engine' (FaultyPlugin)", {"engine": "faulty_engine"}),
    "detokenizer": ("detokenizer", {}),
}


PER_REQUEST = ("admit", "detokenizer")


def make_llm(tiny_dir, **options):
    plugins = create_plugin_manager(extra_plugins=[FaultyPlugin()], autoload=False)
    return LLM(str(tiny_dir), plugins=plugins, dtype="float32", **{"kv_cache.max_tokens": 512}, **options)


@pytest.fixture(scope="module")
def expected(tiny_dir):
    """What the prompts give with no fault anywhere."""
    llm = make_llm(tiny_dir)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GOOD, use_tqdm=False)]


@pytest.fixture(scope="module")
def llms(tiny_dir):
    cache = {}

    def get(point):
        if point not in cache:
            cache[point] = make_llm(tiny_dir, **POINTS[point][1])
        return cache[point]

    return get


@pytest.fixture
def fault(monkeypatch):
    def arm(point, mode, llm):
        monkeypatch.setattr(Fault, "point", point)
        monkeypatch.setattr(Fault, "mode", mode)
        monkeypatch.setattr(Fault, "raised", 0)
        if point == "detokenizer":  # not a plugin kind: patched on the LLM's own detokenizer
            detokenizer = llm.executor.detokenizer
            real = detokenizer.update

            def update(request, token, check_stop=True):
                Fault.check("detokenizer", [request])
                return real(request, token, check_stop)

            monkeypatch.setattr(detokenizer, "update", update)

    return arm


def assert_idle(llm):
    assert llm.kv_cache_stats.num_used_blocks == 0
    assert not llm.executor.active and not llm.executor.has_work()


@pytest.mark.parametrize("point", list(POINTS))
def test_a_poisoned_request_fails_alone_and_names_the_component(point, llms, fault, expected):
    llm = llms(point)
    fault(point, "poison", llm)
    outs = llm.generate(PROMPTS + [[20, 21, 22]], [GOOD] * 3 + [POISONED], use_tqdm=False)
    assert Fault.raised >= 1
    bad = outs[3]
    assert bad.outputs[0].finish_reason == "error"
    component = POINTS[point][0]
    assert bad.error.startswith(f"{component} raised RuntimeError('injected fault in {point}')")
    assert [o.outputs[0].token_ids for o in outs[:3]] == expected
    assert all(o.outputs[0].finish_reason == "length" and o.error is None for o in outs[:3])
    assert_idle(llm)
    # the fault stays armed: the engine keeps serving everyone else
    again = llm.generate(PROMPTS, GOOD, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == expected
    assert_idle(llm)


@pytest.mark.parametrize("point", list(POINTS))
def test_a_fault_that_passes_is_retried_and_nobody_fails(point, llms, fault, expected):
    llm = llms(point)
    fault(point, "once", llm)
    outs = llm.generate(PROMPTS, GOOD, use_tqdm=False)
    assert Fault.raised == 1
    failed = [i for i, o in enumerate(outs) if o.error is not None]
    if point in PER_REQUEST:  # called for one request: a raise fails that one, the others go on
        assert len(failed) == 1 and outs[failed[0]].error.startswith(POINTS[point][0])
    else:
        assert failed == []
    assert all(outs[i].outputs[0].token_ids == expected[i] for i in range(len(PROMPTS)) if i not in failed)
    assert_idle(llm)


def test_a_fault_only_a_combination_triggers_fails_the_step_not_the_engine(llms, fault, expected, monkeypatch):
    """No request raises alone: the fault cannot be laid on one, so the requests of that step fail."""
    llm = llms("capacity")
    fault("capacity", "poison", llm)
    monkeypatch.setattr(Fault, "check", classmethod(lambda cls, point, requests: _raise_if_crowded(cls, point, requests)))
    outs = llm.generate(PROMPTS, GOOD, use_tqdm=False)
    assert all(o.outputs[0].finish_reason == "error" and "capacity scheduler 'faulty_capacity'" in o.error for o in outs)
    assert_idle(llm)
    alone = llm.generate(PROMPTS[0], GOOD, use_tqdm=False)
    assert alone[0].outputs[0].token_ids == expected[0]


def _raise_if_crowded(cls, point, requests):
    if point == cls.point and len(requests) > 1:
        cls.raised += 1
        raise RuntimeError("two's a crowd")


def test_a_manager_that_fails_to_free_still_frees_the_others(tiny_dir, monkeypatch):
    from framework.resources.base import BaseResourceManager

    freed = []

    class Sticky(BaseResourceManager):
        def prepare_resources(self, scheduled): ...
        def update_resources(self, scheduled): ...
        def get_max_resource_count(self): return 0
        def get_needed_resource_to_completion(self, request): return 0

        def free_resources(self, request):
            freed.append(request.request_id)
            raise RuntimeError("cannot free")

    llm = make_llm(tiny_dir)
    rm = llm.executor.resource_manager
    monkeypatch.setattr(rm, "managers", {"sticky": Sticky(), **rm.managers})
    out = llm.generate(PROMPTS[0], GOOD, use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length"  # it had finished: a failing release does not undo that
    assert freed == [out.request_id]
    assert llm.kv_cache_stats.num_used_blocks == 0


# ---- the background loop (what the server runs on) ---------------------------------------------
def run_async(llm, prompts_and_params):
    """Each prompt as a concurrent `generate_async` caller on the background loop; final outputs."""
    import asyncio

    async def one(prompt, params):
        async for out in llm.generate_async(prompt, params):
            return out

    async def main():
        return await asyncio.gather(*(one(p, sp) for p, sp in prompts_and_params))

    return asyncio.run(main())


@pytest.mark.parametrize("point", ["capacity", "prepare", "engine", "decoder"])
def test_on_the_background_loop_a_poisoned_request_fails_alone(point, llms, fault, expected):
    llm = llms(point)
    fault(point, "poison", llm)
    try:
        outs = run_async(llm, [(p, GOOD) for p in PROMPTS] + [([20, 21, 22], POISONED)])
        assert outs[3].outputs[0].finish_reason == "error" and outs[3].error.startswith(POINTS[point][0])
        assert [o.outputs[0].token_ids for o in outs[:3]] == expected
        later = run_async(llm, [(PROMPTS[0], GOOD)])  # the loop is alive and serves the next caller
        assert later[0].outputs[0].token_ids == expected[0]
        assert llm._thread.is_alive() and llm.engine_error is None
    finally:
        llm.shutdown()
    assert_idle(llm)


def test_when_the_loop_itself_breaks_callers_get_an_error_at_once_and_new_requests_are_refused(tiny_dir, monkeypatch):
    import asyncio
    import time

    llm = make_llm(tiny_dir)
    executor = llm.executor
    real_run = executor._run
    calls = {"n": 0}

    def broken_run(scheduled):  # a fault in the executor's own code, outside any component
        calls["n"] += 1
        if calls["n"] == 3:
            raise AssertionError("executor bug")
        return real_run(scheduled)

    monkeypatch.setattr(executor, "_run", broken_run)
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    started = time.monotonic()
    outs = run_async(llm, [(p, long) for p in PROMPTS])
    assert time.monotonic() - started < 30  # they were told, not left waiting
    assert all(o.finished and o.outputs[0].finish_reason == "error" for o in outs)
    assert all("the executor loop died: AssertionError('executor bug')" in o.error for o in outs)
    assert llm.engine_error.startswith("the executor loop died")
    llm._thread.join(timeout=10)  # it has told everyone; now it ends
    assert not llm._thread.is_alive()
    with pytest.raises(RuntimeError, match="the engine has stopped"):
        asyncio.run(anext(llm.generate_async(PROMPTS[0], GOOD)))
    assert llm.kv_cache_stats.num_used_blocks == 0
    llm.shutdown()
