"""Loud registries for encoders, projectors, datasets, recipes and model sources.

A duplicate name is an error naming both owners; an unknown name lists the known ones. Third-party packages add
entries through the ``modaltune.plugins`` entry-point group: each entry names a module that registers its
components when imported, so a separate CLI process sees them too.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from modaltune.shared.errors import ModaltuneError, suggest

T = TypeVar("T")

PLUGIN_GROUP = "modaltune.plugins"


class Registry(Generic[T]):
    """A name -> object table for one kind of component.

    Example:
        >>> projectors = Registry("projector")
        >>> @projectors.register("identity")
        ... def build_identity(): ...
        >>> projectors.get("identity").__name__
        'build_identity'
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._owners: dict[str, str] = {}

    def register(self, name: str, obj: T | None = None, *, owner: str | None = None):
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""

        def add(item: T) -> T:
            who = owner or _owner_of(item)
            if name in self._items:
                raise ModaltuneError(
                    f"{self.kind} {name!r} is registered twice: by {self._owners[name]} and by {who}; "
                    "rename one of them"
                )
            self._items[name] = item
            self._owners[name] = who
            return item

        if obj is None:
            return add
        return add(obj)

    def get(self, name: str) -> T:
        """Return the entry for ``name``; an unknown name lists the known ones."""
        load_plugins()
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "none"
            raise ModaltuneError(f"unknown {self.kind} {name!r}{suggest(name, self._items)}; known: {known}")
        return self._items[name]

    def owner(self, name: str) -> str:
        """Where ``name`` was registered from."""
        self.get(name)
        return self._owners[name]

    def names(self) -> list[str]:
        """Sorted registered names (plugins included)."""
        load_plugins()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        load_plugins()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _owner_of(obj: object) -> str:
    module = inspect.getmodule(obj)
    qual = getattr(obj, "__qualname__", type(obj).__name__)
    return f"{module.__name__ if module else '?'}.{qual}"


_plugins_loaded = False


def load_plugins() -> None:
    """Import every module named in the ``modaltune.plugins`` entry-point group (once per process)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a broken plugin must not hide which one it was
            raise ModaltuneError(f"plugin {ep.name!r} ({ep.value}) failed to load: {exc}") from exc


Builder = Callable[..., object]

ENCODERS: Registry[Builder] = Registry("encoder")
PROJECTORS: Registry[Builder] = Registry("projector")
DATASETS: Registry[Builder] = Registry("dataset")
RECIPES: Registry[object] = Registry("recipe")
