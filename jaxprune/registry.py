"""Named registries of methods (structured pruners, element-wise pruners, pretraining methods, ...).

Each method module registers itself once, by name, with a typed entry; commands, ``--help``, bench
scripts and tests read their choices from the registry instead of listing names (jaxpruner's
``ALGORITHM_REGISTRY``, Levanter's ``register_subclass``)::

    STRUCTURED = Registry("structured pruning criterion")
    STRUCTURED.register(StructuredCriterion(name="l2", ...))
    STRUCTURED.get("l2")          # the entry; an unknown name is one UserError line listing the choices
    STRUCTURED.names()            # in registration order (built-ins first, then plugins)

Plugins (``plugins.load_plugin``) add entries the same way; a name registered twice is refused.
"""

from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from .errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries with a ``name`` attribute, by name, in registration order."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, entry: T) -> T:
        name = getattr(entry, "name")
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise UserError(f"{self.kind}: a method name is a non-empty word (got {name!r})")
        if name in self._entries:
            raise UserError(f"{self.kind} {name!r} is registered twice (a plugin may not reuse a built-in name)")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests and plugin reloads)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UserError(f"unknown {self.kind} {name!r}: expected one of {', '.join(self._entries)}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[T]:
        return iter(tuple(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)
