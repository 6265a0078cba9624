"""The component kinds, one entry each: everything the plugin manager, the hook specs, the config
and the builder need to know about a kind. A new kind is one entry here plus its ABC (and, if it
brings a config group of its own, that group's dataclass in `framework.config`).

Plain data: nothing here imports torch, so `--list-plugins` and `--help` stay fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    name: str  # the registry's key, e.g. "capacity_scheduler"
    hook: str  # the hook that fills its registry: register_<plural>(register)
    abc: str | None  # "module:Class" every built object must be an instance of
    builtins: str  # the module that registers the framework's own implementations
    group: str | None = None  # the config group that selects one by name
    field: str | None = None  # the group's field holding the selected name(s)
    conformance: str | None = None  # "module:function" that checks an implementation
    doc: str = ""  # what a plugin registers, and how a user selects it
    many: bool = False  # the field lists several names
    group_option: bool = True  # `group=<name>` selects it (else only `group.field=<name>` does)
    reserved: tuple[str, ...] = ()  # values the field takes besides registered names ("auto")
    class_only: bool = False  # factories must be subclasses of the ABC (their class is read before one is built)

    @property
    def label(self) -> str:
        return self.name.replace("_", " ")

    def base_class(self) -> type | None:
        return load(self.abc) if self.abc else None

    def checked_factory(self, entry):
        """`entry.load()`, if it can be of this kind: a subclass of the kind's ABC or (unless
        `class_only`) any other callable; else a TypeError naming the entry and its plugin."""
        factory, base = entry.load(), self.base_class()
        if isinstance(factory, type) and base is not None:
            fits = issubclass(factory, base)
        else:
            fits = callable(factory) and not self.class_only
        if not fits:
            expected = "callable" if base is None else f"a {base.__name__} subclass" + ("" if self.class_only else " or factory")
            raise TypeError(f"{self.label} {entry.name!r} from {entry.provider}: {entry.factory!r} is not {expected}")
        return factory

    def checked(self, obj, entry):
        """`obj`, built by `entry`'s factory, if it is an instance of the kind's ABC; else a TypeError."""
        base = self.base_class()
        if base is not None and not isinstance(obj, base):
            raise TypeError(f"{self.label} {entry.name!r} from {entry.provider} is not a {base.__name__}")
        return obj


def load(path: str):
    """The object a "module:attr" path names."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind(
            "capacity_scheduler", "register_capacity_schedulers", "framework.scheduler.base:CapacityScheduler",
            "framework.scheduler.builtins", "scheduler", "capacity", "framework.plugins.conformance:check_capacity_scheduler",
            "CapacityScheduler implementations (which requests get resources this step). Selected with "
            "`scheduler=<name>` or `scheduler.capacity=<name>`.",
        ),
        Kind(
            "micro_batch_scheduler", "register_micro_batch_schedulers", "framework.scheduler.base:MicroBatchScheduler",
            "framework.scheduler.builtins", "scheduler", "micro_batch", "framework.plugins.conformance:check_micro_batch_scheduler",
            "MicroBatchScheduler implementations (which fitting requests run this step and how many tokens each "
            "computes). Selected with `scheduler=<name>` or `scheduler.micro_batch=<name>`.",
        ),
        Kind(
            "kv_cache_manager", "register_kv_cache_managers", "framework.resources.base:KVCacheManager",
            "framework.resources.builtins", "kv_cache", "name", "framework.plugins.conformance:check_kv_cache_manager",
            "KVCacheManager implementations (the resource manager that owns the paged KV cache). Selected with "
            "`kv_cache=<name>`.",
        ),
        Kind(
            "resource_manager", "register_resource_managers", "framework.resources.base:BaseResourceManager",
            "framework.resources.builtins", "resources", "extra", None,
            "BaseResourceManager implementations: per-request resources other than the KV cache (a draft "
            "model's cache, an adapter slot). Listed by name in `resources.extra`; they run in that order, "
            "before the KV cache manager. The factory is called as factory(resources_config, own_config, "
            "kv_cache_spec).",
            many=True,
            group_option=False,
        ),
        Kind(
            "decoder", "register_decoders", "framework.decoder.base:Decoder",
            "framework.decoder.builtins", "decoder", "name", "framework.plugins.conformance:check_decoder",
            "Decoder implementations (logits to tokens). Selected with `decoder=<name>`.",
        ),
        Kind(
            "model_engine", "register_model_engines", "framework.engine.base:ModelEngine",
            "framework.engine.builtins", "engine", "name", "framework.plugins.conformance:check_model_engine",
            "ModelEngine implementations (packed batch to logits). Selected with `engine=<name>`.",
        ),
        Kind(
            "backend", "register_backends", "framework.backend.base:Backend",
            "framework.backend.builtins", "engine", "backend", None,
            "Backend implementations: the hot tensor ops the models and the engine call (paged attention, "
            "the KV cache write, fused linear/norm/rotary/SwiGLU, argmax, graph capture of decode steps). "
            "Selected with `engine.backend=<name>`; `auto` takes the best one that supports the device, "
            "dtype and head size.",
            group_option=False,
            reserved=("auto",),
            class_only=True,
        ),
        Kind(
            "drafter", "register_drafters", "framework.drafter.base:Drafter",
            "framework.drafter.builtins", "speculative", "name", "framework.plugins.conformance:check_drafter",
            "Drafter implementations: propose draft tokens that each step verifies (speculative "
            "decoding). Selected with `speculative=<name>`; `none` proposes nothing.",
        ),
        Kind(
            "router", "register_routers", "framework.router.base:Router",
            "framework.router.builtins", "replay", "router", "framework.plugins.conformance:check_router",
            "Router implementations: which replica of a simulated cluster serves each arriving request "
            "(`mode=replay replay.replicas=N`). Selected with `replay.router=<name>`; the factory is called "
            "as factory(replay_config, own_config, block_size), block_size being the replicas' KV block size.",
            group_option=False,
        ),
        Kind(
            "model", "register_models", "framework.models.base:CausalLM", "framework.models.builtins",
            doc="model architectures under a checkpoint `architectures` name, e.g. \"LlamaForCausalLM\". The "
            "factory is called as factory(hf_config, backend): the Hugging Face config object and the engine's "
            "backend, whose ops the model's layers call.",
        ),
    )
}


def kinds_of_group(group: str) -> list[Kind]:
    return [kind for kind in KINDS.values() if kind.group == group]


def groups() -> dict[str, list[Kind]]:
    """Config group -> the kinds it selects, for groups that select one implementation by name
    (`resources.extra` lists several and is no Hydra group option)."""
    found: dict[str, list[Kind]] = {}
    for kind in KINDS.values():
        if kind.group is not None and kind.group_option:
            found.setdefault(kind.group, []).append(kind)
    return found
