"""Packages whose names load their module on first use: the submodules import torch, transformers, FAISS or Ray
(seconds), while `prunekit --help` and argument errors must answer at once."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, modules: dict[str, str]) -> tuple[Callable, Callable, list[str]]:
    """`(__getattr__, __dir__, __all__)` for `package`, whose public names are `modules`: module -> names
    (space-separated), each imported from its module when first asked for."""
    exports = {name: module for module, names in modules.items() for name in names.split()}

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module '{package}' has no attribute '{name}'")

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__, sorted(exports)
