"""Resource managers from the `register_resource_managers` hook, listed in `resources.extra`: each
sees every request's life in the documented order and can keep a request queued while it is full."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from framework import LLM, SamplingParams
from framework.plugins.hookspecs import hookimpl
from framework.plugins.manager import create_plugin_manager
from framework.plugins.registry import UnknownNameError
from framework.resources.base import BaseResourceManager
from tests.conftest import random_prompts

PARAMS = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)


@dataclass
class SlotsConfig:
    slots: int = 2


class Slots(BaseResourceManager):
    """A fixed number of slots (think adapter slots): a request holds one from admission to its end."""

    def __init__(self, resources_config, config: SlotsConfig, spec):
        self.free_slots = config.slots
        self.held: set[str] = set()
        self.log: list[tuple[str, str]] = []
        self.most_held = 0

    def can_admit(self, request):
        return self.free_slots > 0

    def admit(self, request):
        if request.request_id not in self.held:
            self.log.append(("admit", request.request_id))
            self.held.add(request.request_id)
            self.free_slots -= 1
            self.most_held = max(self.most_held, len(self.held))

    def prepare_resources(self, scheduled):
        self.log += [("prepare", r.request_id) for r in scheduled]

    def update_resources(self, scheduled):
        self.log += [("update", r.request_id) for r in scheduled]

    def free_resources(self, request):
        self.log.append(("free", request.request_id))
        if request.request_id in self.held:
            self.held.remove(request.request_id)
            self.free_slots += 1

    def get_max_resource_count(self):
        return self.free_slots + len(self.held)

    def get_needed_resource_to_completion(self, request):
        return 0 if request.request_id in self.held else 1


class SlotsPlugin:
    @hookimpl
    def register_resource_managers(self, register):
        register("slots", Slots, config=SlotsConfig)


def test_a_resource_manager_sees_the_lifecycle_in_order_and_holds_requests_back(tiny_dir):
    plugins = create_plugin_manager(extra_plugins=[SlotsPlugin()], autoload=False)
    llm = LLM(str(tiny_dir), plugins=plugins, dtype="float32", **{"resources.extra": ["slots"], "kv_cache.max_tokens": 1024})
    plain = LLM(str(tiny_dir), dtype="float32", **{"kv_cache.max_tokens": 1024})
    prompts = random_prompts([6, 9, 4, 11, 7], seed=5)
    outs = llm.generate(prompts, PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain.generate(prompts, PARAMS, use_tqdm=False)]
    slots = llm.executor.resource_manager.managers["slots"]
    assert list(llm.executor.resource_manager.managers) == ["slots", "decoder", "detokenizer", "kv_cache"]  # the KV cache last
    assert slots.most_held == 2 and not slots.held and slots.free_slots == 2
    for out in outs:
        events = [event for event, rid in slots.log if rid == out.request_id]
        assert events[0] == "admit" and events[-1] == "free" and events.count("free") == 1
        assert events.count("prepare") == events.count("update") >= 1
        assert all(a != "update" or b != "update" for a, b in zip(events, events[1:]))  # prepare before each update
    assert llm.kv_cache_stats.num_used_blocks == 0


def test_an_unknown_resource_manager_name_lists_the_installed_ones(tiny_dir):
    plugins = create_plugin_manager(extra_plugins=[SlotsPlugin()], autoload=False)
    with pytest.raises(UnknownNameError, match=r"unknown resource manager 'slot'; available: slots \(SlotsPlugin\)"):
        LLM(str(tiny_dir), plugins=plugins, **{"resources.extra": ["slot"]})


def test_the_decoders_and_detokenizers_per_request_state_goes_with_the_request(tiny_dir):
    llm = LLM(str(tiny_dir), dtype="float32", **{"kv_cache.max_tokens": 1024})
    managers = llm.executor.resource_manager.managers
    assert list(managers) == ["decoder", "detokenizer", "kv_cache"]
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=3, presence_penalty=0.5, ignore_eos=True)
    stream = llm.stream(random_prompts([5], seed=1)[0], params)
    next(stream)
    assert len(managers["decoder"]) == 1 and len(managers["detokenizer"]) == 1  # held while it runs
    list(stream)
    llm.generate(random_prompts([4, 8], seed=2), params, use_tqdm=False)
    assert len(managers["decoder"]) == 0 and len(managers["detokenizer"]) == 0
