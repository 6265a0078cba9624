"""Builds a PyExecutor from a composed config and the plugin registries. Every name is resolved
before anything heavy is loaded, so a misspelt name fails fast with the list of valid ones."""

from __future__ import annotations

from framework.config import GROUPS, component_config
from framework.decoder.base import Decoder
from framework.engine.base import ModelEngine
from framework.executor.py_executor import PyExecutor
from framework.resources.base import KVCacheManager, ResourceManager
from framework.scheduler.base import CapacityScheduler, MicroBatchScheduler


def _selected(cfg, plugins):
    """(group config, registry entry) for every component kind, validated by name."""
    chosen = {}
    for group, (_, name_fields) in GROUPS.items():
        group_cfg = cfg[group]
        for kind, field in name_fields.items():
            chosen[kind] = (group_cfg, plugins[kind].get(group_cfg[field]))
    return chosen


def _check(obj, abc, kind, entry):
    if not isinstance(obj, abc):
        raise TypeError(f"{kind} {entry.name!r} from {entry.provider} is not a {abc.__name__}")
    return obj


def build_executor(cfg, plugins, checkpoint_dir, detokenizer=None) -> PyExecutor:
    """Each factory is called as factory(group_config, own_config, *context)."""
    chosen = _selected(cfg, plugins)

    def make(kind, abc, *context, **kw):
        group_cfg, entry = chosen[kind]
        obj = entry.load()(group_cfg, component_config(group_cfg, entry.config), *context, **kw)
        return _check(obj, abc, kind.replace("_", " "), entry)

    names = {kind: f"{kind.replace('_', ' ')} {entry.name!r} ({entry.provider})" for kind, (_, entry) in chosen.items()}
    names["kv_cache"] = names["kv_cache_manager"]  # its key in the ResourceManager
    engine = make("model_engine", ModelEngine, cfg.model, checkpoint_dir, plugins["model"])
    kv_cache = make("kv_cache_manager", KVCacheManager, engine.kv_cache_spec())
    return PyExecutor(
        capacity_scheduler=make("capacity_scheduler", CapacityScheduler),
        micro_batch_scheduler=make("micro_batch_scheduler", MicroBatchScheduler),
        resource_manager=ResourceManager({"kv_cache": kv_cache}),
        model_engine=engine,
        decoder=make("decoder", Decoder, seed=cfg.model.seed),
        detokenizer=detokenizer,
        component_names=names,
    )


def validate_names(cfg, plugins) -> None:
    _selected(cfg, plugins)
