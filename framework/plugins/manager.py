"""Building the plugin manager and the registries it fills.

Built-in components register through the very hooks a third-party package implements; external
packages are found through the `framework.plugins` entry-point group. Environment switches:

- FRAMEWORK_DISABLE_PLUGIN_AUTOLOAD=1   load no external plugin
- FRAMEWORK_PLUGINS=a,b                 load only these external plugins (entry-point names)
- FRAMEWORK_BLOCK_PLUGINS=c             never load these
"""

from __future__ import annotations

import importlib.metadata as metadata
import logging
import os
import types
from dataclasses import dataclass, field

import pluggy

from framework.plugins.hookspecs import FrameworkHookSpecs
from framework.plugins.kinds import KINDS
from framework.plugins.registry import Registry

ENTRY_POINT_GROUP = "framework.plugins"

logger = logging.getLogger(__name__)

BUILTIN_MODULES = tuple(dict.fromkeys(kind.builtins for kind in KINDS.values()))


class PluginError(RuntimeError):
    """A plugin could not be loaded or validated; the message names its distribution."""


@dataclass
class Plugins:
    manager: pluggy.PluginManager
    registries: dict[str, Registry]
    providers: dict[str, str] = field(default_factory=dict)  # plugin name -> "dist version"
    provides: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # plugin -> kind -> names
    extra: tuple = ()  # the plugins given to create_plugin_manager
    autoload: bool = True  # whether the installed plugins (entry points) were loaded

    def __getitem__(self, kind: str) -> Registry:
        return self.registries[kind]

    def config_search_paths(self) -> list[str]:
        paths: list[str] = []
        for result in self.manager.hook.config_search_path():
            paths.extend([result] if isinstance(result, str) else list(result or []))
        return paths

    def recipe(self) -> dict:
        """What another process (a tensor-parallel rank) makes the same plugins from, by
        `plugins_from`: the extra plugins as module names, or as the objects (pickled: their classes
        must be importable there)."""
        return {"autoload": self.autoload, "extra": [p.__name__ if isinstance(p, types.ModuleType) else p for p in self.extra]}

    def describe(self) -> list[dict]:
        """What each loaded plugin provides, for `--list-plugins`."""
        return [
            {
                "name": name,
                "distribution": self.providers.get(name, name),
                "builtin": name in BUILTIN_MODULES,
                "provides": self.provides.get(name, {}),
            }
            for name, _ in self.manager.list_name_plugin()
        ]


def _env_list(var: str) -> set[str] | None:
    value = os.environ.get(var)
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


def _autoload_enabled() -> bool:
    return os.environ.get("FRAMEWORK_DISABLE_PLUGIN_AUTOLOAD", "").lower() not in ("1", "true", "yes")


def _load_entry_points(pm: pluggy.PluginManager, providers: dict[str, str]) -> None:
    allow = _env_list("FRAMEWORK_PLUGINS")
    block = _env_list("FRAMEWORK_BLOCK_PLUGINS") or set()
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in block or (allow is not None and ep.name not in allow):
            continue
        if pm.has_plugin(ep.name):
            continue
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else ep.name
        try:
            plugin = ep.load()
        except Exception as exc:
            raise PluginError(f"plugin {ep.name!r} (distribution {dist}) failed to import: {exc!r}") from exc
        pm.register(plugin, name=ep.name)
        providers[ep.name] = dist


def _warn_unmarked_hooks(pm: pluggy.PluginManager, plugin, who: str) -> None:
    """pluggy passes over a `register_*` function that lacks @hookimpl, so the plugin would be
    listed as providing nothing through it: say so."""
    unmarked = [
        attr for attr in dir(plugin)
        if attr.startswith("register_") and _defined_in(plugin, attr) and pm.parse_hookimpl_opts(plugin, attr) is None
    ]
    if unmarked:
        logger.warning(
            "plugin %s defines %s without @hookimpl, so it is not called; decorate it with "
            "framework.plugins.hookspecs.hookimpl", who, ", ".join(unmarked),
        )


def _defined_in(plugin, attr: str) -> bool:
    """Whether `plugin.attr` is a function of the plugin's own (not one a plugin module imported)."""
    value = getattr(plugin, attr, None)
    if not callable(value):
        return False
    return not isinstance(plugin, types.ModuleType) or getattr(value, "__module__", None) == plugin.__name__


def create_plugin_manager(extra_plugins=(), autoload: bool | None = None) -> Plugins:
    """Make a plugin manager with the built-ins, the installed plugins and `extra_plugins`
    (objects or modules with hook implementations, e.g. from a test), and fill the registries."""
    import importlib

    autoload = autoload if autoload is not None else _autoload_enabled()
    pm = pluggy.PluginManager("framework")
    pm.add_hookspecs(FrameworkHookSpecs)
    providers: dict[str, str] = {}
    for module_name in BUILTIN_MODULES:
        pm.register(importlib.import_module(module_name), name=module_name)
        providers[module_name] = "framework"
    if autoload:
        _load_entry_points(pm, providers)
    for plugin in extra_plugins:
        if pm.is_registered(plugin) or pm.has_plugin(getattr(plugin, "__name__", "")):
            continue  # already loaded through its entry point
        name = pm.register(plugin)
        providers[name] = getattr(plugin, "__name__", None) or type(plugin).__name__
    for name, plugin in pm.list_name_plugin():
        _warn_unmarked_hooks(pm, plugin, f"{name!r} ({providers.get(name, name)})")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        who = providers.get(pm.get_name(exc.plugin), "?")
        raise PluginError(f"plugin from {who} is invalid: {exc}") from exc

    registries = {kind.name: Registry(kind.label) for kind in KINDS.values()}
    provides: dict[str, dict[str, list[str]]] = {}
    for kind, hook_name in ((k.name, k.hook) for k in KINDS.values()):
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            provider = providers.get(impl.plugin_name, impl.plugin_name)
            names = provides.setdefault(impl.plugin_name, {}).setdefault(kind, [])

            def register(name, factory, config=None, _names=names, _provider=provider, _kind=kind):
                registries[_kind].register(name, factory, config, provider=_provider)
                _names.append(name)

            try:
                impl.function(register=register)
            except Exception as exc:
                raise PluginError(f"plugin {impl.plugin_name!r} ({provider}) failed in {hook_name}: {exc}") from exc
    return Plugins(pm, registries, providers, provides, tuple(extra_plugins), autoload)


def plugins_from(recipe: dict) -> Plugins:
    """The plugins `Plugins.recipe()` describes, made in this process."""
    import importlib

    extra = [importlib.import_module(p) if isinstance(p, str) else p for p in recipe["extra"]]
    return create_plugin_manager(extra, recipe["autoload"])
