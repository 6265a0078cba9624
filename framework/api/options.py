"""`LLM(**options)` keyword options as Hydra overrides."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from framework.config import GROUPS, ModelConfig


def _override_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


DOTTED_ONLY = ("speculative",)  # groups whose fields are set as `group.field` only (`speculative.max_batch_size`)


def _field_owners() -> dict[str, list[str]]:
    owners: dict[str, list[str]] = {}
    groups = {"model": ModelConfig, **{g: base for g, (base, _) in GROUPS.items() if g not in DOTTED_ONLY}}
    for group, cls in groups.items():
        for f in dataclasses.fields(cls):
            owners.setdefault(f.name, []).append(group)
    return owners


def options_to_overrides(model: str | None, options: dict[str, Any]) -> list[str]:
    """`LLM(...)` keyword options as Hydra overrides: `scheduler="max_utilization"` selects a group
    option, `max_num_tokens=256` sets the one field of that name, `**{"kv_cache.block_size": 8}`
    sets a dotted key."""
    overrides = []
    if "max_tokens" in options:
        raise TypeError(
            "max_tokens is a per-request setting (SamplingParams.max_tokens); the KV cache size is kv_cache.max_tokens"
        )
    if model is not None:
        overrides.append(f"model.path={_override_value(str(model))}")
    owners = _field_owners()
    for key, value in options.items():
        if key in GROUPS:
            if not isinstance(value, str):
                raise TypeError(f"{key} selects an implementation by name; got {value!r}")
            overrides.append(f"{key}={value}")
        elif "." in key:
            overrides.append(f"{key}={_override_value(value)}")
        elif key in owners and len(owners[key]) == 1:
            overrides.append(f"{owners[key][0]}.{key}={_override_value(value)}")
        elif key in owners:
            raise TypeError(f"option {key!r} is ambiguous; say which: {', '.join(g + '.' + key for g in owners[key])}")
        else:
            raise TypeError(f"unknown option {key!r}; options: {', '.join(sorted(owners))} (or 'group.field')")
    return overrides
