"""ControlNet residuals as static graph inputs (SD3 / SD3.5).

diffusers' ``SD3Transformer2DModel.forward`` adds ``block_controlnet_hidden_states[int(i / interval)]``
(``interval = num_blocks / len(residuals)``) to the image tokens after every block ``i`` that is not
``context_pre_only``. The SD3 adapter keeps that forward (routing is a block override and a routed block returns
all ``N`` image tokens, scattered back), so the residuals land on every image token after the scatter, exactly
where diffusers adds them, by diffusers' own code.

A graph exported with ``controlnet_layers = L`` takes ``L`` extra inputs ``controlnet_block_0 .. L-1``
(``[B, N, inner_dim]``, the ControlNet's ``controlnet_block_samples``). A forward pre-hook
(:func:`residual_inputs`) turns those keyword arguments into the ``block_controlnet_hidden_states`` list of the
diffusers forward, for the exporter's trace and for the PyTorch parity reference alike. The ControlNet itself
runs in PyTorch (``StableDiffusion3ControlNetPipeline``), feeding the graph through
:class:`~shiva_export.runtime.modules.ShivaArtifactTransformer`; a call without ControlNet feeds zeros, which adds
nothing (``x + 0 == x`` bit for bit).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from shiva_export.errors import ConfigError, ShapeError
from shiva_export.models import get_adapter

__all__ = [
    "INPUT_PREFIX",
    "add_residual_hook",
    "as_feed",
    "check_controlnet_layers",
    "input_names",
    "residual_inputs",
    "sample_inputs",
]

INPUT_PREFIX = "controlnet_block_"
_KWARG = "block_controlnet_hidden_states"


def input_names(layers: int) -> tuple[str, ...]:
    return tuple(f"{INPUT_PREFIX}{i}" for i in range(layers))


def check_controlnet_layers(transformer_or_config, layers: int) -> int:
    """``layers`` when the model takes ControlNet residuals and ``layers`` divides into its blocks as diffusers
    indexes them; a one-line :class:`ConfigError` otherwise."""
    layers = int(layers)
    if layers == 0:
        return 0
    adapter = get_adapter(transformer_or_config)
    if adapter.NAME != "sd3":
        raise ConfigError(
            f"ControlNet residual inputs are supported for SD3/SD3.5 only, not {adapter.NAME}; drop --controlnet."
        )
    cfg = transformer_or_config.config if isinstance(transformer_or_config, nn.Module) else transformer_or_config
    n_blocks = int(cfg["num_layers"] if isinstance(cfg, dict) else cfg.num_layers)
    if not 1 <= layers <= n_blocks:
        raise ConfigError(
            f"a ControlNet with {layers} layers does not fit a transformer of {n_blocks} blocks; expected 1..{n_blocks} ControlNet layers."
        )
    return layers


def sample_inputs(
    transformer: nn.Module,
    model_batch: int,
    num_tokens: int,
    layers: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Seeded ``controlnet_block_<i>`` tensors ``[model_batch, num_tokens, inner_dim]`` (trace and parity inputs)."""
    g = torch.Generator(device="cpu").manual_seed(10_000 + seed)
    dim = int(transformer.inner_dim)
    return {n: (0.1 * torch.randn((model_batch, num_tokens, dim), generator=g)).to(dtype) for n in input_names(layers)}


def _pre_hook(module, args, kwargs):
    names = [k for k in kwargs if k.startswith(INPUT_PREFIX)]
    if not names:
        return None
    names.sort(key=lambda k: int(k[len(INPUT_PREFIX) :]))
    kwargs = dict(kwargs)
    kwargs[_KWARG] = [kwargs.pop(k) for k in names]
    return args, kwargs


@contextlib.contextmanager
def residual_inputs(transformer: nn.Module) -> Iterator[None]:
    """While active, ``transformer(..., controlnet_block_0=t0, ...)`` runs as ``transformer(...,
    block_controlnet_hidden_states=[t0, ...])`` (a forward pre-hook; removed on exit)."""
    handle = transformer.register_forward_pre_hook(_pre_hook, with_kwargs=True, prepend=True)
    try:
        yield
    finally:
        handle.remove()


def as_feed(residuals, layers: int, hidden_states: torch.Tensor, config) -> dict[str, torch.Tensor]:
    """The graph feed of a call's ``block_controlnet_hidden_states`` (None: zeros, which add nothing), checked
    against the graph's ``[B, N, inner_dim]`` (``hidden_states``: the call's ``[B, C, h, w]`` latents)."""
    patch = int(config["patch_size"])
    want = (
        int(hidden_states.shape[0]),
        (int(hidden_states.shape[-2]) // patch) * (int(hidden_states.shape[-1]) // patch),
        int(config["num_attention_heads"]) * int(config["attention_head_dim"]),
    )
    if residuals is None or len(residuals) == 0:
        z = torch.zeros(want, dtype=torch.float32)
        return {n: z for n in input_names(layers)}
    if len(residuals) != layers:
        raise ConfigError(
            f"the ControlNet gives {len(residuals)} block residuals but the graph was exported for {layers}; "
            f"export it for this ControlNet (generate --controlnet exports the matching graph)."
        )
    for i, r in enumerate(residuals):
        if tuple(r.shape) != want:
            raise ShapeError(
                f"ControlNet residual {i} has shape {list(r.shape)} but the graph takes {list(want)}; use a ControlNet of this transformer's width."
            )
    return dict(zip(input_names(layers), residuals))


def add_residual_hook(transformer: nn.Module) -> None:
    """:func:`residual_inputs`'s hook, for good: for a model that lives only as long as one export."""
    transformer.register_forward_pre_hook(_pre_hook, with_kwargs=True, prepend=True)
