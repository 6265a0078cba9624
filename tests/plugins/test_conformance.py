"""Every registered built-in of every kind passes its kind's conformance checks."""

import pytest

from framework import LLM, SamplingParams
from framework.config import GROUPS
from framework.decoder.base import Decoder
from framework.engine.base import ModelEngine
from framework.plugins import conformance
from framework.resources.base import KVCacheManager
from framework.scheduler.base import CapacityScheduler, MicroBatchScheduler
from framework.plugins.manager import create_plugin_manager

PLUGINS = create_plugin_manager(autoload=False)
CHECKS = {
    "capacity_scheduler": conformance.check_capacity_scheduler,
    "micro_batch_scheduler": conformance.check_micro_batch_scheduler,
    "kv_cache_manager": conformance.check_kv_cache_manager,
    "decoder": conformance.check_decoder,
}


@pytest.mark.parametrize(
    "kind, name", [(kind, entry.name) for kind in CHECKS for entry in PLUGINS[kind]]
)
def test_builtin_conforms(kind, name):
    entry = PLUGINS[kind].get(name)
    CHECKS[kind](entry.load(), entry.config() if entry.config else None)


def test_every_kind_has_builtins():
    for kind in ("capacity_scheduler", "micro_batch_scheduler", "kv_cache_manager", "decoder", "model_engine", "model"):
        assert PLUGINS[kind].names(), kind


def test_a_broken_scheduler_fails_conformance():
    from framework.scheduler.capacity import GuaranteedNoEvictScheduler

    class Greedy(GuaranteedNoEvictScheduler):  # admits everything, ignoring the cache
        def schedule(self, active, kv_cache):
            out = super().schedule(active, kv_cache)
            out.fitting = list(active)
            return out

    with pytest.raises(Exception):
        conformance.check_capacity_scheduler(Greedy)


@pytest.mark.parametrize("name", PLUGINS["model_engine"].names())
def test_builtin_model_engine_conforms(name, tiny_dir):
    entry = PLUGINS["model_engine"].get(name)
    conformance.check_model_engine(entry.load(), tiny_dir, entry.config() if entry.config else None)


OPTIONS = [(group, kind, e.name) for group, (_, fields) in GROUPS.items() for kind in fields for e in PLUGINS[kind]]


@pytest.mark.parametrize("group, kind, name", OPTIONS)
def test_every_builtin_option_composes_and_builds(tiny_dir, group, kind, name):
    llm = LLM(str(tiny_dir), plugins=PLUGINS, **{group: name, "kv_cache.max_tokens": 128})
    executor = llm.executor
    built = {
        "capacity_scheduler": (executor.capacity_scheduler, CapacityScheduler),
        "micro_batch_scheduler": (executor.micro_batch_scheduler, MicroBatchScheduler),
        "kv_cache_manager": (executor.kv_cache_manager, KVCacheManager),
        "decoder": (executor.decoder, Decoder),
        "model_engine": (executor.model_engine, ModelEngine),
    }
    for component, abc in built.values():
        assert isinstance(component, abc)
    assert type(built[kind][0]) is PLUGINS[kind].get(name).load()
    out = llm.generate([4, 5, 6], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
