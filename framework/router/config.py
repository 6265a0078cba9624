"""The built-in routers' own settings (keys of the `replay` group), importable without torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PrefixAffinityConfig:
    max_imbalance: int = 8  # how many more requests than the least loaded replica a prefix's replica may hold
