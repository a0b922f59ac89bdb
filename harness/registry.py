"""A small decorator registry, in the style of timm's model registry.

Every extension point (encoders, fusion heads, methods, dataset builders) owns one ``Registry``. Entries
are registered with a decorator at import time, looked up by name, and listed for the CLI and for tests
that are parametrized over everything registered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownEntryError(KeyError):
    """Raised when a name is not registered; the message lists what is."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0])


class Registry(Generic[T]):
    """Name → object map filled by a decorator.

    ``kind`` names the extension point in error messages ("unknown encoder 'x'; known: a, b").
    """

    def __init__(self, kind: str, load: Callable[[], object] | None = None) -> None:
        """``load`` (optional) imports the modules that register the entries, once, on the first
        lookup: so that importing the registry (e.g. to validate a config) does not import them all."""
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._load = load

    @property
    def entries(self) -> dict[str, T]:
        if self._load is not None:
            load, self._load = self._load, None
            load()
        return self._entries

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@ENCODERS.register("mlp")``. Registering a name twice is a programming error."""

        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj  # not ``entries``: registering is what loading does
            return obj

        return decorator

    @contextmanager
    def temporarily(self, name: str, obj: T) -> Iterator[T]:
        """Register ``obj`` for the duration of a ``with`` block (plug-ins under test)."""
        self.entries  # noqa: B018  (load the registered entries first: a later load must not clash)
        self.register(name)(obj)
        try:
            yield obj
        finally:
            del self._entries[name]

    def get(self, name: str) -> T:
        try:
            return self.entries[name]
        except KeyError:
            raise UnknownEntryError(
                f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self.names()) or '(none)'}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def names(self) -> list[str]:
        return sorted(self.entries)

    def items(self) -> list[tuple[str, T]]:
        return [(name, self.entries[name]) for name in self.names()]
