"""Which registered backend runs a model: `engine.backend=<name>`, or `auto`, the backend of the highest
priority whose class supports the device, dtype and head size and implements the attention variants
the model's layers use (ties keep registration order)."""

from __future__ import annotations

import logging

from framework.backend.base import Backend
from framework.config import component_config
from framework.plugins.kinds import KINDS

logger = logging.getLogger(__name__)

AUTO = "auto"


def _describe(device, dtype, head_dim: int, variants=frozenset()) -> str:
    described = f"{device.type} / {str(dtype).replace('torch.', '')} / head size {head_dim}"
    return described + "".join(f" / {variant} attention" for variant in sorted(variants))


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


def choose_backend(engine_config, registry, device, dtype, head_dim: int, variants=frozenset(), name: str | None = None):
    """Build the backend the config selects (or `name`) from the `backend` registry; logs which and
    why. `variants`: the attention variants the model's layers use (`Backend.attention_variants`)."""
    wanted = _describe(device, dtype, head_dim, variants)
    name = name or engine_config.backend
    if name == AUTO:
        entry, cls = _best(registry, device, dtype, head_dim, variants)
    else:
        entry, cls = _named(name, registry, device, dtype, head_dim, variants)
        logger.info("engine.backend=%s (%s) runs %s", entry.name, entry.provider, wanted)
    return cls(engine_config, component_config(engine_config, entry.config), device, dtype)


def _lacks(cls, device, dtype, head_dim: int, variants) -> str | None:
    """Why `cls` cannot run the model here, or None when it can."""
    if not cls.supports(device, dtype, head_dim):
        return "does not run this device, dtype or head size"
    missing = sorted(set(variants) - cls.attention_variants)
    return f"lacks {', '.join(missing)} attention" if missing else None


def _best(registry, device, dtype, head_dim: int, variants):
    """(entry, class) of the backend `auto` takes: the first of the highest priority that runs the model."""
    passed = []
    wanted = _describe(device, dtype, head_dim, variants)
    for entry, cls in _candidates(registry):
        reason = _lacks(cls, device, dtype, head_dim, variants)
        if reason is None:
            logger.info(
                "engine.backend=auto chose %r (%s): priority %d, supports %s%s", entry.name, entry.provider,
                cls.priority, wanted, f"; passed over {', '.join(passed)}" if passed else "",
            )
            return entry, cls
        passed.append(f"{entry.name!r} ({reason})")
    raise ValueError(f"no backend supports {wanted}; installed: {registry.describe()}")


def _named(name: str, registry, device, dtype, head_dim: int, variants):
    entry = registry.get(name)
    cls = _load(entry)
    reason = _lacks(cls, device, dtype, head_dim, variants)
    if reason is not None:
        raise ValueError(
            f"backend {name!r} ({entry.provider}) {reason} ({_describe(device, dtype, head_dim, variants)}); "
            f"use engine.backend=auto or one of: {registry.describe()}"
        )
    return entry, cls
