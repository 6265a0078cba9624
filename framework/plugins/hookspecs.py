"""The hooks a plugin implements: one `register_<kinds>(register)` hook per component kind (the
table in `framework.plugins.kinds`), plus `config_search_path()`. Each `register_*` hook receives a
`register` callback:

    register(name, factory, config=None)

`factory` is a class or callable, or a lazy "module:attr" string so that registration modules never
import torch. `config` is an optional dataclass of the component's own settings; its fields become
Hydra config keys of the component's config group.
"""

from __future__ import annotations

import pluggy

from framework.plugins.kinds import KINDS

hookspec = pluggy.HookspecMarker("framework")
hookimpl = pluggy.HookimplMarker("framework")


class FrameworkHookSpecs:
    @hookspec
    def config_search_path(self):
        """Return a config search path entry (or a list of them), e.g. "pkg://my_plugin.conf", whose
        YAML presets become options of the framework's config groups."""


def _register_hook(kind):
    def hook(self, register):
        pass

    hook.__name__ = hook.__qualname__ = kind.hook
    hook.__doc__ = f"Register {kind.doc}"
    return hookspec(hook)


for _kind in KINDS.values():
    setattr(FrameworkHookSpecs, _kind.hook, _register_hook(_kind))
