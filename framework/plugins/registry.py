"""A registry of named implementations of one component kind."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


class UnknownNameError(LookupError):
    """A config named an implementation that no installed plugin provides."""


class DuplicateNameError(ValueError):
    """Two plugins registered the same name for one kind."""


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[..., Any] | str
    config: type | None
    provider: str  # the distribution (or module) that registered it

    def load(self) -> Callable[..., Any]:
        if not isinstance(self.factory, str):
            return self.factory
        module_name, _, attr = self.factory.partition(":")
        try:
            module = importlib.import_module(module_name)
            return getattr(module, attr)
        except (ImportError, AttributeError) as exc:
            raise ImportError(
                f"{self.name!r} from {self.provider} points at {self.factory!r}, which cannot be loaded: {exc}"
            ) from exc


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, factory, config: type | None = None, *, provider: str = "?") -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} names must be non-empty strings, got {name!r} from {provider}")
        if name in self._entries:
            first = self._entries[name].provider
            raise DuplicateNameError(
                f"{self.kind} {name!r} is registered twice: by {first} and by {provider}"
            )
        self._entries[name] = Entry(name, factory, config, provider)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries.values())

    def names(self) -> list[str]:
        return list(self._entries)

    def describe(self) -> str:
        return ", ".join(f"{e.name} ({e.provider})" for e in self._entries.values()) or "none"

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; available: {self.describe()}"
            ) from None
