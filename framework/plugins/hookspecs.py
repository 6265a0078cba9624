"""The hooks a plugin implements. Each `register_*` hook receives a `register` callback:

    register(name, factory, config=None)

`factory` is a class or callable, or a lazy "module:attr" string so that registration modules never
import torch. `config` is an optional dataclass of the component's own settings; its fields become
Hydra config keys of the component's config group.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("framework")
hookimpl = pluggy.HookimplMarker("framework")


class FrameworkHookSpecs:
    @hookspec
    def register_capacity_schedulers(self, register):
        """Register CapacityScheduler implementations (which requests get resources this step).
        Selected with `scheduler=<name>` or `scheduler.capacity=<name>`."""

    @hookspec
    def register_micro_batch_schedulers(self, register):
        """Register MicroBatchScheduler implementations (which fitting requests run this step and
        how many tokens each computes). Selected with `scheduler=<name>` or `scheduler.micro_batch=<name>`."""

    @hookspec
    def register_kv_cache_managers(self, register):
        """Register KVCacheManager implementations (the resource manager that owns the paged KV
        cache). Selected with `kv_cache=<name>`."""

    @hookspec
    def register_decoders(self, register):
        """Register Decoder implementations (logits to tokens). Selected with `decoder=<name>`."""

    @hookspec
    def register_model_engines(self, register):
        """Register ModelEngine implementations (packed batch to logits). Selected with `engine=<name>`."""

    @hookspec
    def register_models(self, register):
        """Register model architectures under a checkpoint `architectures` name, e.g.
        "LlamaForCausalLM". The factory is called with the Hugging Face config object."""

    @hookspec
    def config_search_path(self):
        """Return a config search path entry (or a list of them), e.g. "pkg://my_plugin.conf", whose
        YAML presets become options of the framework's config groups."""
