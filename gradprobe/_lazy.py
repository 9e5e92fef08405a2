"""Names a package imports on first use (PEP 562): ``import gradprobe`` and the report's terminal
view stay free of torch, matplotlib and seaborn until a name that needs them is read."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_names(package: str, homes: dict[str, tuple[str, ...]], *, submodules: bool = False
               ) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``__all__``, ``__getattr__`` and ``__dir__`` for ``package``, whose names are defined in
    ``homes`` (module, relative to ``package`` when it starts with a dot -> the names it
    defines). A name is imported when first read, then kept in the package. ``submodules``: a
    submodule read as an attribute (``gradprobe.metrics``) is imported too."""
    home_of = {name: module for module, names in homes.items() for name in names}
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        if name in home_of:
            value = getattr(importlib.import_module(home_of[name], package), name)
            namespace[name] = value
            return value
        if submodules and not name.startswith("_"):
            try:
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{package}.{name}":
                    raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(home_of))

    return sorted(home_of), __getattr__, __dir__
