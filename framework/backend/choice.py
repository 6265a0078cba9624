"""Which registered backend runs a model: `engine.backend=<name>`, or `auto`, the backend of the highest
priority whose class supports the device, dtype and head size (ties keep registration order)."""

from __future__ import annotations

import logging

from framework.backend.base import Backend
from framework.config import component_config
from framework.plugins.kinds import KINDS

logger = logging.getLogger(__name__)

AUTO = "auto"


def _describe(device, dtype, head_dim: int) -> str:
    return f"{device.type} / {str(dtype).replace('torch.', '')} / head size {head_dim}"


def _load(entry) -> type[Backend]:
    """A backend's class (`auto` reads its priority and what it supports before building one)."""
    return KINDS["backend"].checked_factory(entry)


def _candidates(registry):
    """(entry, class) of every backend whose class loads, highest priority first."""
    found = []
    for entry in registry:
        try:
            found.append((entry, _load(entry)))
        except ImportError as exc:
            logger.warning("backend %r skipped by engine.backend=auto: %s", entry.name, exc)
    return sorted(found, key=lambda pair: -pair[1].priority)


def choose_backend(engine_config, registry, device, dtype, head_dim: int):
    """Build the backend the config selects from the `backend` registry; logs which and why."""
    wanted = _describe(device, dtype, head_dim)
    if engine_config.backend == AUTO:
        entry, cls = _best(registry, device, dtype, head_dim)
    else:
        entry, cls = _named(engine_config.backend, registry, device, dtype, head_dim)
        logger.info("engine.backend=%s (%s) runs %s", entry.name, entry.provider, wanted)
    return cls(engine_config, component_config(engine_config, entry.config), device, dtype)


def _best(registry, device, dtype, head_dim: int):
    """(entry, class) of the backend `auto` takes: the first of the highest priority that supports the model."""
    passed = []
    for entry, cls in _candidates(registry):
        if cls.supports(device, dtype, head_dim):
            logger.info(
                "engine.backend=auto chose %r (%s): priority %d, supports %s%s", entry.name, entry.provider,
                cls.priority, _describe(device, dtype, head_dim), f"; passed over {', '.join(passed)}" if passed else "",
            )
            return entry, cls
        passed.append(f"{entry.name!r} (does not support it here)")
    raise ValueError(f"no backend supports {_describe(device, dtype, head_dim)}; installed: {registry.describe()}")


def _named(name: str, registry, device, dtype, head_dim: int):
    entry = registry.get(name)
    cls = _load(entry)
    if not cls.supports(device, dtype, head_dim):
        raise ValueError(
            f"backend {name!r} ({entry.provider}) does not support {_describe(device, dtype, head_dim)} here; "
            f"use engine.backend=auto or one of: {registry.describe()}"
        )
    return entry, cls
