"""Dependency hygiene: optional backends are imported lazily, and only through _imports."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import shiva_export

PKG = Path(shiva_export.__file__).parent
OPTIONAL = {"onnxruntime", "tensorrt", "tensorrt_rtx", "polygraphy", "matplotlib", "peft", "cuda", "pycuda"}


def _modules() -> list[str]:
    return sorted(
        m.name for m in pkgutil.walk_packages([str(PKG)], prefix="shiva_export.") if not m.name.endswith("__main__")
    )


def test_no_top_level_optional_imports():
    """No module imports an optional backend at top level (function-level imports are fine)."""
    offenders = []
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(PKG)}: {n}" for n in names if n.split(".")[0] in OPTIONAL]
    assert not offenders, offenders


def test_every_submodule_imports_with_backends_blocked():
    code = (
        "import importlib, importlib.abc, sys\n"
        f"BLOCKED = {sorted(OPTIONAL)!r}\n"
        "class B(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED: raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, B())\n"
        f"for m in {_modules()!r}: importlib.import_module(m)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_lazy_import_names_are_pinned():
    """Adding an optional dependency is a deliberate change: update this set and INSTALL_HINTS."""
    from shiva_export._imports import INSTALL_HINTS

    used = set()
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("lazy_import", "require"):
                if node.args and isinstance(node.args[0], ast.Constant):
                    used.add(node.args[0].value)
    assert used <= set(INSTALL_HINTS), used - set(INSTALL_HINTS)
    assert set(INSTALL_HINTS) == {"onnxruntime", "tensorrt", "tensorrt_rtx", "polygraphy", "matplotlib", "peft"}


def test_missing_backend_is_a_typed_error():
    code = (
        "import importlib.abc, sys\n"
        "class B(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'onnxruntime': raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, B())\n"
        "from shiva_export._imports import lazy_import\n"
        "from shiva_export.errors import MissingDependencyError\n"
        "ort = lazy_import('onnxruntime', purpose='parity')\n"
        "try:\n    ort.InferenceSession\nexcept MissingDependencyError as e:\n    print('MDE', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (
        "MDE Optional package 'onnxruntime' is needed for parity" in r.stdout and "pip install onnxruntime" in r.stdout
    )
