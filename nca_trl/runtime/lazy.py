"""Package `__init__`s that import their modules on first use, so that `nca-trl <command> --help` imports nothing
heavy (torch, transformers, TRL) before it answers."""

from __future__ import annotations

import importlib

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, str]):
    """A module's `(__getattr__, __dir__)` for `package`: the public name `n` comes from the submodule `exports[n]`,
    imported on first use (`from nca_trl.generation import generate` works as with eager imports), and `dir()` (tab
    completion) lists the public names beside what the module holds already."""
    import sys

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
