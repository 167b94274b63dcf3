"""A name -> ``"module:Class"`` registry whose modules load only when a name is used.

Every pluggable part (attention backends, eviction policies, KV event publishers, KV connectors,
model classes, router policies) is an abstract base plus one of these, so an optional dependency
(triton, nixl, ...) is imported only by the deployments that pick it.
"""

from __future__ import annotations

import importlib
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class LazyRegistry(Generic[T]):
    """``kind`` names the setting in error messages (e.g. ``"attention_backend"``)."""

    def __init__(self, kind: str, entries: dict[str, str] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, str] = dict(entries or {})

    def register(self, name: str, target: str) -> None:
        """Register ``name`` -> ``"module:Class"`` (imported on first use)."""
        if ":" not in target:
            raise ValueError(f"{self.kind} target must look like 'module:Class', got {target!r}")
        self._entries[name] = target

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def load(self, name: str) -> type[T]:
        """The class registered as ``name``; ValueError naming the choices when unknown."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {self.names()}")
        module, attr = self._entries[name].split(":")
        cls: type[T] = getattr(importlib.import_module(module), attr)
        return cls

    def create(self, name: str, **kwargs: Any) -> T:
        return self.load(name)(**kwargs)
