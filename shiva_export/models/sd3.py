"""SD3 / SD3.5 adapter: the architecture facts of diffusers' ``SD3Transformer2DModel``.

Quirks handled here (why they matter for routing):
- ``JointTransformerBlock.forward`` returns ``(encoder_hidden_states, hidden_states)``; the last block has
  ``context_pre_only=True`` and returns ``None`` for the text stream (it is never used afterwards). diffusers'
  block caches subtract or store that output, so :meth:`SD3Adapter.prepare_cache` hands the block's input
  text through in its place while a cache is on (``shiva_export.runtime.caches``).
- SD3.5-Medium (MMDiT-X) adds an image-only self-attention (``attn2``) in ``dual_attention_layers`` and
  RMS qk-norm. Both act per image token (attn2 only among image tokens), so a routed block runs them on
  the kept tokens with unchanged code.
- Position embeddings are added once in ``pos_embed`` (cropped sin-cos table of ``pos_embed_max_size``
  patches per side), so gathered tokens carry their position and need nothing extra (unlike Flux RoPE).
- Routing is a block override (as in the Flux, PixArt and DiT adapters): the model keeps diffusers' own
  forward (so skip-layer guidance and ControlNet residuals work unchanged), each routed block gets an instance
  ``forward`` that gathers, runs the class forward on the kept tokens and scatters back, and a forward pre-hook
  on the model captures the call's keep schedule and ``pooled_projections``. A routed block therefore maps
  ``N`` image tokens to ``N``, so diffusers' block-level cache hooks (``shiva_export.runtime.caches``),
  registered after routing, wrap it like a dense block. Routed blocks go through the same ``route_tokens``
  as every other adapter, so training's ``set_route_override`` sees one protocol.
- Router context = ``(temb, pooled_projections)``: the model's own ``time_text_embed`` output and the pooled
  CLIP vector (paper, Sec. 2.3).
- Context ``"keep"`` (``ShivaConfig.context``, RAS/ToCa style): a routed block still runs the unmodified
  diffusers block on ``[kept image; text]``, but its attention processors (``attn``, and ``attn2`` in dual
  blocks) take the image keys and values from all N tokens, normalised and modulated by the block's own
  ``norm1`` (:meth:`SD3Adapter.block_context_kv`); rejected tokens skip only queries, attention output and MLP.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shiva_export.errors import ConfigError, ShapeError
from shiva_export.logging import get_logger
from shiva_export.models import components as C
from shiva_export.models._override import (
    add_hook,
    block_context,
    bound_args,
    install_overrides,
    remove_overrides,
    route_tokens,
    rows_of,
)
from shiva_export.models.base import (
    CACHE_FIX_HOOK,
    VAE_SCALE,
    InputSpec,
    ModelAdapter,
    get_adapter,
    register_adapter,
    torch_dtype,
    transformer_config,
)
from shiva_export.models.base import load_transformer as _load_any
from shiva_export.models.flops import FlopCount
from shiva_export.prune.api import check_context, routing_state
from shiva_export.prune.topk import static_k

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
    "torch_dtype",
    "count_flops",
    "FLOP_TERMS",
]

logger = get_logger(__name__)

#: ONNX tensor names reuse diffusers' forward-argument names, so engines drop into existing pipelines.
INPUT_NAMES = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
OUTPUT_NAME = "sample"
#: DoRA targets (peft regex, full-name match): attention, dual attention and FFN linears of each block.
SD3_DORA_TARGETS = r"transformer_blocks\.\d+\.(attn2?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)|ff(_context)?\.net\.(0\.proj|2))"


@register_adapter
class SD3Adapter(ModelAdapter):
    """SD3 / SD3.5 (Medium, Large): ``JointTransformerBlock``s over ``[image; text]`` with a 2-D sin-cos
    table added in ``pos_embed``; CFG as one ``[uncond; cond]`` batch."""

    NAME = "sd3"
    MODEL_CLASS = "SD3Transformer2DModel"
    PIPELINE_CLASS = "StableDiffusion3Pipeline"
    REPO_IDS = {
        "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
        "sd35": "stabilityai/stable-diffusion-3.5-medium",
        "sd35-large": "stabilityai/stable-diffusion-3.5-large",
    }
    BLOCKS_ATTR = "transformer_blocks"
    BLOCK_RETURNS = ("encoder_hidden_states", "hidden_states")
    INPUT_NAMES = INPUT_NAMES
    DYNAMIC_AXES = {name: {0: "batch_size"} for name in INPUT_NAMES} | {OUTPUT_NAME: {0: "batch_size"}}
    CONTEXT_MODES = ("drop", "keep")

    def dora_target_modules(self) -> str:
        # joint attention (4 image + 4 context linears), SD3.5's dual attention attn2 (Medium: blocks 0-12) and
        # both FFNs; the last block (context_pre_only) has no to_add_out / ff_context, which the regex allows.
        # A regex, not peft's list form: that matches by suffix, so "attn.to_q" would miss attn2.to_q.
        return SD3_DORA_TARGETS

    def normalize_config(self, config: dict[str, Any]) -> dict[str, Any]:
        if "dual_attention_layers" in config:
            config["dual_attention_layers"] = tuple(config["dual_attention_layers"])
        return config

    def router_dims(self, transformer: nn.Module) -> tuple[int, int]:
        return int(transformer.inner_dim), int(transformer.config.pooled_projection_dim)

    def install_routing(self, transformer: nn.Module) -> None:
        install_overrides(transformer, self.blocks(transformer), _routed_block_forward)
        add_hook(transformer, "", _capture_context, "pre")
        if routing_state(transformer).config.context == "keep":
            _wrap_processors(transformer)

    def remove_routing(self, transformer: nn.Module) -> None:
        remove_overrides(transformer, self.blocks(transformer))
        _unwrap_processors(transformer)

    def prepare_cache(self, transformer: nn.Module) -> None:
        """The last block (``context_pre_only``) returns ``None`` as its text output; diffusers' FirstBlockCache
        tail hook subtracts it (TypeError) and TaylorSeer reads its dtype. A hook below the cache's hands the
        block's *input* text states through instead (diffusers' forward never reads them after the last block)."""
        from diffusers.hooks import HookRegistry

        for block in self.blocks(transformer):
            if block.context_pre_only:
                HookRegistry.check_if_exists_or_initialize(block).register_hook(
                    _text_passthrough_hook(), CACHE_FIX_HOOK
                )

    @staticmethod
    def block_context_kv(block: nn.Module, hidden_states: torch.Tensor, temb: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{attention name: the tokens its image keys/values are projected from}`` for all of
        ``hidden_states`` (every image token of the block's input), as the block itself prepares them:
        ``norm1`` (AdaLayerNormZero, or SD35AdaLayerNormZeroX whose second output feeds ``attn2``)."""
        out = block.norm1(hidden_states, emb=temb)
        return {"attn": out[0], "attn2": out[5]} if block.use_dual_attention else {"attn": out[0]}

    def check_image_size(self, config: Any, height: int, width: int) -> None:
        super().check_image_size(config, height, width)
        cfg = transformer_config(config)
        step = self.patch_px(cfg)
        max_px = (cfg.pos_embed_max_size or 0) * step
        for name, v in (("height", height), ("width", width)):
            if max_px and v > max_px:
                raise ShapeError(
                    f"--{name} {v} exceeds the model's position-embedding range of {max_px} px "
                    f"(pos_embed_max_size {cfg.pos_embed_max_size} patches x {step} px). Use {step}..{max_px}."
                )

    def input_names(self, config: Any) -> tuple[str, ...]:
        return INPUT_NAMES

    def input_shapes(self, config: Any, spec: InputSpec) -> dict[str, tuple[int, ...]]:
        cfg = transformer_config(config)
        b = spec.model_batch
        return {
            "hidden_states": (b, cfg.in_channels, spec.height // VAE_SCALE, spec.width // VAE_SCALE),
            "encoder_hidden_states": (b, spec.text_len, cfg.joint_attention_dim),
            "pooled_projections": (b, cfg.pooled_projection_dim),
            "timestep": (b,),
        }

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
        return count_flops(
            config, num_image_tokens, text_len, keep_ratios, batch=batch, bottleneck=bottleneck, context=context
        )

    def make_inputs(
        self,
        config: Any,
        spec: InputSpec,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        timestep: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Seeded random inputs (``timestep`` stays float32, in 0..1000). With CFG the uncond half's text
        embedding differs from the cond half's (as in a real pipeline), and both halves share the latent
        and timestep."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        shapes = self.input_shapes(config, spec)
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

    # -- the diffusers pipeline ---------------------------------------------------------------------------
    UNSUPPORTED_CALL_ARGS = {
        "skip_layers": "skip-layer guidance (skip_layers) is not in the static graph; call the pipeline with skip_guidance_layers=None",
        "block_controlnet_hidden_states": "this graph has no ControlNet residual inputs; export one with them (generate --controlnet does) or use the torch backend",
        "joint_attention_kwargs": "joint_attention_kwargs (LoRA scale, IP-Adapter) are not in the static graph; fuse LoRAs at export (--lora PATH --lora-scale S) or use the torch backend",
    }

    def check_embedded_recipe(self, recipe) -> None:
        recipe.max_sequence_length()  # RecipeError when text_len <= clip_max_length

    def check_pipeline(self, pipe, recipe) -> None:
        got = getattr(pipe.tokenizer, "model_max_length", None)
        want = recipe.pipeline.clip_max_length
        if got is not None and got != want and recipe.model.source in ("embedded", "local"):
            raise ConfigError(
                f"{recipe.source_path}: pipeline.clip_max_length = {want} but the pipeline's CLIP tokenizer takes {got}; fix the recipe."
            )

    def max_sequence_length(self, pipe, text_len: int) -> int | None:
        """T5 tokens: the transformer's text is CLIP ``model_max_length`` + T5 ``max_sequence_length`` tokens."""
        clip = pipe.tokenizer.model_max_length
        if text_len - clip < 1:
            raise ConfigError(
                f"the graph's text length {text_len} leaves {text_len - clip} T5 tokens after the CLIP tokenizer's {clip}; "
                "export with --text-len > CLIP length."
            )
        return text_len - clip

    def pipeline_text_len(self, pipe, max_sequence_length: int | None) -> int | None:
        return pipe.tokenizer.model_max_length + int(max_sequence_length or 0)

    def text_cache_info(self, pipe, text_len: int) -> dict[str, Any]:
        return {
            "max_sequence_length": self.max_sequence_length(pipe, text_len),
            "clip_max_length": int(pipe.tokenizer.model_max_length),
        }

    def encode_text_cache(
        self, pipe, config: Any, prompts: list[str], text_len: int, device: str
    ) -> tuple[dict[str, torch.Tensor], int]:
        """``pipe.encode_prompt`` (CLIP x2 + T5): ``prompt_embeds [T, J]``, ``pooled [P]``; a prompt counts as truncated
        when it exceeds CLIP's window or the T5 length (encode_prompt cuts it, as at inference)."""
        max_seq, clip = self.max_sequence_length(pipe, text_len), int(pipe.tokenizer.model_max_length)
        t5 = getattr(pipe, "tokenizer_3", None)
        truncated = sum(
            int(len(pipe.tokenizer(t).input_ids) > clip or (t5 is not None and len(t5(t).input_ids) > max_seq))
            for t in prompts
        )
        pe, _, pooled, _ = pipe.encode_prompt(
            prompts, prompts, prompts, device=device, do_classifier_free_guidance=False, max_sequence_length=max_seq
        )
        return {"prompt_embeds": pe.float().cpu(), "pooled": pooled.float().cpu()}, truncated

    def embedded_pipeline(self, transformer: nn.Module, recipe):
        """Two CLIP encoders with projections (pooled halves), a T5 encoder unless ``[pipeline] t5 = false``,
        a 16-channel VAE and the flow-matching scheduler, sized from the transformer config (see
        :mod:`shiva_export.models.components` for the constraints)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        tcfg = transformer.config
        joint, pooled = int(tcfg.joint_attention_dim), int(tcfg.pooled_projection_dim)
        if pooled < 2:
            raise ConfigError(
                f"Embedded pipeline: pooled_projection_dim {pooled} cannot be split between two CLIP encoders. "
                "Use a [model.config] pooled_projection_dim >= 2."
            )
        hidden, heads = C.clip_hidden(joint)
        seed = recipe.pipeline.seed
        max_len = recipe.pipeline.clip_max_length
        tok1, tok2 = C.clip_tokenizer(max_len), C.clip_tokenizer(max_len)
        clip1 = C.clip_encoder(tok1, hidden, heads, pooled // 2, seed + C.SEED_CLIP1)
        clip2 = C.clip_encoder(tok2, hidden, heads, pooled - pooled // 2, seed + C.SEED_CLIP2)
        if recipe.pipeline.t5:
            tok3 = C.t5_tokenizer()
            t5 = C.t5_encoder(tok3, joint, seed + C.SEED_T5)
        else:
            tok3 = t5 = None
        vae = C.vae(seed + C.SEED_VAE)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=recipe.pipeline.scheduler_shift)
        return self.pipeline_class()(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=clip1,
            tokenizer=tok1,
            text_encoder_2=clip2,
            tokenizer_2=tok2,
            text_encoder_3=t5,
            tokenizer_3=tok3,
        )


_ADAPTER = SD3Adapter


def _text_passthrough_hook():
    """A diffusers ``ModelHook`` whose block returns the text states it was given where it would return ``None``."""
    from diffusers.hooks import ModelHook

    class TextPassthrough(ModelHook):
        def new_forward(self, module, *args, **kwargs):
            encoder_out, hidden_out = self.fn_ref.original_forward(*args, **kwargs)
            if encoder_out is None:
                encoder_out = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
            return encoder_out, hidden_out

    return TextPassthrough()


# Module-level helpers kept for callers that know they hold an SD3 model (tests, the SD3 runtime).
def check_supported(transformer: nn.Module) -> None:
    """Raises a one-line :class:`ConfigError` unless ``transformer`` is an ``SD3Transformer2DModel``."""
    if not isinstance(get_adapter(transformer), SD3Adapter):
        raise ConfigError(
            f"Expected an SD3Transformer2DModel, got {type(transformer).__name__}. Use the matching --model."
        )


def check_image_size(config: Any, height: int, width: int) -> None:
    """Raises :class:`ShapeError` unless ``height`` and ``width`` (pixels) fit the model."""
    SD3Adapter().check_image_size(config, height, width)


def num_image_tokens(config: Any, height: int, width: int) -> int:
    return SD3Adapter().num_image_tokens(config, height, width)


def make_inputs(
    config: Any, spec: InputSpec, seed: int = 0, dtype: torch.dtype = torch.float32, timestep: float | None = None
) -> dict[str, torch.Tensor]:
    return SD3Adapter().make_inputs(config, spec, seed, dtype, timestep)


def build_embedded(config: dict[str, Any], seed: int = 0) -> nn.Module:
    """Builds an ``SD3Transformer2DModel`` from a config dict with seeded random weights (no download)."""
    return SD3Adapter().build_embedded(config, seed)


def load_transformer(*, recipe=None, weights: str | os.PathLike | None = None, dtype: str = "fp32") -> nn.Module:
    """:func:`shiva_export.models.base.load_transformer` (any architecture)."""
    return _load_any(recipe=recipe, weights=weights, dtype=dtype)


# -- routing: block overrides -------------------------------------------------------------------------------


def _capture_context(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: decides this call's keep schedule (phase from ``timestep``, CFG pairing, which
    ``skip_layers`` turns off) and keeps ``pooled_projections`` for the routed blocks' routers."""
    bound = bound_args(module, args, kwargs)
    state = routing_state(module)
    config = state.call_config(bound.get("hidden_states"), bound.get("timestep"), bound.get("skip_layers"))
    state.call = {"config": config, "pooled": bound.get("pooled_projections")}
    return None


def _routed_block_forward(block, hidden_states, encoder_hidden_states=None, temb=None, joint_attention_kwargs=None):
    """A routed ``JointTransformerBlock``: top-k over image tokens, the unmodified diffusers block on
    ``[kept image; all text]``, scatter back (rejected tokens unchanged); returns ``(encoder_hidden_states,
    hidden_states)`` with all ``N`` image tokens, so hooks around the block (diffusers caches) see dense shapes."""
    owner, index, state, config = block_context(block)
    pooled = state.call.get("pooled")
    if pooled is None:
        raise ConfigError("a routed SD3 block needs pooled_projections; call the transformer with pooled_projections=.")

    def run(kept, idx, rows=None):
        kwargs = joint_attention_kwargs
        if (
            config.context == "keep" and kept.shape[1] < hidden_states.shape[1]
        ):  # static: at k = N the kept set is the context
            ctx = SD3Adapter.block_context_kv(block, rows_of(hidden_states, rows), rows_of(temb, rows))
            kwargs = {**(joint_attention_kwargs or {}), _CONTEXT_KWARG: ctx}
        return type(block).forward(
            block,
            hidden_states=kept,
            encoder_hidden_states=rows_of(encoder_hidden_states, rows),
            temb=rows_of(temb, rows),
            joint_attention_kwargs=kwargs,
        )

    return route_tokens(owner, index, state, config, hidden_states, temb, pooled, run)


# -- context "keep": image keys/values from every token --------------------------------------------------------
#: The ``joint_attention_kwargs`` entry that hands :meth:`SD3Adapter.block_context_kv` to the wrapped processors.
_CONTEXT_KWARG = "shiva_context"


class _KVFrom:
    """``attn`` as its processor sees it, except that ``to_k`` / ``to_v`` project ``context`` (all N image
    tokens) instead of their argument (the k kept ones): ``JointAttnProcessor2_0`` computes ``attn.to_k(
    hidden_states)``, so this is the one place where the keys' source changes; queries, qk-norm, the text
    stream, the split at ``k`` and the output projection stay diffusers' code."""

    def __init__(self, attn: nn.Module, context: torch.Tensor):
        self._attn, self._context = attn, context

    def to_k(self, _kept: torch.Tensor) -> torch.Tensor:
        return self._attn.to_k(self._context)

    def to_v(self, _kept: torch.Tensor) -> torch.Tensor:
        return self._attn.to_v(self._context)

    def __getattr__(self, name: str):
        return getattr(self._attn, name)


class _ContextKVProcessor:
    """Wraps a routed block's ``JointAttnProcessor2_0`` (``name``: ``attn`` or ``attn2``, which share one
    processor in diffusers): with ``shiva_context`` given, runs it on :class:`_KVFrom`; without, unchanged."""

    def __init__(self, inner: Any, name: str):
        self.inner, self.name = inner, name

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, shiva_context=None, **kwargs
    ):
        target = attn if shiva_context is None else _KVFrom(attn, shiva_context[self.name])
        return self.inner(
            target, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs
        )


def _attentions(transformer: nn.Module):
    """``(block index, name, Attention)`` of every routed block's attention(s)."""
    state = routing_state(transformer)
    for i in state.config.routed_blocks:
        block = transformer.transformer_blocks[i]
        for name in ("attn", "attn2"):
            if getattr(block, name, None) is not None:
                yield i, name, getattr(block, name)


def _wrap_processors(transformer: nn.Module) -> None:
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    found = list(_attentions(transformer))
    for i, name, attn in found:  # check all before changing any
        if type(attn.processor) is not JointAttnProcessor2_0:  # others (fused QKV, IP-Adapter) project K/V elsewhere
            raise ConfigError(
                f"context 'keep' needs diffusers' JointAttnProcessor2_0 in transformer_blocks.{i}.{name}, which runs "
                f"{type(attn.processor).__name__}; undo that processor change (e.g. unfuse_qkv_projections()) or use context 'drop'."
            )
    for _, name, attn in found:
        attn.processor = _ContextKVProcessor(attn.processor, name)


def _unwrap_processors(transformer: nn.Module) -> None:
    for _, _, attn in _attentions(transformer):
        if isinstance(attn.processor, _ContextKVProcessor):
            attn.processor = attn.processor.inner


# -- FLOPs: SD3's analytic count (the convention of shiva_export.models.flops) ---------------------------------
# Terms (``S = k + T`` joint tokens, ``k`` = image tokens the block sees: ``N`` dense, ``floor(N * keep)`` routed):
#
# ================================  ======================================================================
# ``embed.patch``                   ``2 * N * (C_in * p^2) * D`` (Conv2d, kernel = stride = patch)
# ``embed.time_text``               ``2 * (256*D + D*D + P*D + D*D)`` per sample (timestep + pooled MLPs)
# ``embed.context``                 ``2 * T * J * D`` (``context_embedder``, J = joint_attention_dim)
# ``block.adaln``                   ``2 * D * m * D`` per sample per block, ``m`` = 6 (``norm1``), 9 in dual
#                                   blocks (``SD35AdaLayerNormZeroX``); plus ``norm1_context``: 6, or 2 in
#                                   the last (``context_pre_only``) block
# ``block.img.qkv`` / ``.out``      ``3 * 2*k*D^2`` / ``2*k*D^2``
# ``block.img.mlp``                 ``2 * 2*k*D*4D`` (GELU-tanh FF, 4x)
# ``block.txt.qkv``                 ``3 * 2*T*D^2`` in every block
# ``block.txt.out`` / ``.mlp``      ``2*T*D^2`` / ``2 * 2*T*D*4D``, not in the last block (``context_pre_only``:
#                                   its text output is never used, diffusers builds no ``to_add_out``/``ff_context``)
# ``block.attn.joint``              ``2 * 2 * (k+T)^2 * D`` (one SDPA over ``[image; text]``)
# ``block.attn2.qkv`` / ``.out``    dual-attention blocks only (SD3.5-M blocks 0..12): ``3 * 2*k*D^2`` / ``2*k*D^2``
# ``block.attn2.sdpa``              ``2 * 2 * k^2 * D`` (image-only self-attention)
# ``block.ctx.adaln``                context ``"keep"`` only (routed blocks with ``k < N``): ``norm1``'s linear once
#                                   more, ``2 * D * m * D`` per sample (the full-token context is normalised and
#                                   modulated by the block's own ``norm1``)
# ``block.ctx.kv``                  context ``"keep"`` only: K/V projections of the ``N - k`` rejected tokens,
#                                   ``2 * 2*(N-k)*D^2``, again for ``attn2`` in dual blocks; the attention
#                                   products then run ``k + T`` queries over ``N + T`` keys:
#                                   ``block.attn.joint`` = ``2 * 2 * (k+T)(N+T) * D``, ``block.attn2.sdpa`` =
#                                   ``2 * 2 * k * N * D``
# ``router.proj_x``                 routed blocks: ``2 * N * D * d'`` (every token is scored)
# ``router.context``                ``2 * (D + P) * d'`` per sample + ``2 * d'^2`` (layer embedding, once)
# ``router.score``                  ``2 * N * d'``; the router's LayerNorm/SiLU are elementwise (not counted)
# ``router.select``                 0: TopK, the compaction CumSums, gather and scatter move data and do no
#                                   multiply-adds; they are listed so the table says so
# ``out.norm`` / ``out.proj``       ``2 * D * 2D`` per sample / ``2 * N * D * (p^2 * C_out)``
# ================================  ======================================================================
#
# SD3.5-Medium at 1024 px (N = 4096, T = 333, D = 1536, 24 blocks, dual attention in 0..12, batch 1):
# **11.2496 TFLOP** dense (11,249,573,707,776): 11.2437 T in the blocks (1.52 GFLOP of it adaLN
# linears), 5.83 GFLOP model-level (patch conv 0.81, context embedder 4.19, time/text embedder 0.017,
# norm_out 0.009, proj_out 0.81). Attention products are 37.6 % of it. The often-quoted "~11.26 T" is the
# same count within 0.1 %: it is what one gets by also giving the last block a full text stream
# (+14.15 GFLOP of text out-proj and MLP that diffusers never builds for a ``context_pre_only`` block),
# 11.2637 T. Keep 0.6 in blocks 1..23 (block 0 dense): 6.2985 T, ideal speedup 1.786x.

#: Width of SD3's sinusoidal timestep features (``Timesteps(num_channels=256)`` in diffusers).
_TIMESTEP_CHANNELS = 256

#: ``SD3Transformer2DModel.__init__`` defaults (diffusers), used for keys a config dict leaves out.
_DEFAULTS: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": None,
    "num_layers": 18,
    "attention_head_dim": 64,
    "num_attention_heads": 18,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1152,
    "pooled_projection_dim": 2048,
    "dual_attention_layers": (),
}

#: Every term name, in report order (model-level, per block, router, output).
FLOP_TERMS: tuple[str, ...] = (
    "embed.patch",
    "embed.time_text",
    "embed.context",
    "block.adaln",
    "block.img.qkv",
    "block.img.out",
    "block.img.mlp",
    "block.txt.qkv",
    "block.txt.out",
    "block.txt.mlp",
    "block.attn.joint",
    "block.attn2.qkv",
    "block.attn2.out",
    "block.attn2.sdpa",
    "block.ctx.adaln",
    "block.ctx.kv",
    "router.proj_x",
    "router.context",
    "router.score",
    "router.select",
    "out.norm",
    "out.proj",
)


@dataclass(frozen=True)
class _Arch:
    hidden: int
    num_layers: int
    pooled: int
    joint: int
    caption: int
    patch: int
    in_channels: int
    out_channels: int
    dual: frozenset[int]


def _read_config(config: Any) -> _Arch:
    cfg = getattr(config, "config", config)  # a transformer -> its config
    if isinstance(cfg, Mapping):
        get = lambda key: cfg.get(key, _DEFAULTS.get(key))  # noqa: E731
    else:
        get = lambda key: getattr(cfg, key, _DEFAULTS.get(key))  # noqa: E731
    try:
        heads, head_dim = int(get("num_attention_heads")), int(get("attention_head_dim"))
        in_ch = int(get("in_channels"))
        out_ch = get("out_channels")
        arch = _Arch(
            hidden=heads * head_dim,
            num_layers=int(get("num_layers")),
            pooled=int(get("pooled_projection_dim")),
            joint=int(get("joint_attention_dim")),
            caption=int(get("caption_projection_dim")),
            patch=int(get("patch_size")),
            in_channels=in_ch,
            out_channels=in_ch if out_ch is None else int(out_ch),
            dual=frozenset(int(i) for i in (get("dual_attention_layers") or ())),
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"SD3 transformer config cannot be read for FLOP counting: {err}. Expected integer fields such as "
            "num_layers, num_attention_heads, attention_head_dim. Pass a diffusers config, a config dict or the model."
        ) from None
    for name in ("hidden", "num_layers", "pooled", "joint", "caption", "patch", "in_channels", "out_channels"):
        if getattr(arch, name) < 1:
            raise ConfigError(
                f"SD3 transformer config field {name} is {getattr(arch, name)}. It must be >= 1. Fix the config."
            )
    bad = sorted(i for i in arch.dual if not 0 <= i < arch.num_layers)
    if bad:
        raise ConfigError(
            f"dual_attention_layers holds {bad}. Valid block indices are 0..{arch.num_layers - 1}. Fix the config."
        )
    return arch


def count_flops(
    config: Any,
    num_image_tokens: int,
    text_len: int,
    keep_ratios: Sequence[float | None] | None = None,
    *,
    batch: int = 1,
    bottleneck: int = 64,
    context: str = "drop",
) -> FlopCount:
    """Counts the FLOPs of one ``SD3Transformer2DModel`` forward, dense or with Shiva routing.

    The convention is :mod:`shiva_export.models.flops`'s; the terms are tabled in the comment above :data:`FLOP_TERMS`.

    Args:
        config (Any): A diffusers config (``transformer.config``), a config dict, or the transformer.
            Keys it lacks take ``SD3Transformer2DModel``'s defaults.
        num_image_tokens (int): N, image tokens (``(H/16) * (W/16)`` for SD3 at patch 2).
        text_len (int): T, text tokens (333 for SD3 with 256 T5 tokens).
        keep_ratios (Sequence[float | None]): One entry per block, ``None`` = dense, else the keep ratio in
            (0, 1]; ``k = floor(N * keep)`` as in :func:`~shiva_export.prune.topk.static_k`. ``None`` (the
            argument) means a dense model with no router. Defaults to None.
        batch (int): Samples through the network (with CFG, 2 x prompts). Defaults to 1.
        bottleneck (int): Router width d'. Defaults to 64.
        context (str): The routing's ``ShivaConfig.context``: ``"keep"`` adds the rejected tokens' context
            (``block.ctx.*``, keys over ``N + T`` tokens) to routed blocks with ``k < N``; at ``k = N`` the
            routing computes no separate context, so keep 1.0 counts as dense. Defaults to ``"drop"``.

    Returns:
        FlopCount: Term-by-term FLOPs and totals.

    Example:
        >>> cfg = dict(num_layers=24, num_attention_heads=24, attention_head_dim=64, caption_projection_dim=1536,
        ...            dual_attention_layers=tuple(range(13)))
        >>> round(count_flops(cfg, 4096, 333).total / 1e12, 2)
        11.25
    """
    check_context(context)
    arch = _read_config(config)
    for name, v in (
        ("num_image_tokens", num_image_tokens),
        ("text_len", text_len),
        ("batch", batch),
        ("bottleneck", bottleneck),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ShapeError(
                f"{name} for FLOP counting is {v!r}. It must be an integer >= 1. Pass a positive token/batch count."
            )
    L, D, N, T, B, dp = arch.num_layers, arch.hidden, num_image_tokens, text_len, batch, bottleneck
    if keep_ratios is None:
        keeps: tuple[float | None, ...] = (None,) * L
    else:
        keeps = tuple(keep_ratios)
        if len(keeps) != L:
            raise ConfigError(
                f"keep_ratios has {len(keeps)} entries for a {L}-block model. Give one per block (None = dense). Fix the schedule."
            )
    kept = tuple(N if r is None else static_k(N, r) for r in keeps)  # static_k validates 0 < r <= 1 and k >= 1

    terms = dict.fromkeys(FLOP_TERMS, 0)
    p2 = arch.patch * arch.patch
    terms["embed.patch"] = 2 * B * N * arch.in_channels * p2 * D
    terms["embed.time_text"] = 2 * B * (_TIMESTEP_CHANNELS * D + D * D + arch.pooled * D + D * D)
    terms["embed.context"] = 2 * B * T * arch.joint * arch.caption
    terms["out.norm"] = 2 * B * D * 2 * D
    terms["out.proj"] = 2 * B * N * D * p2 * arch.out_channels

    blocks = []
    for i in range(L):
        k, last, dual = kept[i], i == L - 1, i in arch.dual
        ctx = context == "keep" and keeps[i] is not None and k < N  # rejected tokens still give keys and values
        kv = N if ctx else k  # image keys the attention products run over
        b = dict.fromkeys((t for t in FLOP_TERMS if t.startswith(("block.", "router."))), 0)
        b["block.adaln"] = 2 * B * D * D * ((9 if dual else 6) + (2 if last else 6))
        b["block.img.qkv"] = 3 * 2 * B * k * D * D
        b["block.img.out"] = 2 * B * k * D * D
        b["block.img.mlp"] = 2 * 2 * B * k * D * 4 * D
        b["block.txt.qkv"] = 3 * 2 * B * T * D * D
        if not last:
            b["block.txt.out"] = 2 * B * T * D * D
            b["block.txt.mlp"] = 2 * 2 * B * T * D * 4 * D
        b["block.attn.joint"] = 2 * 2 * B * (k + T) * (kv + T) * D
        if dual:
            b["block.attn2.qkv"] = 3 * 2 * B * k * D * D
            b["block.attn2.out"] = 2 * B * k * D * D
            b["block.attn2.sdpa"] = 2 * 2 * B * k * kv * D
        if ctx:
            b["block.ctx.adaln"] = 2 * B * D * D * (9 if dual else 6)
            b["block.ctx.kv"] = 2 * 2 * B * (N - k) * D * D * (2 if dual else 1)
        if keeps[i] is not None:
            b["router.proj_x"] = 2 * B * N * D * dp
            b["router.context"] = 2 * B * (D + arch.pooled) * dp + 2 * dp * dp
            b["router.score"] = 2 * B * N * dp
            b["router.select"] = 0
        blocks.append(b)
        for name, v in b.items():
            terms[name] += v

    notes = (
        "2 FLOPs per multiply-add; only matrix products are counted (Linear, patch Conv2d, QK^T, AV)",
        "not counted: biases, norms (incl. qk RMSNorm), modulation/gates, activations, softmax, residuals",
        "router.select = 0: TopK, CumSum compaction, gather and scatter do no multiply-adds",
        "last block is context_pre_only: text stream has qkv only (no to_add_out, no ff_context)",
    ) + (
        ("context keep: rejected tokens' norm1 + K/V (block.ctx.*), attention over all N image keys",)
        if context == "keep"
        else ()
    )
    return FlopCount(terms, tuple(blocks), kept, N, T, B, keeps, dp, notes, context)
