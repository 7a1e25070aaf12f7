"""shiva-export: Shiva-DiT static top-k token pruning for diffusers DiTs, exported to ONNX and TensorRT.

Importing the package is cheap: public names resolve lazily, and no optional backend (onnxruntime,
tensorrt, tensorrt_rtx, polygraphy) is ever imported at top level.
"""

from shiva_export._version import __version__

_LAZY = {
    "ShivaConfig": "shiva_export.prune.api",
    "apply_shiva_": "shiva_export.prune.api",
    "remove_shiva_": "shiva_export.prune.api",
    "record_selection": "shiva_export.prune.api",
    "RouterBank": "shiva_export.prune.router",
    "load_routers": "shiva_export.prune.router",
    "save_routers": "shiva_export.prune.router",
    "load_recipe": "shiva_export.recipe",
    "Recipe": "shiva_export.recipe",
    "load_transformer": "shiva_export.models",
    "InputSpec": "shiva_export.models",
    "get_adapter": "shiva_export.models",
    "ModelAdapter": "shiva_export.models",
    "export_onnx": "shiva_export.export.onnx",
    "ExportResult": "shiva_export.export.onnx",
    "export_pruned": "shiva_export.export.pruned",
    "build_engines": "shiva_export.engines.budgets",
    "build_engine": "shiva_export.engines.builder",
    "preflight": "shiva_export.engines.preflight",
    "EngineRunner": "shiva_export.engines.runner",
    "validate_parity": "shiva_export.validate.compare",
    "benchmark_speed": "shiva_export.validate.speed",
    "check_parity": "shiva_export.export.parity",
    "ParityReport": "shiva_export.export.parity",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'shiva_export' has no attribute {name!r}")
