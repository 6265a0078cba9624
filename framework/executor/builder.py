"""Builds a PyExecutor from a composed config and the plugin registries. Each factory is called as
factory(group_config, own_config, *context) and its result checked against its kind's ABC (the
table in `framework.plugins.kinds`)."""

from __future__ import annotations

from framework.config import component_config
from framework.drafter.base import DraftContext
from framework.executor.py_executor import PyExecutor
from framework.plugins.kinds import KINDS
from framework.resources.base import ResourceManager


class Builder:
    def __init__(self, cfg, plugins):
        self.cfg, self.plugins = cfg, plugins
        self.names: dict[str, str] = {}  # component key -> "kind 'name' (plugin)", for messages

    def make(self, kind_name: str, *context, name: str | None = None, key: str | None = None, **kw):
        kind = KINDS[kind_name]
        group_cfg = self.cfg[kind.group]
        entry = self.plugins[kind_name].get(name or group_cfg[kind.field])
        obj = kind.checked(entry.load()(group_cfg, component_config(group_cfg, entry.config), *context, **kw), entry)
        self.names[key or kind_name] = f"{kind.label} {entry.name!r} ({entry.provider})"
        return obj

    def draft_engine(self, path: str):
        """A model engine on another checkpoint, with the target's engine and model settings (its
        own length limit): a draft model's. It runs in this process alone, unsharded, when the
        target is tensor-parallel (a draft is small; its steps are rank 0's)."""
        from omegaconf import OmegaConf

        from framework.models.checkpoint import resolve_checkpoint

        model = OmegaConf.merge(self.cfg.model, {"path": path, "max_model_len": None})
        build = self
        if self.cfg.engine.get("tensor_parallel_size", 1) > 1:
            build = Builder(OmegaConf.merge(self.cfg, {"engine": {"tensor_parallel_size": 1}}), self.plugins)
        engine = build.make("model_engine", model, resolve_checkpoint(path), self.plugins, key="draft model engine")
        self.names.update(build.names)
        return engine

    def resource_manager(self, spec, **owned) -> ResourceManager:
        """`resources.extra` in order, then the per-request states other components keep (`owned`,
        by key), then the KV cache manager (under the key "kv_cache")."""
        managers = {}
        for name in self.cfg.resources.extra:
            if name in managers or name in owned or name == "kv_cache":
                raise ValueError(f"resources.extra names {name!r} twice (or under a key the framework uses)")
            managers[name] = self.make("resource_manager", spec, name=name, key=name)
        managers.update({key: states for key, states in owned.items() if states is not None})
        managers["kv_cache"] = self.make("kv_cache_manager", spec, key="kv_cache")
        return ResourceManager(managers)


def build_executor(cfg, plugins, checkpoint_dir, detokenizer=None) -> PyExecutor:
    build = Builder(cfg, plugins)
    engine = build.make("model_engine", cfg.model, checkpoint_dir, plugins)
    decoder = build.make("decoder", seed=cfg.model.seed, backend=engine.backend)
    drafter = build.make("drafter", DraftContext(engine, cfg.kv_cache, build.draft_engine, cfg.model.seed, cfg.scheduler))
    resources = build.resource_manager(
        engine.kv_cache_spec(),
        decoder=decoder.request_states,
        drafter=drafter.request_states,
        detokenizer=getattr(detokenizer, "request_states", None),
    )
    return PyExecutor(
        capacity_scheduler=build.make("capacity_scheduler"),
        micro_batch_scheduler=build.make("micro_batch_scheduler"),
        resource_manager=resources,
        model_engine=engine,
        decoder=decoder,
        detokenizer=detokenizer,
        component_names=build.names,
        drafter=drafter,
    )
