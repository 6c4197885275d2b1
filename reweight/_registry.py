"""A small named registry, shared by weighting nets and meta-gradient engines."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[T]):
    """Maps names to objects; unknown names raise ``ValueError`` listing the registered ones."""

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._entries: dict[str, T] = {}
        self._descriptions: dict[str, str] = {}

    def register(self, name: str, *, description: str = "") -> Callable[[T], T]:
        """Decorator filing ``obj`` under ``name``; re-registering a name warns and replaces it."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self._kind} name must be a non-empty string, got {name!r}")

        def decorator(obj: T) -> T:
            if name in self._entries:
                warnings.warn(f"{self._kind} {name!r} was already registered; replacing it", stacklevel=2)
            self._entries[name] = obj
            self._descriptions[name] = description
            return obj

        return decorator

    def unregister(self, name: str) -> None:
        """Remove ``name`` (``KeyError`` if it is not registered)."""
        del self._entries[name]
        del self._descriptions[name]

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ValueError(f"unknown {self._kind} {name!r}; registered: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def describe(self) -> dict[str, str]:
        return {name: self._descriptions[name] for name in self.names()}

    def __contains__(self, name: object) -> bool:
        return name in self._entries
