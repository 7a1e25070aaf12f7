"""Model adapters (architecture facts as code) for diffusers DiTs."""

from shiva_export.models.sd3 import (
    INPUT_NAMES,
    OUTPUT_NAME,
    InputSpec,
    SD3Adapter,
    build_embedded,
    check_image_size,
    load_transformer,
    make_inputs,
    num_image_tokens,
    torch_dtype,
)

__all__ = [
    "SD3Adapter",
    "InputSpec",
    "INPUT_NAMES",
    "OUTPUT_NAME",
    "build_embedded",
    "check_image_size",
    "load_transformer",
    "make_inputs",
    "num_image_tokens",
    "torch_dtype",
]
