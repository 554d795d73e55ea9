"""Plug-ins by name: objectives, data kinds and rewards register themselves in a `Registry`; a recipe names
a registered one (`dpo`) or any importable one outside the package (`my_module:MyObjective`).

The registry knows no plug-in by import: each registry names the package whose modules register into it,
imported on first lookup, so adding a plug-in to the package is one new file.
"""

from __future__ import annotations

import difflib
import importlib
import os
import pkgutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Generic, TypeVar

from rlalign.config.loader import RecipeError

T = TypeVar("T")


def import_spec(spec: str, *, where: str, search_dirs: Iterable[str | os.PathLike] = ()) -> Any:
    """The object `package.module:name` names. The working directory and `search_dirs` (say, the recipe's
    folder) are importable, as for a script; every failure is one `RecipeError` line prefixed by `where`."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise RecipeError(f"{where}: expected 'package.module:name', got '{spec}'")
    for folder in [os.getcwd(), *map(str, search_dirs)]:
        folder = str(Path(folder).resolve())
        if folder not in sys.path:
            sys.path.append(folder)
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as err:
        raise RecipeError(
            f"{where}: module '{err.name}' not found (looked in the working directory too)"
        ) from None
    except AttributeError:
        raise RecipeError(f"{where}: module '{module}' has no attribute '{name}'") from None
    except Exception as err:  # the user's module failed while importing: say how, in one line
        raise RecipeError(f"{where}: importing '{module}' failed: {type(err).__name__}: {err}") from None


def load_callable(spec: str, *, where: str, search_dirs: Iterable[str | os.PathLike] = ()) -> Any:
    """`import_spec`, checked to be callable."""
    fn = import_spec(spec, where=where, search_dirs=search_dirs)
    if not callable(fn):
        name = spec.partition(":")[2]
        raise RecipeError(f"{where}: '{name}' is not callable (it is {type(fn).__name__} {fn!r:.40})")
    return fn


class Registry(Generic[T]):
    """Name -> plug-in. `package` is imported module by module on the first lookup, so that every
    plug-in defined there has registered itself."""

    def __init__(self, kind: str, package: str):
        self.kind, self.package = kind, package
        self._items: dict[str, T] = {}
        self._discovered = False

    def register(self, name: str, item: T) -> T:
        if name in self._items and self._items[name] is not item:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._items[name] = item
        return item

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        package = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self.package}.{info.name}")

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._discover()
        return name in self._items

    def get(self, spec: str, *, where: str, search_dirs: Iterable[str | os.PathLike] = ()) -> T:
        """A registered name, or `module:attr` imported from outside the package."""
        if ":" in spec:
            return import_spec(spec, where=where, search_dirs=search_dirs)
        self._discover()
        if spec not in self._items:
            near = difflib.get_close_matches(spec, list(self._items), n=1)
            hint = f"did you mean '{near[0]}'? " if near else ""
            raise RecipeError(
                f"{where}: unknown {self.kind} '{spec}' ({hint}valid: {', '.join(sorted(self._items))}, "
                "or module:name)"
            )
        return self._items[spec]
