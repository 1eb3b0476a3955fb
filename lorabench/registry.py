"""One small registry class for every axis that the configs name by string.

Registration is a decorator that refuses duplicate or malformed names, so that adding a method is
one file, one import line and one preset YAML. Lookups of unknown names raise ``ConfigError``
listing the valid choices.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterator, TypeVar

from lorabench.errors import ConfigError

T = TypeVar("T")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Registry:
    """A name -> object mapping for one kind of component (e.g. ``optimizer``)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[T], T]:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"{self.kind} name {name!r} must be lowercase snake_case ([a-z][a-z0-9_]*)")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered by {self._entries[name]!r}")

        def decorator(obj: T) -> T:
            self._entries[name] = obj
            try:
                obj.registry_name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return obj

        return decorator

    def get(self, name: str, *, where: str | None = None) -> Any:
        if name not in self._entries:
            label = where or self.kind
            raise ConfigError(f"unknown {label} {name!r}; valid choices: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter(sorted(self._entries.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)


ADAPTERS = Registry("adapter")
INITIALIZERS = Registry("initializer")
OPTIMIZERS = Registry("optimizer")
PROCEDURES = Registry("procedure")
REGULARIZERS = Registry("regularizer")
DATASETS = Registry("dataset")
MODELS = Registry("model")
