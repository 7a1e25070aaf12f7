"""SD3 / SD3.5 adapter: the architecture facts of diffusers' ``SD3Transformer2DModel``.

Quirks handled here (why they matter for routing):
- ``JointTransformerBlock.forward`` returns ``(encoder_hidden_states, hidden_states)``; the last block has
  ``context_pre_only=True`` and returns ``None`` for the text stream (it is never used afterwards).
- SD3.5-Medium (MMDiT-X) adds an image-only self-attention (``attn2``) in ``dual_attention_layers`` and
  RMS qk-norm. Both act per image token (attn2 only among image tokens), so a routed block runs them on
  the kept tokens with unchanged code.
- Position embeddings are added once in ``pos_embed`` (cropped sin-cos table of ``pos_embed_max_size``
  patches per side), so gathered tokens carry their position and need nothing extra (unlike Flux RoPE).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shiva_export.errors import ConfigError, ModelNotFoundError, ShapeError, WeightsError
from shiva_export.logging import get_logger

__all__ = [
    "SD3Adapter",
    "InputSpec",
    "check_supported",
    "load_transformer",
    "build_embedded",
    "check_image_size",
    "num_image_tokens",
    "make_inputs",
    "INPUT_NAMES",
    "OUTPUT_NAME",
    "VAE_SCALE",
]

logger = get_logger(__name__)

#: ONNX tensor names reuse diffusers' forward-argument names, so engines drop into existing pipelines.
INPUT_NAMES = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
OUTPUT_NAME = "sample"
#: Pixels per latent cell (the SD3 VAE downsamples by 8).
VAE_SCALE = 8
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ConfigError(f"Unknown dtype: {name!r}. Choose one of {', '.join(_DTYPES)}.")
    return _DTYPES[name]


def check_supported(transformer: nn.Module) -> None:
    from diffusers import SD3Transformer2DModel

    if not isinstance(transformer, SD3Transformer2DModel):
        raise ConfigError(
            f"No adapter for {type(transformer).__name__!r}. Supported: ['SD3Transformer2DModel'] (SD3, SD3.5). "
            "Note: adapters live in shiva_export/models/."
        )


def _transformer_config(transformer_or_config: Any) -> Any:
    return getattr(transformer_or_config, "config", transformer_or_config)


def check_image_size(config: Any, height: int, width: int) -> None:
    """Raises :class:`ShapeError` unless ``height`` and ``width`` (pixels) fit the model."""
    cfg = _transformer_config(config)
    step = VAE_SCALE * cfg.patch_size
    max_px = (cfg.pos_embed_max_size or 0) * step
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v <= 0 or v % step:
            raise ShapeError(f"--{name} {v} is not a positive multiple of {step} px (VAE 8 x patch {cfg.patch_size}). Use e.g. {max(step, (v // step) * step if isinstance(v, int) else step)}.")
        if max_px and v > max_px:
            raise ShapeError(
                f"--{name} {v} exceeds the model's position-embedding range of {max_px} px "
                f"(pos_embed_max_size {cfg.pos_embed_max_size} patches x {step} px). Use {step}..{max_px}."
            )


def num_image_tokens(config: Any, height: int, width: int) -> int:
    cfg = _transformer_config(config)
    step = VAE_SCALE * cfg.patch_size
    return (height // step) * (width // step)


@dataclass(frozen=True)
class InputSpec:
    """Static input shapes of one export/engine.

    Args:
        batch (int): Prompts per call. With ``cfg`` the model batch is ``2 * batch``.
        height (int): Image height in pixels.
        width (int): Image width in pixels.
        text_len (int): Text tokens.
        cfg (bool): Batch holds ``[uncond; cond]`` halves.
    """

    batch: int
    height: int
    width: int
    text_len: int
    cfg: bool

    def __post_init__(self):
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ShapeError(f"--batch {self.batch} is invalid; expected an integer >= 1 (prompts per call).")
        if not isinstance(self.text_len, int) or self.text_len < 1:
            raise ShapeError(f"text length {self.text_len} is invalid; expected an integer >= 1.")

    @property
    def model_batch(self) -> int:
        return self.batch * (2 if self.cfg else 1)

    def shapes(self, config: Any) -> dict[str, tuple[int, ...]]:
        cfg = _transformer_config(config)
        b = self.model_batch
        return {
            "hidden_states": (b, cfg.in_channels, self.height // VAE_SCALE, self.width // VAE_SCALE),
            "encoder_hidden_states": (b, self.text_len, cfg.joint_attention_dim),
            "pooled_projections": (b, cfg.pooled_projection_dim),
            "timestep": (b,),
        }

    def to_dict(self) -> dict:
        return {"batch": self.batch, "height": self.height, "width": self.width, "text_len": self.text_len, "cfg": self.cfg}


def make_inputs(config: Any, spec: InputSpec, seed: int = 0, dtype: torch.dtype = torch.float32, timestep: float | None = None) -> dict[str, torch.Tensor]:
    """Seeded random inputs in the model's forward-argument names (``timestep`` stays float32).

    With CFG the uncond half's text embedding differs from the cond half's (as in a real pipeline), and
    both halves share the latent and timestep.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    shapes = spec.shapes(config)
    half = spec.batch
    lat = torch.randn((half, *shapes["hidden_states"][1:]), generator=g)
    txt = torch.randn(shapes["encoder_hidden_states"], generator=g)
    pooled = torch.randn(shapes["pooled_projections"], generator=g)
    t = torch.rand((half,), generator=g) * 1000.0 if timestep is None else torch.full((half,), float(timestep))
    if spec.cfg:
        lat = torch.cat([lat, lat])
        t = torch.cat([t, t])
    return {
        "hidden_states": lat.to(dtype),
        "encoder_hidden_states": txt.to(dtype),
        "pooled_projections": pooled.to(dtype),
        "timestep": t.float(),
    }


def build_embedded(config: dict[str, Any], seed: int = 0) -> nn.Module:
    """Builds an ``SD3Transformer2DModel`` from a config dict with seeded random weights (no download)."""
    from diffusers import SD3Transformer2DModel

    cfg = dict(config)
    if "dual_attention_layers" in cfg:
        cfg["dual_attention_layers"] = tuple(cfg["dual_attention_layers"])
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = SD3Transformer2DModel(**cfg)
    except TypeError as err:
        raise ConfigError(f"Invalid SD3Transformer2DModel config: {err}. Check [model.config] in the recipe.") from None
    return model.eval()


def _is_transformer_folder(p: Path) -> bool:
    return (p / "config.json").is_file()


def load_transformer(
    *,
    recipe=None,
    weights: str | os.PathLike | None = None,
    dtype: str = "fp32",
) -> nn.Module:
    """Loads the transformer named by ``recipe`` or from a local diffusers folder.

    Args:
        recipe (Recipe): Model recipe (hub repo id + subfolder, or an embedded config).
        weights (PathLike): Local diffusers folder: a transformer folder (``config.json`` +
            safetensors) or a pipeline folder with a ``transformer/`` subfolder. Loaded through
            ``SD3Transformer2DModel.from_pretrained``, the same code as for hub ids. Defaults to None.
        dtype (str): ``fp32``, ``fp16`` or ``bf16``. Defaults to ``fp32``.
    """
    from diffusers import SD3Transformer2DModel

    td = torch_dtype(dtype)
    if weights is None and recipe is not None and recipe.model.source == "local":
        weights = recipe.local_pipeline_path()
    if weights is not None:
        p = Path(weights).expanduser()
        if not p.exists():
            raise WeightsError(f"--weights folder does not exist: {p}. Pass a diffusers transformer folder (config.json + *.safetensors).")
        if not p.is_dir() or not os.access(p, os.R_OK | os.X_OK):
            raise WeightsError(f"--weights is not a readable folder: {p}. Pass a diffusers transformer folder.")
        if _is_transformer_folder(p):
            folder, sub = p, None
        elif _is_transformer_folder(p / "transformer"):
            folder, sub = p, "transformer"
        else:
            raise WeightsError(
                f"--weights {p} holds no config.json (nor transformer/config.json). "
                "Pass the folder written by SD3Transformer2DModel.save_pretrained or a pipeline folder."
            )
        try:
            model = SD3Transformer2DModel.from_pretrained(str(folder), subfolder=sub, torch_dtype=td, local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise WeightsError(f"Cannot load a SD3 transformer from {p}: {str(err).splitlines()[0]}. Is it a diffusers SD3/SD3.5 transformer folder?") from None
        check_supported(model)
        return model.eval()

    if recipe is None:
        raise ConfigError("load_transformer needs a recipe or weights.")
    if recipe.model.source == "embedded":
        model = build_embedded(recipe.model.config, recipe.model.seed)
        return model if td == torch.float32 else model.to(td)

    repo, sub = recipe.model.repo_id, recipe.model.subfolder
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    attempts = [True] if offline else [True, False]
    last: Exception | None = None
    for local_only in attempts:
        try:
            model = SD3Transformer2DModel.from_pretrained(repo, subfolder=sub, torch_dtype=td, local_files_only=local_only)
            check_supported(model)
            return model.eval()
        except Exception as err:  # noqa: BLE001 - hub/network errors come in many types
            last = err
    reason = str(last).splitlines()[0][:160] if last else "unknown error"
    raise ModelNotFoundError(
        f"Model {recipe.name!r} ({repo}, subfolder {sub!r}) is not in the local Hugging Face cache and cannot be downloaded "
        f"here ({reason}). Download it elsewhere and pass --weights PATH (a diffusers transformer or pipeline folder)."
    )


class SD3Adapter:
    """Declarative facts the exporter needs about SD3/SD3.5 (optimum ``OnnxConfig`` style)."""

    MODEL_CLASSES = ("SD3Transformer2DModel",)
    BLOCKS_ATTR = "transformer_blocks"
    BLOCK_RETURNS = ("encoder_hidden_states", "hidden_states")
    INPUT_NAMES = INPUT_NAMES
    OUTPUT_NAME = OUTPUT_NAME
    DYNAMIC_AXES = {name: {0: "batch_size"} for name in INPUT_NAMES} | {OUTPUT_NAME: {0: "batch_size"}}
