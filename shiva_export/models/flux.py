"""Flux.1 adapter (dev, schnell): the architecture facts of diffusers' ``FluxTransformer2DModel``.

Quirks handled here (why they matter for routing), checked on diffusers 0.42:
- **Two block kinds, one flat index.** ``transformer_blocks`` (double-stream ``FluxTransformerBlock``) come
  first, then ``single_transformer_blocks`` (``FluxSingleTransformerBlock``); block ``i`` of the recipe is
  ``(transformer_blocks + single_transformer_blocks)[i]``, block 0 the first double block. Both kinds are
  called as ``block(hidden_states=, encoder_hidden_states=, temb=, image_rotary_emb=, joint_attention_kwargs=)``
  and return ``(encoder_hidden_states, hidden_states)``; the single block concatenates ``[text; image]``
  itself and splits at the text length, so only image tokens are gathered and text stays whole.
- **RoPE must be gathered.** ``image_rotary_emb = pos_embed(cat(txt_ids, img_ids))`` is ``(cos, sin)``, each
  ``[T + N, head_dim]`` with no batch axis, text rows first. A routed block receives
  ``cat(cos[:T], cos[T:][idx])`` (same for sin) with the kept indices ``idx``; without it the block is
  off by ~4e-2 (measured in ``docs/architecture.md``, "Flux RoPE must follow the kept tokens").
- **One index set per call.** diffusers' ``apply_rotary_emb`` broadcasts 2-D cos/sin over the batch, so all
  rows of a call keep the same tokens: the selection uses the element-wise max of the rows' scores
  (at batch 1, the paper's latency setting, this is plain top-k). ``ShivaConfig.cfg`` is therefore moot:
  ``FluxPipeline`` runs guidance as an embedding, not as a batched ``[uncond; cond]`` pair.
- **Router context = the model's own conditioning vector** ``temb = time_text_embed(t, guidance, pooled)``
  (timestep + guidance + pooled-CLIP embeddings, width ``inner_dim``), read from the block's own ``temb``
  argument, plus ``pooled_projections`` (width ``pooled_projection_dim``) captured by a forward pre-hook.
- **Lighter install.** The model keeps its own forward; only the routed blocks' ``forward`` is replaced on
  the instance, and :meth:`FluxAdapter.remove_routing` deletes those attributes and the hook.
- **Export: RoPE baked as constants.** ``FluxPosEmbed`` computes in float64 from ``img_ids``/``txt_ids``;
  shapes are static, so the export computes cos/sin eagerly and the graph holds them as fp32 initializers
  (no DOUBLE, and ``img_ids``/``txt_ids`` are not graph inputs).
- ``timestep`` (and ``guidance``) are in [0, 1] and [1, 10]; the model multiplies both by 1000. Phase
  schedules see ``1000 * timestep``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from shiva_export.errors import ConfigError, RecipeError
from shiva_export.models import components as C
from shiva_export.models._override import (
    add_hook,
    block_context,
    bound_args,
    hook_state,
    install_overrides,
    phase_timestep,
    remove_overrides,
    route_tokens,
    rows_of,
)
from shiva_export.models.base import VAE_SCALE, InputSpec, ModelAdapter, register_adapter, transformer_config
from shiva_export.models.flops import assemble_count, router_terms

__all__ = ["FluxAdapter", "FLUX_PATCH_PX"]

#: Pixels per packed Flux token: VAE 8 x the pipeline's 2 x 2 latent packing.
FLUX_PATCH_PX = VAE_SCALE * 2
#: DoRA targets (peft regex, full-name match): attention and FFN/MLP linears of double- and single-stream blocks.
FLUX_DORA_TARGETS = (
    r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)|ff(_context)?\.net\.(0\.proj|2))"
    r"|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)"
)


@register_adapter
class FluxAdapter(ModelAdapter):
    """Flux.1 (dev: guidance embedding; schnell: none). Packed latents ``[B, N, 64]``, RoPE over
    ``[text; image]``, double- then single-stream blocks."""

    NAME = "flux"
    MODEL_CLASS = "FluxTransformer2DModel"
    PIPELINE_CLASS = "FluxPipeline"
    REPO_IDS = {"flux-dev": "black-forest-labs/FLUX.1-dev", "flux-schnell": "black-forest-labs/FLUX.1-schnell"}
    TIMESTEP_SCALE = 1000.0
    BATCHED_CFG = False
    PIPELINE_SETS_CACHE_CONTEXT = True  # FluxPipeline enters transformer.cache_context("cond") itself

    def normalize_config(self, config: dict[str, Any]) -> dict[str, Any]:
        if "axes_dims_rope" in config:
            config["axes_dims_rope"] = tuple(config["axes_dims_rope"])
        return config

    def dora_target_modules(self) -> str:
        # double-stream blocks as SD3 (joint attention + ff + ff_context); single-stream blocks: q/k/v, the MLP
        # input proj_mlp and proj_out (the fused attention-output + MLP-output linear). Not norm*.linear (AdaLN).
        return FLUX_DORA_TARGETS

    def blocks(self, transformer: nn.Module) -> list[nn.Module]:
        """The flat block list: double-stream blocks, then single-stream blocks."""
        return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]

    def config_num_blocks(self, config: Any) -> int:
        c = dict(transformer_config(config))
        return int(c["num_layers"]) + int(c["num_single_layers"])

    def router_dims(self, transformer: nn.Module) -> tuple[int, int]:
        return int(transformer.inner_dim), int(transformer.config.pooled_projection_dim)

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
        self.check_context(context)
        return _flux_flops(self, config, num_image_tokens, text_len, keep_ratios, batch, bottleneck)

    def sampler_timesteps(self, config: Any, steps: int, num_image_tokens: int, shift: float = 3.0) -> list[float]:
        """``FluxPipeline``'s sampler: flow-matching Euler with resolution-dependent shift ``mu`` (FLUX.1-dev's
        scheduler config: base/max image tokens 256/4096, base/max shift 0.5/1.15) on ``linspace(1, 1/steps)``
        sigmas; schnell (no guidance embedding) runs unshifted. ``shift`` (SD3's) does not apply."""
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler

        sigmas = np.linspace(1.0, 1.0 / steps, steps)
        if transformer_config(config).guidance_embeds:
            sched = FlowMatchEulerDiscreteScheduler(
                shift=3.0,
                use_dynamic_shifting=True,
                base_shift=0.5,
                max_shift=1.15,
                base_image_seq_len=256,
                max_image_seq_len=4096,
            )
            m = (1.15 - 0.5) / (4096 - 256)
            sched.set_timesteps(sigmas=sigmas, mu=num_image_tokens * m + (0.5 - m * 256))
        else:
            sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
            sched.set_timesteps(sigmas=sigmas)
        return [float(v) for v in sched.timesteps]

    # -- routing ------------------------------------------------------------------------------------------
    def install_routing(self, transformer: nn.Module) -> None:
        install_overrides(transformer, self.blocks(transformer), _routed_block_forward)
        add_hook(transformer, "", _capture_context, "pre")

    def remove_routing(self, transformer: nn.Module) -> None:
        remove_overrides(transformer, self.blocks(transformer))

    # -- shapes and inputs --------------------------------------------------------------------------------
    def patch_px(self, config: Any) -> int:
        return FLUX_PATCH_PX  # VAE 8 x the pipeline's 2x2 latent packing

    def input_names(self, config: Any) -> tuple[str, ...]:
        cfg = transformer_config(config)
        names = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
        return names + (("guidance",) if cfg.guidance_embeds else ())

    def float_inputs(self, config: Any) -> tuple[str, ...]:
        return ("hidden_states", "encoder_hidden_states", "pooled_projections")

    def input_shapes(self, config: Any, spec: InputSpec) -> dict[str, tuple[int, ...]]:
        cfg = transformer_config(config)
        b = spec.model_batch
        n = self.num_image_tokens(cfg, spec.height, spec.width)
        shapes = {
            "hidden_states": (b, n, cfg.in_channels),
            "encoder_hidden_states": (b, spec.text_len, cfg.joint_attention_dim),
            "pooled_projections": (b, cfg.pooled_projection_dim),
            "timestep": (b,),
        }
        if cfg.guidance_embeds:
            shapes["guidance"] = (b,)
        return shapes

    def output_shape(self, config: Any, spec: InputSpec) -> tuple[int, ...]:
        cfg = transformer_config(config)
        return (
            spec.model_batch,
            self.num_image_tokens(cfg, spec.height, spec.width),
            cfg.out_channels or cfg.in_channels,
        )

    def make_inputs(
        self,
        config: Any,
        spec: InputSpec,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        timestep: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Seeded inputs as ``FluxPipeline`` feeds them: packed latents, T5 states, pooled CLIP, ``timestep``
        in [0, 1] (``timestep`` here is on the 0..1000 scale of the other adapters and divided by 1000),
        ``guidance`` 3.5 on dev, and the static ``img_ids`` ([N, 3]: 0, row, col) / ``txt_ids`` (zeros [T, 3])."""
        cfg = transformer_config(config)
        g = torch.Generator(device="cpu").manual_seed(seed)
        shapes = self.input_shapes(cfg, spec)
        half = spec.batch
        lat = torch.randn((half, *shapes["hidden_states"][1:]), generator=g)
        txt = torch.randn(shapes["encoder_hidden_states"], generator=g)
        pooled = torch.randn(shapes["pooled_projections"], generator=g)
        t = torch.rand((half,), generator=g) if timestep is None else torch.full((half,), float(timestep) / 1000.0)
        if spec.cfg:
            lat, t = torch.cat([lat, lat]), torch.cat([t, t])
        h, w = spec.height // FLUX_PATCH_PX, spec.width // FLUX_PATCH_PX
        img_ids = torch.zeros(h, w, 3)
        img_ids[..., 1] += torch.arange(h)[:, None]
        img_ids[..., 2] += torch.arange(w)[None, :]
        out = {
            "hidden_states": lat.to(dtype),
            "encoder_hidden_states": txt.to(dtype),
            "pooled_projections": pooled.to(dtype),
            "timestep": t.float(),
            "img_ids": img_ids.reshape(h * w, 3),
            "txt_ids": torch.zeros(spec.text_len, 3),
        }
        if cfg.guidance_embeds:
            out["guidance"] = torch.full((spec.model_batch,), 3.5)
        return out

    # -- the diffusers pipeline (FluxPipeline) -------------------------------------------------------------
    UNSUPPORTED_CALL_ARGS = {
        "joint_attention_kwargs": "joint_attention_kwargs (LoRA scale, IP-Adapter) are not in the static graph; fuse LoRA weights before export or use the torch backend",
        "controlnet_block_samples": "ControlNet residuals are not in the static graph; use the torch backend for ControlNet",
        "controlnet_single_block_samples": "ControlNet residuals are not in the static graph; use the torch backend for ControlNet",
    }

    def check_embedded_recipe(self, recipe) -> None:
        c = int((recipe.model.config or {}).get("in_channels", 64))
        if c % 4:
            raise RecipeError(
                f"{recipe.source_path}: model.config.in_channels = {c} is not 4 x VAE channels (FluxPipeline packs 2x2 latents); use a multiple of 4."
            )

    def embedded_pipeline(self, transformer: nn.Module, recipe):
        """CLIP (``CLIPTextModel``: its pooled output is ``pooled_projections``, so hidden = pooled_projection_dim),
        T5 (d_model = joint_attention_dim), a VAE with ``in_channels / 4`` latent channels and Flux.1's scaling
        and shift factors, and the flow-matching scheduler with Flux's resolution-dependent shift."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        cfg = transformer.config
        seed = recipe.pipeline.seed
        tok = C.clip_tokenizer(recipe.pipeline.clip_max_length)
        clip = C.clip_text_model(tok, int(cfg.pooled_projection_dim), seed + C.SEED_CLIP1)
        tok2 = C.t5_tokenizer()
        t5 = C.t5_encoder(tok2, int(cfg.joint_attention_dim), seed + C.SEED_T5)
        vae = C.vae(
            seed + C.SEED_VAE, latent_channels=int(cfg.in_channels) // 4, scaling_factor=0.3611, shift_factor=0.1159
        )
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=recipe.pipeline.scheduler_shift,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
        return self.pipeline_class()(
            scheduler=scheduler,
            vae=vae,
            text_encoder=clip,
            tokenizer=tok,
            text_encoder_2=t5,
            tokenizer_2=tok2,
            transformer=transformer,
        )

    def pipeline_call(
        self, pipe, prompt, *, negative_prompt, steps, guidance, height, width, max_sequence_length, generator
    ):
        """``FluxPipeline``: guidance is the distilled embedding (``guidance_scale``), one transformer call per step."""
        if negative_prompt is not None:
            raise ConfigError(
                f"--negative-prompt {negative_prompt!r}: FluxPipeline uses a negative prompt only for true CFG (true_cfg_scale > 1, a second "
                "transformer call per step), which this runtime does not run; drop --negative-prompt (--guidance is Flux's guidance embedding)."
            )
        return {
            "prompt": prompt,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "height": height,
            "width": width,
            "generator": generator,
            "max_sequence_length": max_sequence_length,
        }

    def text_cache_info(self, pipe, text_len: int) -> dict[str, Any]:
        return {"max_sequence_length": text_len, "clip_max_length": int(pipe.tokenizer.model_max_length)}

    def encode_text_cache(
        self, pipe, config: Any, prompts: list[str], text_len: int, device: str
    ) -> tuple[dict[str, torch.Tensor], int]:
        """``FluxPipeline.encode_prompt``: T5 ``prompt_embeds [T, J]`` (T = ``max_sequence_length``) and pooled CLIP
        ``pooled [P]``; a prompt counts as truncated when it exceeds CLIP's window or the T5 length."""
        clip = int(pipe.tokenizer.model_max_length)
        truncated = sum(
            int(len(pipe.tokenizer(t).input_ids) > clip or len(pipe.tokenizer_2(t).input_ids) > text_len)
            for t in prompts
        )
        pe, pooled, _ = pipe.encode_prompt(prompts, prompts, device=device, max_sequence_length=text_len)
        return {"prompt_embeds": pe.float().cpu(), "pooled": pooled.float().cpu()}, truncated

    def encode_latent_cache(self, pipe, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE latents packed 2 x 2 into tokens ``[B, N, 4C]``, as ``FluxPipeline.prepare_latents`` packs them."""
        z = super().encode_latent_cache(pipe, pixels)
        return pipe._pack_latents(z, z.shape[0], z.shape[1], z.shape[2], z.shape[3])

    def call_geometry(self, config: Any, call: dict[str, Any]) -> dict[str, int | None]:
        """Packed latents ``[B, N, C]`` carry no grid: the size comes from ``img_ids`` (rows, cols = max id + 1)."""
        ids = call.get("img_ids")
        n = int(call["hidden_states"].shape[1])
        if ids is not None and ids.numel():
            ids = ids.reshape(-1, ids.shape[-1])
            rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        else:
            rows = cols = int(round(n**0.5))
        ehs = call.get("encoder_hidden_states")
        return {
            "height": rows * FLUX_PATCH_PX,
            "width": cols * FLUX_PATCH_PX,
            "text_len": int(ehs.shape[1]) if ehs is not None else None,
        }

    @contextlib.contextmanager
    def export_context(self, transformer: nn.Module, inputs: dict[str, torch.Tensor]):
        """Bakes RoPE: ``pos_embed`` returns the eagerly computed (float64 -> fp32) cos/sin of the static ids."""
        pe = transformer.pos_embed
        with torch.no_grad():
            cos, sin = pe(torch.cat([inputs["txt_ids"], inputs["img_ids"]], dim=0))
        pe.forward = lambda ids: (cos, sin)
        try:
            yield
        finally:
            del pe.forward


def _capture_context(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: decides this call's keep schedule (phase, from ``1000 * timestep``) and keeps
    ``pooled_projections`` for the routed blocks' routers."""
    bound = bound_args(module, args, kwargs)
    state = hook_state(module)
    t = bound.get("timestep")
    if state.phases is not None:
        t = phase_timestep(t, FluxAdapter.TIMESTEP_SCALE)
    config = state.call_config(bound.get("hidden_states"), t)
    state.call = {"config": config, "pooled": bound.get("pooled_projections")}
    return None


def _routed_block_forward(
    block, hidden_states, encoder_hidden_states=None, temb=None, image_rotary_emb=None, joint_attention_kwargs=None
):
    """A routed Flux block (double or single): top-k over image tokens, gather tokens and their RoPE rows,
    the unmodified diffusers block on ``[all text; kept image]``, scatter back (rejected tokens unchanged)."""
    owner, index, state, config = block_context(block)
    pooled = state.call.get("pooled")
    if pooled is None:
        raise ConfigError(
            "a routed Flux block needs pooled_projections; call the transformer with pooled_projections=."
        )

    def run(kept, idx, rows=None):
        rope = image_rotary_emb
        if (
            rope is not None and idx is not None
        ):  # text rows whole, then the kept image tokens' rows (shared=True: one idx for all rows)
            t_len = int(encoder_hidden_states.shape[1])
            rope = tuple(torch.cat([r[:t_len], r[t_len:].index_select(0, idx[0])], dim=0) for r in rope)
        return type(block).forward(
            block,
            hidden_states=kept,
            encoder_hidden_states=rows_of(encoder_hidden_states, rows),
            temb=rows_of(temb, rows),
            image_rotary_emb=rope,
            joint_attention_kwargs=joint_attention_kwargs,
        )

    return route_tokens(owner, index, state, config, hidden_states, temb, pooled, run, shared=True)


def _flux_flops(adapter: FluxAdapter, config: Any, n: int, t_len: int, keep_ratios, batch: int, bottleneck: int):
    """Flux terms: ``k`` kept image tokens, ``S = T + k`` joint tokens; double blocks run separate text and
    image weights, single blocks run every linear on all ``S`` tokens."""
    c = adapter.full_config(config)
    D = int(c["num_attention_heads"]) * int(c["attention_head_dim"])
    B, N, T = batch, n, t_len
    P, J, C_in = int(c["pooled_projection_dim"]), int(c["joint_attention_dim"]), int(c["in_channels"])
    C_out = int(c["out_channels"] or C_in) * int(c["patch_size"]) ** 2
    n_double, n_single = int(c["num_layers"]), int(c["num_single_layers"])
    guidance = bool(c["guidance_embeds"])
    model = {
        "embed.x": 2 * B * N * C_in * D,
        "embed.time_guidance_text": 2 * B * ((256 * D + D * D) * (2 if guidance else 1) + P * D + D * D),
        "embed.context": 2 * B * T * J * D,
        "out.norm": 2 * B * D * 2 * D,
        "out.proj": 2 * B * N * D * C_out,
    }

    def block(i: int, k: int, routed: bool) -> dict[str, int]:
        S = T + k
        if i < n_double:
            b = {
                "double.adaln": 2 * 2 * B * D * 6 * D,
                "double.img.qkv_out": 4 * 2 * B * k * D * D,
                "double.img.mlp": 2 * 2 * B * k * D * 4 * D,
                "double.txt.qkv_out": 4 * 2 * B * T * D * D,
                "double.txt.mlp": 2 * 2 * B * T * D * 4 * D,
                "double.attn.sdpa": 2 * 2 * B * S * S * D,
            }
        else:
            b = {
                "single.adaln": 2 * B * D * 3 * D,
                "single.qkv": 3 * 2 * B * S * D * D,
                "single.mlp_in": 2 * B * S * D * 4 * D,
                "single.proj_out": 2 * B * S * 5 * D * D,
                "single.attn.sdpa": 2 * 2 * B * S * S * D,
            }
        b = {f"block.{k_}": v for k_, v in b.items()}
        if routed:
            b.update(router_terms(B, N, D, P, bottleneck))
        return b

    notes = (
        "2 FLOPs per multiply-add; matrix products only",
        "RoPE, norms, modulation, activations and softmax not counted",
        "double blocks: separate text/image weights; single blocks: all linears over [text; kept image]",
    )
    return assemble_count(n_double + n_single, N, T, keep_ratios, B, bottleneck, model, block, notes)
