"""The one place optional heavy packages are named.

Optional packages (ONNX Runtime, TensorRT, TensorRT-RTX, polygraphy, matplotlib, peft) are never imported at
module top level anywhere in ``shiva_export``; modules bind ``ort = lazy_import("onnxruntime")`` and the
import happens on first attribute access. A missing package raises :class:`MissingDependencyError`
naming the exact ``pip install`` line. ``tests/test_dependencies.py`` pins the set of names passed here.
"""

from __future__ import annotations

import importlib
import importlib.util
import types
from typing import Any

from shiva_export.errors import MissingDependencyError

__all__ = ["lazy_import", "is_available", "require", "INSTALL_HINTS"]

#: module name -> the pip line that provides it.
INSTALL_HINTS: dict[str, str] = {
    "onnxruntime": "pip install onnxruntime  (or onnxruntime-gpu; never both)",
    "tensorrt": "pip install 'tensorrt-cu12>=10.12'  (needs NVIDIA's package index and a CUDA driver)",
    "tensorrt_rtx": "pip install tensorrt-rtx-cu12==1.7.1.116",
    "polygraphy": "pip install polygraphy",
    "matplotlib": "pip install matplotlib",
    "peft": "pip install 'peft>=0.21'  (or pip install 'shiva-export[train]')",
}


class LazyModule(types.ModuleType):
    """A proxy that imports ``name`` on first attribute access."""

    def __init__(self, name: str, purpose: str | None = None):
        super().__init__(name)
        self._lazy_name = name
        self._lazy_purpose = purpose
        self._lazy_module: types.ModuleType | None = None

    def _load(self) -> types.ModuleType:
        if self._lazy_module is None:
            self._lazy_module = require(self._lazy_name, purpose=self._lazy_purpose)
        return self._lazy_module

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_lazy_"):
            raise AttributeError(attr)
        return getattr(self._load(), attr)

    def __repr__(self) -> str:
        state = "loaded" if self._lazy_module is not None else "not loaded"
        return f"<lazy module {self._lazy_name!r} ({state})>"


def lazy_import(name: str, purpose: str | None = None) -> Any:
    """Returns a proxy for the optional module ``name`` that imports it on first use.

    Args:
        name (str): Module name, one of :data:`INSTALL_HINTS`.
        purpose (str): What the module is needed for, used in the error message. Defaults to None.
    """
    if name not in INSTALL_HINTS:
        raise KeyError(f"{name!r} is not a registered optional dependency; add it to INSTALL_HINTS")
    return LazyModule(name, purpose)


def is_available(name: str) -> bool:
    """Whether ``name`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def require(name: str, purpose: str | None = None) -> types.ModuleType:
    """Imports and returns ``name`` or raises :class:`MissingDependencyError` with the install line."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        what = f" for {purpose}" if purpose else ""
        hint = INSTALL_HINTS.get(name, f"pip install {name}")
        raise MissingDependencyError(
            f"Optional package {name!r} is needed{what} but cannot be imported ({err}). Install it: {hint}."
        ) from err
