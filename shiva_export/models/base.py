"""The architecture adapter interface and its registry (optimum ``OnnxConfig`` / diffusers block-registry style).

Everything that differs between diffusers DiTs is declared on one :class:`ModelAdapter` subclass per
architecture, in one file under ``shiva_export/models/``, registered with :func:`register_adapter` under
its diffusers class name. Every stage asks the adapter (via :func:`get_adapter`) instead of knowing a model:

- blocks and how routing is installed on them (:meth:`ModelAdapter.install_routing`);
- the router's context widths (:meth:`ModelAdapter.router_dims`);
- input names, static shapes and seeded sample inputs for export and parity;
- image-size rules and the image-token count;
- export-only rewrites (:meth:`ModelAdapter.export_context`);
- the diffusers transformer and pipeline classes, the real repo ids.

Adding an architecture = one adapter file here + a recipe + tests: modules of this package are discovered
on first use, so no other file lists architectures.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from shiva_export.checks import check_finite
from shiva_export.errors import ConfigError, ModelNotFoundError, ShapeError, WeightsError
from shiva_export.logging import get_logger
from shiva_export.models.components import import_pipeline_class
from shiva_export.prune.api import check_context, register_adapter_lookup
from shiva_export.utils.io import sha256_bytes, sha256_file_cached

__all__ = [
    "ModelAdapter",
    "InputSpec",
    "register_adapter",
    "get_adapter",
    "adapter_for_architecture",
    "supported_classes",
    "supported_architectures",
    "load_transformer",
    "torch_dtype",
    "transformer_config",
    "weights_sha256",
    "check_weights_sha256",
    "read_class_name",
    "VAE_SCALE",
    "CACHE_FIX_HOOK",
]

logger = get_logger(__name__)

#: Name of the diffusers hooks an adapter's :meth:`ModelAdapter.prepare_cache` registers.
CACHE_FIX_HOOK = "shiva_cache_fix"
#: Pixels per latent cell (the SD3, Flux, PixArt and DiT VAEs all downsample by 8).
VAE_SCALE = 8
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ConfigError(f"Unknown dtype: {name!r}. Choose one of {', '.join(_DTYPES)}.")
    return _DTYPES[name]


def transformer_config(transformer_or_config: Any) -> Any:
    return getattr(transformer_or_config, "config", transformer_or_config)


@dataclass(frozen=True)
class InputSpec:
    """Static input shapes of one export/engine (architecture-independent; the adapter maps it to tensors).

    Args:
        batch (int): Prompts per call. With ``cfg`` the model batch is ``2 * batch``.
        height (int): Image height in pixels.
        width (int): Image width in pixels.
        text_len (int): Text tokens (ignored by architectures without a text stream).
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

    def shapes(self, transformer_or_config: Any) -> dict[str, tuple[int, ...]]:
        """``{input name: static shape}`` of the graph inputs, as the model's adapter declares them."""
        return get_adapter(transformer_or_config).input_shapes(transformer_config(transformer_or_config), self)

    def to_dict(self) -> dict:
        return {
            "batch": self.batch,
            "height": self.height,
            "width": self.width,
            "text_len": self.text_len,
            "cfg": self.cfg,
        }


class ModelAdapter:
    """Architecture facts of one diffusers transformer class. Subclasses set the class attributes and
    implement the methods marked *abstract*; the rest are shared defaults.

    Class attributes:
        NAME (str): Recipe ``architecture`` key (``"sd3"``, ``"flux"``).
        MODEL_CLASS (str): diffusers transformer class name; the registry key.
        PIPELINE_CLASS (str): diffusers pipeline class ``generate`` runs (None: no runtime yet).
        REPO_IDS (dict[str, str]): Built-in model name -> hub repo id of the real checkpoints.
        OUTPUT_NAME (str): Graph output name (diffusers' ``Transformer2DModelOutput.sample``).
        TIMESTEP_SCALE (float): Factor from the call's ``timestep`` to the 0..1000 scale that phase
            schedules use (Flux takes t in [0, 1]).
        BATCHED_CFG (bool): The pipeline runs classifier-free guidance as one ``[uncond; cond]`` batch.
        CONFIG_CLASS_NAMES (tuple[str, ...]): Further ``_class_name`` values of ``transformer/config.json``
            that mean this model (hub DiT and PixArt checkpoints still say ``Transformer2DModel``).
        UNSUPPORTED_CALL_ARGS (dict[str, str]): Forward arguments a static graph cannot honour, with the fix
            (a call that sets one is refused; others that are not graph inputs are refused generically).
        EXAMPLE_PROMPT (str): The prompt benchmarks use when none is given (DiT: a class label).
        TEXT_PROMPTS (bool): The pipeline is conditioned on free text (False: class ids, as DiT).
        CONTEXT_MODES (tuple[str, ...]): The ``ShivaConfig.context`` modes its routing implements
            (``"drop"`` everywhere; ``"keep"`` where rejected tokens can still give keys and values).
    """

    NAME: ClassVar[str]
    MODEL_CLASS: ClassVar[str]
    PIPELINE_CLASS: ClassVar[str | None] = None
    REPO_IDS: ClassVar[dict[str, str]] = {}
    OUTPUT_NAME: ClassVar[str] = "sample"
    TIMESTEP_SCALE: ClassVar[float] = 1.0
    BATCHED_CFG: ClassVar[bool] = True
    CONFIG_CLASS_NAMES: ClassVar[tuple[str, ...]] = ()
    UNSUPPORTED_CALL_ARGS: ClassVar[dict[str, str]] = {}
    EXAMPLE_PROMPT: ClassVar[str] = "a red cube on a blue floor"
    TEXT_PROMPTS: ClassVar[bool] = True
    CONTEXT_MODES: ClassVar[tuple[str, ...]] = ("drop",)

    # -- model classes and loading ------------------------------------------------------------------------
    def model_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.MODEL_CLASS)

    def build_embedded(self, config: dict[str, Any], seed: int = 0) -> nn.Module:
        """The transformer from a config dict with seeded random weights (no download)."""
        cls = self.model_class()
        self.check_config_ranges(config)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = cls(**self.normalize_config(dict(config)))
        except TypeError as err:
            raise ConfigError(
                f"Invalid {self.MODEL_CLASS} config: {err}. Check [model.config] in the recipe."
            ) from None
        return model.eval()

    def check_config_ranges(self, config: dict[str, Any]) -> None:
        """Negative or absurd sizes in ``[model.config]``: one line, not an allocation that never ends."""
        for key, v in dict(config).items():
            if isinstance(v, int) and not isinstance(v, bool) and not 0 <= v <= 65536:
                raise ConfigError(
                    f"[model.config] {key} = {v} is out of range; expected an integer in 0..65536. Fix the recipe."
                )
        self._check_config_types(config)

    def _check_config_types(self, config: dict[str, Any]) -> None:
        """A value of another type than the model class's default (``num_layers = "six"``), named before the
        constructor fails somewhere inside with a TypeError that does not say which key."""
        import inspect

        try:
            params = inspect.signature(self.model_class().__init__).parameters
        except (TypeError, ValueError, AttributeError, ImportError):
            return
        for key, v in dict(config).items():
            d = params[key].default if key in params else None
            want = int if type(d) is int else bool if type(d) is bool else str if type(d) is str else None
            if want is None or isinstance(v, want) and not (want is int and isinstance(v, bool)):
                continue
            if want is int and type(v) is float:  # 32.0 for 32: the constructor takes it
                continue
            raise ConfigError(
                f"[model.config] {key} = {v!r} has the wrong type; expected {want.__name__} (the default is {d!r}). Fix the recipe."
            )

    def normalize_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """TOML gives lists where the model wants tuples; adapters convert such keys here."""
        return config

    def dora_target_modules(self) -> str:
        """Regex (peft ``target_modules``, matched with ``re.fullmatch`` against full module names) of the
        linears that stage-3 DoRA adapts: the blocks' attention and FFN linears only (the paper's choice),
        never the AdaLN modulation, the embedders or the output projection. Abstract: an architecture
        without it cannot train with ``--dora``."""
        raise ConfigError(
            f"{self.MODEL_CLASS} declares no DoRA target modules. Train without --dora, or add dora_target_modules to its adapter."
        )

    # -- blocks and routing (abstract unless noted) --------------------------------------------------------
    def blocks(self, transformer: nn.Module) -> list[nn.Module]:
        """The routable blocks in flat-index order (block 0 first). Default: ``transformer.transformer_blocks``."""
        return list(transformer.transformer_blocks)

    def num_blocks(self, transformer: nn.Module) -> int:
        """Routable blocks, as one flat index."""
        return len(self.blocks(transformer))

    def block_image_output(self, output: Any) -> torch.Tensor:
        """The image tokens ``[B, N, D]`` of one block's output. Default: a tensor as is, or the second
        item of an ``(encoder_hidden_states, hidden_states)`` pair (SD3 and Flux blocks)."""
        return output[1] if isinstance(output, tuple) else output

    def config_num_blocks(self, config: Any) -> int:
        """:meth:`num_blocks` from a config alone (the runtime never loads the weights of ort/trt pipelines).
        Default: ``num_layers``."""
        return int(dict(transformer_config(config))["num_layers"])

    def router_dims(self, transformer: nn.Module) -> tuple[int, int]:
        """``(temb width, pooled width)`` of the router's context vectors."""
        raise NotImplementedError

    def install_routing(self, transformer: nn.Module) -> None:
        """Makes ``transformer`` route its blocks through ``shiva_export.prune.api`` (state already attached)."""
        raise NotImplementedError

    def remove_routing(self, transformer: nn.Module) -> None:
        """Undoes :meth:`install_routing` exactly."""
        raise NotImplementedError

    def check_context(self, context: str) -> str:
        """``context`` if the routing implements it (:attr:`CONTEXT_MODES`), else one :class:`ConfigError` line
        naming the architecture; call it before loading a model."""
        if check_context(context) not in self.CONTEXT_MODES:
            raise ConfigError(
                f"context {context!r} is not implemented for architecture {self.NAME!r} ({self.MODEL_CLASS}); it supports "
                f'{", ".join(self.CONTEXT_MODES)}. Use --context drop (recipe [prune] context = "drop") for this model.'
            )
        return context

    # -- shapes and inputs (abstract unless noted) --------------------------------------------------------
    def patch_px(self, config: Any) -> int:
        """Pixels per image token along one side. Default: the VAE's 8 x the config's ``patch_size``."""
        return VAE_SCALE * int(transformer_config(config).patch_size)

    def check_image_size(self, config: Any, height: int, width: int) -> None:
        """Default: both sides positive multiples of :meth:`patch_px`; adapters add their own limits."""
        step = self.patch_px(config)
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0 or v % step:
                raise ShapeError(
                    f"--{name} {v} is not a positive multiple of {step} px (VAE 8 x {step // VAE_SCALE} px per token side). "
                    f"Use e.g. {max(step, (v // step) * step if isinstance(v, int) else step)}."
                )

    def num_image_tokens(self, config: Any, height: int, width: int) -> int:
        """Default: the :meth:`patch_px` grid."""
        step = self.patch_px(config)
        return (height // step) * (width // step)

    def scheduler(self, shift: float = 3.0):
        """The diffusers scheduler the architecture's pipeline samples with. Default (SD3/SD3.5):
        ``FlowMatchEulerDiscreteScheduler(shift=shift)``."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=float(shift))

    def sampler_timesteps(self, config: Any, steps: int, num_image_tokens: int, shift: float = 3.0) -> list[float]:
        """Timesteps (0..1000 scale, sampling order) of the architecture's pipeline sampler at ``steps`` steps,
        as diffusers computes them (:meth:`scheduler`): training evaluates its learned schedule and cuts
        phases on these."""
        sched = self.scheduler(shift)
        sched.set_timesteps(steps)
        return [float(v) for v in sched.timesteps]

    def input_names(self, config: Any) -> tuple[str, ...]:
        """Graph input names, in the export's positional order (diffusers' forward-argument names)."""
        raise NotImplementedError

    def input_shapes(self, config: Any, spec: InputSpec) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def output_shape(self, config: Any, spec: InputSpec) -> tuple[int, ...]:
        """Static shape of :attr:`OUTPUT_NAME`: by default a latent image ``[B, C_out, H / 8, W / 8]`` (SD3, PixArt,
        DiT); an architecture with another layout (Flux's packed tokens) overrides it."""
        cfg = transformer_config(config)
        return (
            spec.model_batch,
            cfg.out_channels or cfg.in_channels,
            spec.height // VAE_SCALE,
            spec.width // VAE_SCALE,
        )

    def make_inputs(
        self,
        config: Any,
        spec: InputSpec,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        timestep: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Seeded keyword arguments of one forward call. May hold more than :meth:`input_names` (static
        extras such as Flux's position ids, which the export bakes in)."""
        raise NotImplementedError

    def float_inputs(self, config: Any) -> tuple[str, ...]:
        """Graph inputs cast to the export dtype (the others, e.g. ``timestep``, stay as they are)."""
        return tuple(n for n in self.input_names(config) if n != "timestep")

    def onnx_translations(self) -> dict:
        """``custom_translation_table`` entries for ``torch.onnx.export`` (default: none)."""
        return {}

    def full_config(self, config: Any) -> dict[str, Any]:
        """``config`` (dict, diffusers config or transformer) over the model class's ``__init__`` defaults,
        so config-only FLOP counts of real checkpoints need only the keys that differ."""
        import inspect

        cfg = transformer_config(config)
        out = {
            k: p.default
            for k, p in inspect.signature(self.model_class().__init__).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        out.update({k: v for k, v in dict(cfg).items() if not str(k).startswith("_")})
        return out

    def count_flops(
        self,
        config: Any,
        num_image_tokens: int,
        text_len: int,
        keep_ratios=None,
        *,
        batch: int = 1,
        bottleneck: int = 64,
        context: str = "drop",
    ):
        """Analytic matmul FLOPs of one forward (``shiva_export.models.flops`` convention) -> ``FlopCount``;
        ``context`` is the routing's ``ShivaConfig.context`` (refused unless in :attr:`CONTEXT_MODES`)."""
        raise NotImplementedError

    def export_context(self, transformer: nn.Module, inputs: dict[str, torch.Tensor]):
        """Context manager for export-only rewrites (default: none)."""
        return contextlib.nullcontext()

    # -- diffusers caches (``shiva_export.runtime.caches``) ------------------------------------------------
    #: The architecture's diffusers pipeline enters ``transformer.cache_context(...)`` around each call itself
    #: (Flux); otherwise ``runtime.caches`` sets the context with hooks on the transformer (SD3, PixArt, DiT).
    PIPELINE_SETS_CACHE_CONTEXT: ClassVar[bool] = False

    def prepare_cache(self, transformer: nn.Module) -> None:
        """Registers what diffusers' block-cache hooks need beyond diffusers' own block registry, as diffusers
        hooks named :data:`CACHE_FIX_HOOK` on the blocks; ``runtime.caches`` calls it before applying a
        cache (so these sit below the cache's hooks) and removes the hooks with the cache. Default: none."""

    # -- the diffusers pipeline (runtime: ``shiva_export.runtime``) ----------------------------------------
    def pipeline_class(self) -> type:
        """The diffusers pipeline class ``generate`` runs (:attr:`PIPELINE_CLASS`), imported quietly."""
        if not self.PIPELINE_CLASS:
            raise ConfigError(
                f"architecture {self.NAME!r} ({self.MODEL_CLASS}) declares no diffusers pipeline (PIPELINE_CLASS is None), so it "
                "cannot generate images; export it with `shiva-export onnx` / `trt`, or add the pipeline to its adapter."
            )
        return import_pipeline_class(self.PIPELINE_CLASS)

    def config_class_names(self) -> tuple[str, ...]:
        """``_class_name`` values of a transformer config that this adapter loads."""
        return (self.MODEL_CLASS, *self.CONFIG_CLASS_NAMES)

    def uses_cfg(self, guidance: float) -> bool:
        """Whether a pipeline call at ``guidance`` batches ``[uncond; cond]`` (doubling the model batch)."""
        return self.BATCHED_CFG and guidance > 1.0

    def check_embedded_recipe(self, recipe) -> None:
        """Recipe checks before an embedded pipeline is built (default: none)."""

    def embedded_pipeline(self, transformer: nn.Module, recipe):
        """The offline tiny pipeline around ``transformer`` (seeded components from
        :mod:`shiva_export.models.components`)."""
        raise ConfigError(
            f"architecture {self.NAME!r} has no offline embedded pipeline; pass --weights PATH (a diffusers pipeline folder)."
        )

    def pipeline_index_extras(self, pipe) -> dict[str, Any]:
        """Entries ``save_pretrained`` does not write but ``from_pretrained`` needs in ``model_index.json``
        (default: none)."""
        return {}

    def check_pipeline(self, pipe, recipe) -> None:
        """Checks a loaded pipeline against the recipe (default: none)."""

    def max_sequence_length(self, pipe, text_len: int) -> int | None:
        """The ``max_sequence_length`` to call the pipeline with so that the transformer sees ``text_len``
        text tokens (default: ``text_len``, one T5 encoder); None for pipelines without text."""
        return text_len

    def pipeline_text_len(self, pipe, max_sequence_length: int | None) -> int | None:
        """Text tokens the transformer receives when the pipeline runs with ``max_sequence_length``."""
        return max_sequence_length

    def pipeline_call(
        self,
        pipe,
        prompt: str,
        *,
        negative_prompt: str | None,
        steps: int,
        guidance: float,
        height: int | None,
        width: int | None,
        max_sequence_length: int | None,
        generator,
    ) -> dict[str, Any]:
        """Keyword arguments of one text-to-image pipeline call (``output_type`` is added by the caller).
        Default: the ``prompt`` / ``negative_prompt`` / size / ``max_sequence_length`` interface of SD3-style pipelines."""
        kw: dict[str, Any] = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "height": height,
            "width": width,
            "generator": generator,
        }
        if max_sequence_length is not None:
            kw["max_sequence_length"] = max_sequence_length
        return kw

    def artifact_config(self, config: dict[str, Any], spec: InputSpec) -> dict[str, Any]:
        """The transformer config a static-graph module exposes to its pipeline: ``sample_size`` (the latent
        size pipelines default their height/width to) becomes the graph's, for square graphs."""
        cfg = dict(config)
        if "sample_size" in cfg and spec.height == spec.width:
            cfg["sample_size"] = spec.height // VAE_SCALE
        return cfg

    def call_geometry(self, config: Any, call: dict[str, Any]) -> dict[str, int | None]:
        """``{"height", "width"}`` in pixels and ``"text_len"`` (None without text) of one forward call, from its
        bound arguments. Default: ``hidden_states`` ``[B, C, h, w]`` latents and ``encoder_hidden_states`` ``[B, T, C]``."""
        hs = call["hidden_states"]
        ehs = call.get("encoder_hidden_states")
        return {
            "height": int(hs.shape[-2]) * VAE_SCALE,
            "width": int(hs.shape[-1]) * VAE_SCALE,
            "text_len": int(ehs.shape[1]) if ehs is not None else None,
        }

    def static_inputs(self, config: Any, spec: InputSpec) -> dict[str, torch.Tensor]:
        """Forward arguments baked into the graph as constants (the extras of :meth:`make_inputs`, which the
        exporter closes over): a call must pass exactly these values."""
        inputs = self.make_inputs(config, spec, seed=0)
        names = set(self.input_names(config))
        return {k: v for k, v in inputs.items() if k not in names}

    # -- cached training data (``shiva-export train-data``, ``train --data``: ``shiva_export.train.cached``) ---
    #: Cached text tensor -> the forward argument it feeds. A train-data shard holds these (per sample, no batch
    #: axis) plus ``latents``; ``null.safetensors`` holds them for the pipeline's unconditional input.
    CACHE_TEXT_INPUTS: ClassVar[dict[str, str]] = {
        "prompt_embeds": "encoder_hidden_states",
        "pooled": "pooled_projections",
    }
    #: The training target: ``"flow"`` (rectified flow ``x_t = (1 - s) x0 + s eps``, ``s = t / 1000``, target
    #: ``eps - x0``: SD3, Flux) or ``"epsilon"`` (DDPM ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` with the
    #: :meth:`scheduler`'s ``alphas_cumprod``, target ``eps``: PixArt, DiT).
    PREDICTION: ClassVar[str] = "flow"

    def encode_text_cache(
        self, pipe, config: Any, prompts: list[str], text_len: int, device: str
    ) -> tuple[dict[str, torch.Tensor], int]:
        """The pipeline's own text encoding of ``prompts`` as the transformer (``config``) receives it with ``text_len`` text
        tokens: ``({key of CACHE_TEXT_INPUTS: [B, ...] CPU tensor}, prompts the encoders truncated)``. The prompt
        ``""`` encodes the unconditional input of classifier-free guidance. Abstract."""
        raise ConfigError(
            f"architecture {self.NAME!r} declares no text encoding for cached training data. Train on synthetic inputs (omit --data)."
        )

    def text_cache_info(self, pipe, text_len: int) -> dict[str, Any]:
        """What a train-data manifest records about the text encoding (default: ``max_sequence_length``); raises
        before any encoding when ``text_len`` does not fit the pipeline."""
        return {"max_sequence_length": self.max_sequence_length(pipe, text_len)}

    def encode_latent_cache(self, pipe, pixels: torch.Tensor) -> torch.Tensor:
        """Clean latents of preprocessed images ``[B, 3, H, W]`` in the layout of the transformer's ``hidden_states``,
        scaled as the pipeline unscales them before decoding. Default: ``(posterior mean - shift_factor) *
        scaling_factor`` ``[B, C, H/8, W/8]`` (deterministic: no sampling)."""
        vae = pipe.vae
        shift = float(getattr(vae.config, "shift_factor", 0.0) or 0.0)
        z = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mean
        return ((z - shift) * float(vae.config.scaling_factor)).float().cpu()

    def cache_shapes(self, config: Any, spec: InputSpec) -> dict[str, tuple[int, ...]]:
        """Per-sample shapes (no batch axis) of the cached tensors at ``spec``: ``latents`` as ``hidden_states``,
        each text tensor as the input it feeds."""
        shapes = self.input_shapes(transformer_config(config), spec)
        return {
            "latents": tuple(shapes["hidden_states"][1:]),
            **{k: tuple(shapes[name][1:]) for k, name in self.CACHE_TEXT_INPUTS.items()},
        }

    def noised_latents(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, target)`` of clean latents ``x0`` and noise ``eps`` at timesteps ``t`` ``[B]`` on the 0..1000
        scale, by :attr:`PREDICTION`."""
        view = (-1,) + (1,) * (x0.dim() - 1)
        if self.PREDICTION == "flow":
            sigma = (t / 1000.0).view(view)
            return (1.0 - sigma) * x0 + sigma * eps, eps - x0
        # DDPM: alphas_cumprod at fractional t, log-linear between the integer steps
        log_a = torch.log(self.scheduler().alphas_cumprod.double())
        lo = t.double().floor().clamp(0, len(log_a) - 1)
        hi = (lo + 1).clamp(max=len(log_a) - 1)
        w = t.double() - lo
        a = torch.exp(log_a[lo.long()] * (1 - w) + log_a[hi.long()] * w).float().view(view)
        return a.sqrt() * x0 + (1.0 - a).sqrt() * eps, eps

    def training_prediction(self, config: Any, output: torch.Tensor) -> torch.Tensor:
        """The part of the transformer's output the training target is compared with: all of it, except the
        learned-variance half of an ``"epsilon"`` model whose ``out_channels`` is twice ``in_channels``."""
        cfg = transformer_config(config)
        c_in, c_out = int(cfg.in_channels), int(getattr(cfg, "out_channels", None) or cfg.in_channels)
        if self.PREDICTION == "epsilon" and c_out == 2 * c_in:
            return output[:, :c_in]
        return output

    # -- loading ------------------------------------------------------------------------------------------
    def from_pretrained(
        self, location: str, subfolder: str | None, dtype: torch.dtype, local_files_only: bool
    ) -> nn.Module:
        """Loads real weights; a checkpoint with missing, unexpected or mismatched tensors is a load error
        (:class:`~shiva_export.errors.WeightsError`), never a model with freshly initialised parameters."""
        from diffusers.utils import logging as dlog

        level = dlog.get_verbosity()
        dlog.set_verbosity_error()  # the "newly initialized" warning becomes the error below
        try:
            model, info = self.model_class().from_pretrained(
                location,
                subfolder=subfolder,
                torch_dtype=dtype,
                local_files_only=local_files_only,
                output_loading_info=True,
            )
        finally:
            dlog.set_verbosity(level)
        where = f"{location}{'/' + subfolder if subfolder else ''}"
        for kind in ("missing_keys", "mismatched_keys", "unexpected_keys"):
            bad = list(info.get(kind) or [])
            if bad:
                names = ", ".join(str(b[0] if isinstance(b, (tuple, list)) else b) for b in bad[:3]) + (
                    f" and {len(bad) - 3} more" if len(bad) > 3 else ""
                )
                raise WeightsError(
                    f"{where}: the checkpoint does not match {self.MODEL_CLASS} ({kind.replace('_', ' ')}: {names}); "
                    "nothing is exported from uninitialised parameters. Pass the complete folder written by save_pretrained."
                )
        return model


# -- registry -----------------------------------------------------------------------------------------------
_ADAPTERS: dict[str, ModelAdapter] = {}
_DISCOVERED = False


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: registers one instance of an adapter under its ``MODEL_CLASS``."""
    if cls.MODEL_CLASS in _ADAPTERS and type(_ADAPTERS[cls.MODEL_CLASS]) is not cls:
        raise ConfigError(
            f"Adapter for {cls.MODEL_CLASS} registered twice ({type(_ADAPTERS[cls.MODEL_CLASS]).__name__}, {cls.__name__}). Keep one."
        )
    _ADAPTERS[cls.MODEL_CLASS] = cls()
    return cls


def _discover() -> None:
    """Imports every module of ``shiva_export.models`` once, so each adapter file registers itself."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    import shiva_export.models as pkg  # lazy: this module is imported while that package initialises

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in ("base",) and not info.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    _DISCOVERED = True


def supported_classes() -> list[str]:
    _discover()
    return sorted(_ADAPTERS)


def supported_architectures() -> list[str]:
    _discover()
    return sorted(a.NAME for a in _ADAPTERS.values())


def _unsupported(what: str) -> ConfigError:
    return ConfigError(
        f"No Shiva adapter for {what}. Supported: {', '.join(supported_classes())}; adapters live in shiva_export/models/."
    )


def adapter_for_architecture(name: str) -> ModelAdapter:
    """The adapter of a recipe ``architecture`` key (``"sd3"``, ``"flux"``)."""
    _discover()
    for a in _ADAPTERS.values():
        if a.NAME == name:
            return a
    raise ConfigError(f"Unknown architecture: {name!r}. Supported: {', '.join(supported_architectures())}.")


def get_adapter(obj: Any) -> ModelAdapter:
    """The adapter for a transformer instance or class, a diffusers config with ``_class_name``, a class
    name or an architecture key. Unsupported inputs raise one :class:`ConfigError` line listing the supported classes."""
    _discover()
    if isinstance(obj, ModelAdapter):
        return obj
    if isinstance(obj, str):
        if obj in _ADAPTERS:
            return _ADAPTERS[obj]
        for a in _ADAPTERS.values():
            if a.NAME == obj:
                return a
        raise _unsupported(repr(obj))
    cls = obj if isinstance(obj, type) else type(obj)
    if issubclass(cls, nn.Module):
        for c in cls.__mro__:
            if c.__name__ in _ADAPTERS:
                return _ADAPTERS[c.__name__]
        raise _unsupported(repr(cls.__name__))
    name = None
    with contextlib.suppress(Exception):
        name = obj["_class_name"]
    if name is None:
        name = getattr(obj, "_class_name", None)
    if name is None:
        raise ConfigError(
            f"Cannot tell the architecture of a {type(obj).__name__} without _class_name. Pass the transformer itself."
        )
    return get_adapter(str(name))


# prune lies below this package and never imports it: it asks this lookup for a transformer's adapter.
register_adapter_lookup(get_adapter)


# -- generic loading (one code path for every architecture) -------------------------------------------------
def read_class_name(folder: Path) -> str | None:
    """``_class_name`` of the diffusers ``config.json`` in ``folder`` (None when there is none to read)."""
    try:
        return json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError):
        return None


def weights_sha256(folder: str | os.PathLike) -> str:
    """Digest of a transformer folder's weights: the ``*.safetensors`` files in it (not its subfolders).
    One file: its sha256 (what ``sha256sum`` prints). Several (a sharded save): the sha256 of their
    ``sha256sum`` listing (``"<sha256>  <name>\\n"`` per file, sorted by name). No file: WeightsError."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise WeightsError(
            f"{folder} holds no *.safetensors weights. Pass the folder written by <Transformer>.save_pretrained."
        )
    digests = [(sha256_file_cached(f), f.name) for f in files]
    if len(digests) == 1:
        return digests[0][0]
    return sha256_bytes("".join(f"{d}  {n}\n" for d, n in digests).encode())


def check_weights_sha256(folder: Path, recipe) -> None:
    """A recipe whose ``[model] sha256`` is set loads only those exact weights (its router and schedule were
    trained on them, e.g. a DoRA-merged transformer)."""
    want = getattr(recipe.model, "sha256", None) if recipe is not None else None
    if not want:
        return
    got = weights_sha256(folder)
    if got != want:
        raise WeightsError(
            f"{folder}: transformer weights sha256 {got[:16]}... do not match recipe {recipe.name!r} [model] sha256 {want[:16]}...; "
            "its router and schedule were trained on other weights, so nothing is loaded. Pass the weights the recipe was written for."
        )


def load_transformer(*, recipe=None, weights: str | os.PathLike | None = None, dtype: str = "fp32") -> nn.Module:
    """Loads the transformer named by ``recipe`` or from a local diffusers folder, through its adapter.

    Args:
        recipe (Recipe): Model recipe (hub repo id + subfolder, an embedded config, or a local folder); its
            ``architecture`` picks the adapter. When its ``[model] sha256`` is set (a recipe written by
            ``shiva-export train --dora``), the local weights, the recipe's own or ``weights``, must have
            that :func:`weights_sha256`, else :class:`~shiva_export.errors.WeightsError`.
        weights (PathLike): Local diffusers folder: a transformer folder (``config.json`` + safetensors)
            or a pipeline folder with a ``transformer/`` subfolder. Its ``_class_name`` picks the adapter,
            and it loads through ``<ModelClass>.from_pretrained``, the same code as for hub ids.
        dtype (str): ``fp32``, ``fp16`` or ``bf16``. Defaults to ``fp32``.
    """
    td = torch_dtype(dtype)
    if weights is None and recipe is not None and recipe.model.source == "local":
        weights = recipe.local_model_path()  # a pipeline or transformer folder beside the recipe
    if weights is not None:
        p = Path(weights).expanduser()
        if not p.exists():
            raise WeightsError(
                f"--weights folder does not exist: {p}. Pass a diffusers transformer folder (config.json + *.safetensors)."
            )
        if not p.is_dir() or not os.access(p, os.R_OK | os.X_OK):
            raise WeightsError(f"--weights is not a readable folder: {p}. Pass a diffusers transformer folder.")
        if (p / "config.json").is_file():
            folder, sub = p, None
        elif (p / "transformer" / "config.json").is_file():
            folder, sub = p, "transformer"
        else:
            raise WeightsError(
                f"--weights {p} holds no config.json (nor transformer/config.json). "
                "Pass the folder written by <Transformer>.save_pretrained or a pipeline folder."
            )
        cls_name = read_class_name(folder / sub if sub else folder)
        if cls_name is None:
            raise WeightsError(
                f"--weights {p}: config.json has no _class_name. Pass a folder written by diffusers' save_pretrained."
            )
        adapter = get_adapter(cls_name)
        if recipe is not None and recipe.architecture != adapter.NAME:
            raise WeightsError(
                f"--weights {p} holds a {cls_name}, but recipe {recipe.name!r} is for architecture {recipe.architecture!r}. Pass the matching --model or --recipe."
            )
        check_weights_sha256(folder / sub if sub else folder, recipe)
        try:
            model = adapter.from_pretrained(str(folder), sub, td, True)
        except WeightsError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise WeightsError(
                f"Cannot load a {cls_name} from {p}: {str(err).splitlines()[0]}. Is it a diffusers transformer folder?"
            ) from None
        get_adapter(model)

        check_finite(model.state_dict(), f"weights {folder / sub if sub else folder}", WeightsError)
        return model.eval()

    if recipe is None:
        raise ConfigError("load_transformer needs a recipe or weights.")
    adapter = adapter_for_architecture(recipe.architecture)
    if recipe.model.source == "embedded":
        model = adapter.build_embedded(recipe.model.config, recipe.model.seed)
        return model if td == torch.float32 else model.to(td)

    repo, sub = recipe.model.repo_id, recipe.model.subfolder
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    last: Exception | None = None
    for local_only in (True, False):
        if not local_only:
            if offline:
                break
            endpoint = _hub_endpoint()
            if not hub_reachable(endpoint):  # no network: one line now, not ~34 s of retries
                last = ConnectionError(f"{endpoint} is not reachable within {_PROBE_SECONDS:g} s")
                break
        try:
            model = adapter.from_pretrained(repo, sub, td, local_only)
            get_adapter(model)
            return model.eval()
        except WeightsError:
            raise  # found, but incomplete: say so, do not report it as missing
        except Exception as err:  # noqa: BLE001 - hub/network errors come in many types
            last = err
    if last is None:
        last = ConnectionError("HF_HUB_OFFLINE is set")
    reason = str(last).splitlines()[0][:160] if last else "unknown error"
    raise ModelNotFoundError(
        f"Model {recipe.name!r} ({repo}, subfolder {sub!r}) is not in the local Hugging Face cache and cannot be downloaded "
        f"here ({reason}). Download it elsewhere and pass --weights PATH (a diffusers transformer or pipeline folder)."
    )


#: Seconds the hub connectivity probe waits (DNS + TCP connect) before a download is attempted.
_PROBE_SECONDS = 3.0


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(endpoint: str, timeout: float | None = None) -> bool:
    """Whether a TCP connection to ``endpoint``'s host opens within ``timeout`` seconds (DNS included).

    ``from_pretrained`` on a machine without network retries for ~34 s before failing; this probe lets
    :func:`load_transformer` fail in one line instead.
    """
    import socket
    import threading
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if not host:
        return False
    timeout = _PROBE_SECONDS if timeout is None else timeout
    result = {"ok": False}

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result["ok"] = True
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    t.start()
    t.join(timeout)
    return result["ok"]
