"""Model adapters (architecture facts as code) for diffusers DiTs, and architecture-generic helpers.

Every stage calls the helpers here (or :func:`get_adapter` directly); each helper asks the adapter of the
transformer it is given. Adapters register themselves in their own module (``sd3.py``, ``flux.py``, ...).
"""

from __future__ import annotations

from typing import Any

import torch

from shiva_export.models.base import (
    VAE_SCALE,
    InputSpec,
    ModelAdapter,
    adapter_for_architecture,
    get_adapter,
    load_transformer,
    register_adapter,
    supported_architectures,
    supported_classes,
    torch_dtype,
)
from shiva_export.models.sd3 import INPUT_NAMES, OUTPUT_NAME, SD3Adapter, build_embedded

__all__ = [
    "ModelAdapter",
    "SD3Adapter",
    "InputSpec",
    "INPUT_NAMES",
    "OUTPUT_NAME",
    "VAE_SCALE",
    "register_adapter",
    "get_adapter",
    "adapter_for_architecture",
    "supported_classes",
    "supported_architectures",
    "build_embedded",
    "check_image_size",
    "load_transformer",
    "make_inputs",
    "input_names",
    "num_blocks",
    "router_dims",
    "num_image_tokens",
    "torch_dtype",
]


def _cfg(transformer: Any) -> Any:
    return getattr(transformer, "config", transformer)


def check_image_size(transformer: Any, height: int, width: int) -> None:
    """Raises :class:`~shiva_export.errors.ShapeError` unless the pixel size fits the model."""
    get_adapter(transformer).check_image_size(_cfg(transformer), height, width)


def num_image_tokens(transformer: Any, height: int, width: int) -> int:
    return get_adapter(transformer).num_image_tokens(_cfg(transformer), height, width)


def input_names(transformer: Any) -> tuple[str, ...]:
    return get_adapter(transformer).input_names(_cfg(transformer))


def make_inputs(
    transformer: Any, spec: InputSpec, seed: int = 0, dtype: torch.dtype = torch.float32, timestep: float | None = None
) -> dict[str, torch.Tensor]:
    """Seeded forward keyword arguments for ``transformer`` (or a config with ``_class_name``)."""
    return get_adapter(transformer).make_inputs(_cfg(transformer), spec, seed, dtype, timestep)


def num_blocks(transformer) -> int:
    return get_adapter(transformer).num_blocks(transformer)


def router_dims(transformer) -> tuple[int, int]:
    return get_adapter(transformer).router_dims(transformer)
