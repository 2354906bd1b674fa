"""Loud registries for encoders, projectors, recipes and model sources.

A duplicate name is an error naming both owners; an unknown name lists the known ones. Every package adds its
entries through the ``modaltune.plugins`` entry-point group, modaltune's own modality packages included
(``modaltune.vision.plugin``, ``modaltune.audio.plugin``, ``modaltune.text.plugin``): each entry names a module that
registers its components when imported, so a separate CLI process sees them too. A plugin may *declare* an entry
whose module is imported only when the entry is first asked for, so listing recipes stays light and a missing
optional dependency is reported, with its fix, only to whoever uses that entry.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from modaltune.shared.errors import ModaltuneError, suggest

T = TypeVar("T")

PLUGIN_GROUP = "modaltune.plugins"
BUILTIN_PLUGINS = ("modaltune.text.plugin", "modaltune.vision.plugin", "modaltune.audio.plugin")


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
        self._declared: dict[str, tuple[str, str]] = {}  # name -> (module that registers it, fix if it cannot)

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

    def declare(self, name: str, module: str, *, missing: str = "") -> None:
        """Name an entry that ``module`` registers when imported; the import happens on first :meth:`get`.

        Args:
            name: the entry's name.
            module: the module that registers it.
            missing: what to do when that module cannot be imported (e.g. "pip install 'modaltune[vision]'").
        """
        if name in self._declared and self._declared[name][0] != module:
            raise ModaltuneError(f"{self.kind} {name!r} is declared twice: by {self._declared[name][0]} and by {module}")
        self._declared[name] = (module, missing)

    def get(self, name: str) -> T:
        """Return the entry for ``name``; an unknown name lists the known ones."""
        load_plugins()
        if name not in self._items and name in self._declared:
            import importlib

            module, missing = self._declared[name]
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise ModaltuneError(f"{self.kind} {name!r} cannot load: {exc}"
                                     + (f"; {missing}" if missing else "")) from None
        if name not in self._items:
            known = ", ".join(self.names()) or "none"
            raise ModaltuneError(f"unknown {self.kind} {name!r}{suggest(name, self.names())}; known: {known}")
        return self._items[name]

    def owner(self, name: str) -> str:
        """Where ``name`` was registered from."""
        self.get(name)
        return self._owners[name]

    def names(self) -> list[str]:
        """Sorted registered and declared names (plugins included)."""
        load_plugins()
        return sorted(set(self._items) | set(self._declared))

    def __contains__(self, name: object) -> bool:
        load_plugins()
        return name in self._items or name in self._declared

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
    import importlib

    # modaltune's own modality packages are plugins too; they are imported by name as well, so a stale metadata
    # folder (an old egg-info beside the sources) cannot hide them
    for module in BUILTIN_PLUGINS:
        importlib.import_module(module)
    for ep in entry_points(group=PLUGIN_GROUP):
        if ep.value in BUILTIN_PLUGINS:
            continue
        try:
            ep.load()
        except Exception as exc:  # a broken plugin must not hide which one it was
            raise ModaltuneError(f"plugin {ep.name!r} ({ep.value}) failed to load: {exc}") from exc


Builder = Callable[..., object]

ENCODERS: Registry[Builder] = Registry("encoder")
PROJECTORS: Registry[Builder] = Registry("projector")
RECIPES: Registry[object] = Registry("recipe")
