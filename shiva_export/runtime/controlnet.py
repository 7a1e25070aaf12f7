"""ControlNet (SD3 / SD3.5): diffusers' ``StableDiffusion3ControlNetPipeline`` around a Shiva-pruned transformer.

The ControlNet (``SD3ControlNetModel``) runs in PyTorch inside diffusers' pipeline; its block residuals go to the
transformer: on the torch backend to the routed diffusers model (diffusers' forward adds them after each block,
i.e. after the routed block's scatter), on ``ort``/``trt`` to the graph's ``controlnet_block_<i>`` inputs
(:mod:`shiva_export.export.controlnet`; graphs exported with ``controlnet_layers`` = the ControlNet's
``num_layers``, which :func:`controlnet_layers` reads from its config before anything is exported).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from shiva_export.errors import ConfigError, ModelNotFoundError, WeightsError
from shiva_export.runtime.pipeline import quiet_libraries

__all__ = [
    "ControlRun",
    "check_controlnet_options",
    "controlnet_num_layers",
    "controlnet_pipeline",
    "load_control_image",
    "load_controlnet",
]


def _location(path_or_name: str | os.PathLike) -> tuple[str, bool]:
    p = Path(path_or_name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise WeightsError(
                f"--controlnet {p} has no config.json; pass the folder an SD3ControlNetModel's save_pretrained wrote."
            )
        return str(p), True
    return str(path_or_name), False


def _config(path_or_name) -> dict[str, Any]:
    from diffusers import SD3ControlNetModel

    loc, local = _location(path_or_name)
    try:
        cfg = SD3ControlNetModel.load_config(loc, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - hub and filesystem errors come in many types
        reason = (str(err).splitlines() or [type(err).__name__])[0][:160]
        if local:
            raise WeightsError(f"--controlnet {loc}: cannot read its config ({reason}).") from None
        raise ModelNotFoundError(
            f"--controlnet {loc!r} is neither a folder nor in the local Hugging Face cache ({reason}); download it elsewhere and pass its folder."
        ) from None
    if cfg.get("_class_name") not in (None, "SD3ControlNetModel"):
        raise WeightsError(
            f"--controlnet {loc} is a {cfg.get('_class_name')}, not an SD3ControlNetModel; only SD3/SD3.5 ControlNets are supported."
        )
    return dict(cfg)


def controlnet_num_layers(path_or_name) -> int:
    """The ControlNet's number of block residuals (its config's ``num_layers``), read without loading its weights:
    what the graphs' ``controlnet_layers`` must be."""
    return int(_config(path_or_name)["num_layers"])


def load_controlnet(path_or_name):
    """The ``SD3ControlNetModel`` (local folder, or a cached hub id; never downloaded)."""
    from diffusers import SD3ControlNetModel

    loc, _ = _location(path_or_name)
    _config(path_or_name)  # one-line errors for a missing or foreign model
    with quiet_libraries():
        return SD3ControlNetModel.from_pretrained(loc, local_files_only=True).eval()


def controlnet_pipeline(pipe, controlnet):
    """``StableDiffusion3ControlNetPipeline.from_pipe(pipe, controlnet=...)``: the same components (the pruned
    transformer included), with ``pipe.shiva`` carried over and the ControlNet on the pipeline's device."""
    from diffusers import StableDiffusion3ControlNetPipeline, StableDiffusion3Pipeline

    if not isinstance(pipe, StableDiffusion3Pipeline):
        raise ConfigError(f"--controlnet needs an SD3/SD3.5 pipeline, got {type(pipe).__name__}; drop --controlnet.")
    width = {
        int(c.num_attention_heads) * int(c.attention_head_dim) for c in (controlnet.config, pipe.transformer.config)
    }
    if len(width) != 1:
        raise ConfigError(
            f"the ControlNet's width ({controlnet.inner_dim}) is not the transformer's; use a ControlNet made for this model."
        )
    controlnet = controlnet.to(pipe._execution_device)
    with quiet_libraries():
        out = StableDiffusion3ControlNetPipeline.from_pipe(
            pipe, controlnet=controlnet, transformer=pipe.transformer
        )  # by name: a graph module is no SD3Transformer2DModel
    out.set_progress_bar_config(disable=True)
    if hasattr(pipe, "shiva"):
        out.shiva = pipe.shiva
    return out


def load_control_image(path: str | os.PathLike, height: int, width: int):
    """The control image as RGB at the generation size (the pipeline resizes, this refuses what PIL cannot read)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--control-image {p} does not exist; pass an image file (PNG, JPEG).")
    try:
        with Image.open(p) as im:
            return im.convert("RGB").resize((width, height))
    except (UnidentifiedImageError, OSError) as err:
        raise ConfigError(f"--control-image {p} is not a readable image ({type(err).__name__}).") from None


def check_controlnet_options(architecture: str, controlnet, control_image, control_scale: float) -> None:
    """``--controlnet``, ``--control-image`` and ``--control-scale`` together or not at all; SD3/SD3.5 only."""
    import math

    if (controlnet is None) != (control_image is None):
        raise ConfigError("--controlnet and --control-image go together; give both (or neither).")
    if controlnet is None:
        if control_scale != 1.0:
            raise ConfigError(
                "--control-scale without --controlnet has no effect; add --controlnet and --control-image, or drop it."
            )
        return
    if architecture != "sd3":
        raise ConfigError(
            f"--controlnet is supported for SD3/SD3.5 models only, not {architecture}; drop --controlnet."
        )
    if not (isinstance(control_scale, (int, float)) and math.isfinite(control_scale)):
        raise ConfigError(f"--control-scale {control_scale} is not a finite number; pass e.g. --control-scale 0.7.")


class ControlRun:
    """What ``generate --controlnet`` adds: the graphs' residual inputs, the pipeline wrapper and the call arguments."""

    def __init__(self, path_or_name, control_image, control_scale: float = 1.0):
        self.source = str(path_or_name)
        self.layers = controlnet_num_layers(path_or_name)
        self.image_path = Path(control_image)
        self.scale = float(control_scale)
        self.model = None

    def wrap(self, pipe):
        if self.model is None:
            self.model = load_controlnet(self.source)
        return controlnet_pipeline(pipe, self.model)

    def call_kwargs(self, height: int, width: int) -> dict[str, Any]:
        return {
            "control_image": load_control_image(self.image_path, height, width),
            "controlnet_conditioning_scale": self.scale,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "controlnet": self.source,
            "layers": self.layers,
            "control_image": str(self.image_path),
            "control_scale": self.scale,
        }
