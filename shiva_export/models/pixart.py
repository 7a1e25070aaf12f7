"""PixArt-Sigma adapter: the architecture facts of diffusers' ``PixArtTransformer2DModel``.

Quirks handled here, checked on diffusers 0.42:
- **Blocks.** ``transformer_blocks`` are ``BasicTransformerBlock``s with ``ada_norm_single``, called as
  ``block(hidden_states, attention_mask=, encoder_hidden_states=, encoder_attention_mask=, timestep=,
  cross_attention_kwargs=, class_labels=None)`` and returning a tensor. Self-attention, cross-attention
  (image queries to all T5 keys/values) and the FF act per image token, so top-k goes around the whole
  block; text exists only as cross-attention K/V and is never pruned. ``timestep`` there is the ``[B, 6D]``
  adaLN-single modulation, per sample, nothing to gather.
- **Positions** are a 2-D sin-cos table added once in ``pos_embed``; gathered tokens carry them. The
  block-level ``pos_embed`` (sinusoidal over the sequence index) would break under gathering: installing
  refuses a model that has one, and a routed block refuses a self-attention ``attention_mask`` (pipelines
  pass None; a mask would need gathering on the key axis).
- **Router context.** ``temb`` = ``embedded_timestep``, the second output of ``adaln_single`` (width D, the
  vector the final layer is modulated with), captured by a forward hook. ``pooled`` = the **masked mean of
  the projected caption tokens** ``caption_projection(T5)`` (width D) over ``encoder_attention_mask``.
  Why this pooled vector: PixArt has no pooled text embedding of its own (unlike SD3/Flux's pooled CLIP),
  the projected tokens are what every block's cross-attention reads, and Sigma pads T5 to 300 tokens, so an
  unmasked mean would be dominated by padding; the raw 4096-wide T5 mean would make the router's context
  projection 3.6x larger for the same information. ``RouterConfig(D, D)``.
- **Export (P1).** The model's own forward ends with ``hidden_states.squeeze(1)`` on ``[B, N, C]``, a no-op
  in torch that onnxscript lowers to an unconditional ``Squeeze(axes=[1])`` every runtime rejects. The
  adapter gives the exporter a translation of ``aten.squeeze.dim`` that emits ``Identity`` when the static
  dim is not 1 (:meth:`PixArtAdapter.onnx_translations`).
- CFG is a batched ``[uncond; cond]`` pair (``PixArtSigmaPipeline``); ``use_additional_conditions`` must be
  off (Sigma checkpoints set it False; PixArt-alpha 1024's size conditions are not exported yet).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shiva_export.errors import ConfigError
from shiva_export.models import components as C
from shiva_export.models._override import (
    add_hook,
    block_context,
    bound_args,
    hook_state,
    install_overrides,
    remove_overrides,
    route_tokens,
    rows_of,
)
from shiva_export.models.base import VAE_SCALE, InputSpec, ModelAdapter, register_adapter, transformer_config
from shiva_export.models.flops import assemble_count, router_terms

__all__ = ["PixArtAdapter"]


def _additional_conditions(cfg) -> bool:
    v = cfg.get("use_additional_conditions") if hasattr(cfg, "get") else getattr(cfg, "use_additional_conditions", None)
    return bool(cfg.sample_size == 128) if v is None else bool(v)


#: DoRA targets (peft regex, full-name match): self- and cross-attention and FFN linears of each block.
PIXART_DORA_TARGETS = r"transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"


@register_adapter
class PixArtAdapter(ModelAdapter):
    """PixArt-Sigma: self-attention over image tokens, cross-attention to T5 tokens, adaLN-single."""

    NAME = "pixart"
    MODEL_CLASS = "PixArtTransformer2DModel"
    PIPELINE_CLASS = "PixArtSigmaPipeline"
    REPO_IDS = {"pixart-sigma": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"}
    CONFIG_CLASS_NAMES = ("Transformer2DModel",)  # the hub checkpoints' transformer/config.json
    UNSUPPORTED_CALL_ARGS = {
        "cross_attention_kwargs": "cross_attention_kwargs (LoRA scale, IP-Adapter) are not in the static graph; fuse LoRA weights before export or use the torch backend",
        "attention_mask": "a self-attention attention_mask is not in the static graph (pipelines pass None); call the transformer without one",
    }

    def scheduler(self, shift: float = 3.0):
        """The DPM-Solver++ sampler ``PixArtSigmaPipeline`` runs (the embedded pipeline's too); ``shift`` (SD3's) does not apply."""
        return _scheduler()

    def router_dims(self, transformer: nn.Module) -> tuple[int, int]:
        return int(transformer.inner_dim), int(transformer.inner_dim)

    def dora_target_modules(self) -> str:
        # self-attention attn1, cross-attention attn2 (to T5) and the FFN; adaln_single and the caption
        # projection are conditioning, proj_out the output head: all excluded.
        return PIXART_DORA_TARGETS

    def install_routing(self, transformer: nn.Module) -> None:
        if _additional_conditions(transformer.config):
            raise ConfigError(
                "PixArt with use_additional_conditions=True (PixArt-alpha 1024) is not supported yet. Use a PixArt-Sigma checkpoint."
            )
        if any(getattr(b, "pos_embed", None) is not None for b in transformer.transformer_blocks):
            raise ConfigError(
                "a PixArt block has a sequence-index pos_embed, which breaks under token gathering. Use a checkpoint without block pos_embed."
            )
        if transformer.caption_projection is None:
            raise ConfigError(
                "PixArt without caption_projection (caption_channels=None) has no text context for the router. Set caption_channels."
            )
        install_overrides(transformer, transformer.transformer_blocks, _routed_block_forward)
        add_hook(transformer, "", _capture_call, "pre")
        add_hook(transformer, "adaln_single", _capture_temb, "post")
        add_hook(transformer, "caption_projection", _capture_pooled, "post")

    def remove_routing(self, transformer: nn.Module) -> None:
        remove_overrides(transformer, transformer.transformer_blocks)

    def input_names(self, config: Any) -> tuple[str, ...]:
        return ("hidden_states", "encoder_hidden_states", "encoder_attention_mask", "timestep")

    def float_inputs(self, config: Any) -> tuple[str, ...]:
        return ("hidden_states", "encoder_hidden_states")

    def input_shapes(self, config: Any, spec: InputSpec) -> dict[str, tuple[int, ...]]:
        cfg = transformer_config(config)
        b = spec.model_batch
        return {
            "hidden_states": (b, cfg.in_channels, spec.height // VAE_SCALE, spec.width // VAE_SCALE),
            "encoder_hidden_states": (b, spec.text_len, cfg.caption_channels),
            "encoder_attention_mask": (b, spec.text_len),
            "timestep": (b,),
        }

    def make_inputs(
        self,
        config: Any,
        spec: InputSpec,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        timestep: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Seeded inputs as ``PixArtSigmaPipeline`` feeds them: latents, T5 states with an int64 padding mask
        (each prompt a different length, the uncond half of a CFG pair its own), float timestep in 0..1000."""
        cfg = transformer_config(config)
        if _additional_conditions(cfg):
            raise ConfigError(
                "PixArt with use_additional_conditions=True (PixArt-alpha 1024) is not supported yet. Use a PixArt-Sigma checkpoint."
            )
        g = torch.Generator(device="cpu").manual_seed(seed)
        shapes = self.input_shapes(cfg, spec)
        half, b, t_len = spec.batch, spec.model_batch, spec.text_len
        lat = torch.randn((half, *shapes["hidden_states"][1:]), generator=g)
        txt = torch.randn(shapes["encoder_hidden_states"], generator=g)
        lengths = torch.randint(max(1, t_len // 2), t_len + 1, (b,), generator=g)
        mask = (torch.arange(t_len)[None, :] < lengths[:, None]).to(torch.int64)
        t = torch.rand((half,), generator=g) * 1000.0 if timestep is None else torch.full((half,), float(timestep))
        if spec.cfg:
            lat, t = torch.cat([lat, lat]), torch.cat([t, t])
        return {
            "hidden_states": lat.to(dtype),
            "encoder_hidden_states": txt.to(dtype),
            "encoder_attention_mask": mask,
            "timestep": t.float(),
        }

    # -- the diffusers pipeline (PixArtSigmaPipeline) ------------------------------------------------------
    def embedded_pipeline(self, transformer: nn.Module, recipe):
        """T5 (d_model = caption_channels) with its tokenizer, an SDXL-style VAE (``in_channels`` latent
        channels, scaling 0.13025, quant convs) and PixArt-Sigma's DPM-Solver++ scheduler."""

        cfg = transformer.config
        seed = recipe.pipeline.seed
        tok = C.t5_tokenizer()
        t5 = C.t5_encoder(tok, int(cfg.caption_channels), seed + C.SEED_T5)
        vae = C.vae(
            seed + C.SEED_VAE,
            latent_channels=int(cfg.in_channels),
            scaling_factor=0.13025,
            shift_factor=None,
            quant_convs=True,
        )
        return self.pipeline_class()(
            tokenizer=tok, text_encoder=t5, vae=vae, transformer=transformer, scheduler=_scheduler()
        )

    CACHE_TEXT_INPUTS = {"prompt_embeds": "encoder_hidden_states", "prompt_attention_mask": "encoder_attention_mask"}
    PREDICTION = "epsilon"  # DDPM noise (plus the learned-variance half of the output, not trained here)

    def encode_text_cache(
        self, pipe, config: Any, prompts: list[str], text_len: int, device: str
    ) -> tuple[dict[str, torch.Tensor], int]:
        """``PixArtSigmaPipeline.encode_prompt`` (T5, no caption cleaning, as ``pipeline_call``): ``prompt_embeds [T, C]``
        and its padding mask ``prompt_attention_mask [T]`` (int64); truncated: prompts longer than ``text_len`` tokens."""
        truncated = sum(int(len(pipe.tokenizer(t).input_ids) > text_len) for t in prompts)
        pe, mask, _, _ = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, device=device, clean_caption=False, max_sequence_length=text_len
        )
        return {"prompt_embeds": pe.float().cpu(), "prompt_attention_mask": mask.long().cpu()}, truncated

    def pipeline_call(
        self, pipe, prompt, *, negative_prompt, steps, guidance, height, width, max_sequence_length, generator
    ):
        """``PixArtSigmaPipeline``: no aspect-ratio binning (it would move the size off the static graph's, and
        it knows only sample sizes 32..256), no caption cleaning (needs bs4/ftfy); the negative prompt
        defaults to ``""`` as in the pipeline."""
        kw = super().pipeline_call(
            pipe,
            prompt,
            negative_prompt="" if negative_prompt is None else negative_prompt,
            steps=steps,
            guidance=guidance,
            height=height,
            width=width,
            max_sequence_length=max_sequence_length,
            generator=generator,
        )
        return kw | {"use_resolution_binning": False, "clean_caption": False}

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
        """PixArt terms: per image token 14 D^2 (self-attn q/k/v/out 4, cross-attn q/out 2, FF 8); the cross-
        attention K/V over the T caption tokens are constant; self-attention ``2*2*k^2*D`` is quadratic in k."""
        self.check_context(context)
        c = self.full_config(config)
        D = int(c["num_attention_heads"]) * int(c["attention_head_dim"])
        B, N, T = batch, num_image_tokens, text_len
        p2, C_in = int(c["patch_size"]) ** 2, int(c["in_channels"])
        C_out, C_cap = int(c["out_channels"] or C_in), int(c["caption_channels"])
        Dc = int(c["cross_attention_dim"] or D)
        model = {
            "embed.patch": 2 * B * N * C_in * p2 * D,
            "embed.adaln_single": 2 * B * (256 * D + D * D + D * 6 * D),
            "embed.caption": 2 * B * T * (C_cap * D + D * D),
            "out.proj": 2 * B * N * D * p2 * C_out,
        }

        def block(i: int, k: int, routed: bool) -> dict[str, int]:
            b = {
                "block.attn1.qkv_out": 4 * 2 * B * k * D * D,
                "block.attn1.sdpa": 2 * 2 * B * k * k * D,
                "block.attn2.q_out": 2 * 2 * B * k * D * D,
                "block.attn2.kv": 2 * 2 * B * T * Dc * D,
                "block.attn2.sdpa": 2 * 2 * B * k * T * D,
                "block.mlp": 2 * 2 * B * k * D * 4 * D,
            }
            if routed:
                b.update(router_terms(B, N, D, D, bottleneck))
            return b

        notes = (
            "2 FLOPs per multiply-add; matrix products only",
            "adaLN-single modulation (scale_shift_table), norms, activations, softmax not counted",
            "the router's masked caption mean is elementwise (not counted)",
        )
        return assemble_count(int(c["num_layers"]), N, T, keep_ratios, B, bottleneck, model, block, notes)

    def onnx_translations(self) -> dict:
        """``aten.squeeze.dim`` -> Identity where the static dim is not 1 (the P1 fix, see module docstring)."""
        return {torch.ops.aten.squeeze.dim: _squeeze_dim_static}


def _squeeze_dim_static(self, dim: int):
    from onnxscript import opset18 as op

    shape = self.shape
    if shape is None or len(shape) == 0:
        return op.Identity(self)
    d = shape[dim]
    if isinstance(d, int) and d != 1:
        return op.Identity(self)  # torch's squeeze(dim) of a non-1 dim is a no-op
    return op.Squeeze(self, op.Constant(value_ints=[dim]))


def _capture_call(module: nn.Module, args: tuple, kwargs: dict):
    """Model pre-hook: this call's keep schedule, and the caption mask the pooled context needs."""
    bound = bound_args(module, args, kwargs)
    state = hook_state(module)
    config = state.call_config(bound.get("hidden_states"), bound.get("timestep"))
    state.call = {"config": config, "mask": bound.get("encoder_attention_mask")}
    return None


def _capture_temb(module: nn.Module, args, output):
    """``adaln_single`` forward hook: keeps ``embedded_timestep`` (its second output)."""
    hook_state(module).call["temb"] = output[1]


def _capture_pooled(module: nn.Module, args, output):
    """``caption_projection`` forward hook: masked mean of the projected caption tokens."""
    state = hook_state(module)
    mask = state.call.get("mask")
    if mask is None:
        pooled = output.mean(dim=1)
    else:
        m = mask.reshape(mask.shape[0], -1).to(output.dtype)  # [B, T] 0/1 (the pipeline's attention mask)
        pooled = (output * m[..., None]).sum(dim=1) / m.sum(dim=1, keepdim=True).clamp(min=1.0)
    state.call["pooled"] = pooled


def _routed_block_forward(
    block,
    hidden_states,
    attention_mask=None,
    encoder_hidden_states=None,
    encoder_attention_mask=None,
    timestep=None,
    cross_attention_kwargs=None,
    class_labels=None,
    added_cond_kwargs=None,
):
    """A routed PixArt block: top-k over image tokens, the unmodified block on the kept tokens (all caption
    tokens as cross-attention K/V), scatter back."""
    owner, index, state, config = block_context(block)
    if attention_mask is not None:
        raise ConfigError(
            "a routed PixArt block got a self-attention attention_mask, which would need gathering. Call the transformer with attention_mask=None."
        )
    temb, pooled = state.call.get("temb"), state.call.get("pooled")
    if temb is None or pooled is None:
        raise ConfigError(
            "a routed PixArt block ran without the captured timestep/caption context. Call the transformer with encoder_hidden_states and timestep."
        )

    def run(kept, idx, rows=None):
        out = type(block).forward(
            block,
            kept,
            attention_mask=None,
            encoder_hidden_states=rows_of(encoder_hidden_states, rows),
            encoder_attention_mask=rows_of(encoder_attention_mask, rows),
            timestep=rows_of(timestep, rows),
            cross_attention_kwargs=cross_attention_kwargs,
            class_labels=rows_of(class_labels, rows),
        )
        return None, out

    return route_tokens(owner, index, state, config, hidden_states, temb, pooled, run)[1]


def _scheduler():
    """PixArt-Sigma's DPM-Solver++ (linear betas 1e-4..0.02, 1000 steps): the embedded pipeline's, and the one
    training cuts learned phases on."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear"
    )
