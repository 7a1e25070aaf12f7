"""Exceptions raised by shiva-export.

Every user-facing failure is a :class:`ShivaError` subclass whose message is one line shaped as
``<what failed>: <bad value>. <valid range or choices>. <what to do>.`` The CLI maps each class to an
exit code (see ``shiva_export.cli._exit_codes``) and prints only that line unless ``--debug`` is given.

:class:`ShivaInternalError` is deliberately *not* a :class:`ShivaError`: it signals a bug in
shiva-export itself, so the CLI lets its traceback through.
"""

from __future__ import annotations

__all__ = [
    "ShivaError",
    "ConfigError",
    "RecipeError",
    "ModelNotFoundError",
    "WeightsError",
    "ShapeError",
    "RouterError",
    "ExportError",
    "OutputPathError",
    "ParityError",
    "MissingDependencyError",
    "HardwareError",
    "PreflightError",
    "EngineBuildError",
    "ManifestError",
    "ShivaInternalError",
]


class ShivaError(Exception):
    """Base class of user-facing errors (bad input or a runtime failure the user can act on)."""


class ConfigError(ShivaError, ValueError):
    """A pruning or export setting is out of range (ratio, keep schedule, dtype, opset, ...)."""


class RecipeError(ShivaError, ValueError):
    """A recipe file is missing, malformed, or inconsistent with the model it is applied to."""


class ModelNotFoundError(ShivaError, LookupError):
    """A model name cannot be resolved (unknown name, or weights not available offline)."""


class WeightsError(ShivaError, OSError):
    """A weights folder cannot be read or does not hold a diffusers SD3 transformer."""


class ShapeError(ShivaError, ValueError):
    """Height, width, batch or sequence length are invalid for the model."""


class RouterError(ShivaError, ValueError):
    """Router weights cannot be loaded or do not fit the model/config."""


class ExportError(ShivaError, RuntimeError):
    """The ONNX exporter failed or produced a graph that violates the static-shape contract."""


class OutputPathError(ShivaError, OSError):
    """An output path cannot be written."""


class ParityError(ShivaError, AssertionError):
    """Validation ran and a parity threshold was exceeded (CLI exit code 3)."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class MissingDependencyError(ShivaError, ImportError):
    """An optional package (onnxruntime, tensorrt, tensorrt_rtx, ...) is needed but not installed."""


class HardwareError(ShivaError, RuntimeError):
    """The requested hardware (CUDA GPU, a supported compute capability) is not available."""


class PreflightError(ShivaError, ValueError):
    """An ONNX graph holds a construct the chosen TensorRT backend will not build."""


class EngineBuildError(ShivaError, RuntimeError):
    """A TensorRT builder failed to parse or build a network."""


class ManifestError(ShivaError, ValueError):
    """An engine manifest is missing, malformed, or does not match the engine/backend/GPU."""


class ShivaInternalError(Exception):
    """An invariant of shiva-export itself was violated: this is a bug, please report it."""
