"""DiT adapter (class-conditional DiT-XL/2): the architecture facts of diffusers' ``DiTTransformer2DModel``.

Quirks handled here, checked on diffusers 0.42:
- **Blocks.** ``transformer_blocks`` are ``BasicTransformerBlock``s with ``ada_norm_zero``, called as
  ``block(hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
  timestep=, cross_attention_kwargs=, class_labels=)`` and returning a tensor. Self-attention only, no
  text; positions are a sin-cos table added in ``pos_embed``, so no gather beyond the tokens.
- **No model-level temb.** Each block's ``norm1.emb`` (``CombinedTimestepLabelEmbeddings``) recomputes the
  conditioning from the raw ``timestep``/``class_labels``; the final layer uses block 0's. The router
  context is therefore the routed block's own: ``temb = norm1.emb(t, y)`` (time + class embedding, width D)
  and ``pooled = norm1.emb.class_embedder(y)`` (the class embedding; the null class for the uncond half),
  computed from the block's arguments. In converted checkpoints every block's embedder is the same copy.
- The output reshape ``int(N ** 0.5)`` runs after the scatter, so it is unaffected; square images only.
- ``DiTPipeline``'s CFG batch is ``[cond; uncond]``, the reverse of SD3/PixArt; the max-of-halves rule is
  symmetric, so shared CFG indices still hold. ``class_labels`` is an int64 graph input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shiva_export.errors import ConfigError, ShapeError
from shiva_export.models import components as C
from shiva_export.models._override import (
    add_hook,
    block_context,
    hook_state,
    install_overrides,
    remove_overrides,
    route_tokens,
    rows_of,
)
from shiva_export.models.base import VAE_SCALE, InputSpec, ModelAdapter, register_adapter, transformer_config
from shiva_export.models.flops import assemble_count, router_terms

__all__ = ["DiTAdapter", "TINY_LABELS"]

#: Names of the first class ids of the offline tiny DiT pipeline (``dit-tiny``); the others are ``class <id>``.
TINY_LABELS = (
    "cat",
    "dog",
    "bird",
    "fish",
    "horse",
    "cow",
    "tree",
    "flower",
    "house",
    "car",
    "boat",
    "mountain",
    "red cube",
    "blue ball",
)


#: DoRA targets (peft regex, full-name match): self-attention and FFN linears of each block.
DIT_DORA_TARGETS = r"transformer_blocks\.\d+\.(attn1\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"


@register_adapter
class DiTAdapter(ModelAdapter):
    """DiT (class-conditional, adaLN-Zero): image tokens only, conditioning from timestep + class label."""

    NAME = "dit"
    MODEL_CLASS = "DiTTransformer2DModel"
    PIPELINE_CLASS = "DiTPipeline"
    REPO_IDS = {"dit-xl-2-256": "facebook/DiT-XL-2-256"}
    CONFIG_CLASS_NAMES = ("Transformer2DModel",)  # the hub checkpoint's transformer/config.json
    EXAMPLE_PROMPT = "207"  # a class id: the tiny pipeline's "class 207", ImageNet's "golden retriever"
    TEXT_PROMPTS = False
    UNSUPPORTED_CALL_ARGS = {
        "cross_attention_kwargs": "cross_attention_kwargs (LoRA scale) are not in the static graph; fuse LoRA weights before export or use the torch backend",
    }

    def scheduler(self, shift: float = 3.0):
        """The DDIM sampler ``DiTPipeline`` runs (the embedded pipeline's too); ``shift`` (SD3's) does not apply."""
        return _scheduler()

    def router_dims(self, transformer: nn.Module) -> tuple[int, int]:
        return int(transformer.inner_dim), int(transformer.inner_dim)

    def dora_target_modules(self) -> str:
        # self-attention and the FFN; not the per-block adaLN-Zero (norm1.emb.*, norm1.linear) nor proj_out_*.
        return DIT_DORA_TARGETS

    def install_routing(self, transformer: nn.Module) -> None:
        if any(getattr(b, "pos_embed", None) is not None for b in transformer.transformer_blocks):
            raise ConfigError(
                "a DiT block has a sequence-index pos_embed, which breaks under token gathering. Use a checkpoint without block pos_embed."
            )
        install_overrides(transformer, transformer.transformer_blocks, _routed_block_forward)
        add_hook(transformer, "", _capture_call, "pre")

    def remove_routing(self, transformer: nn.Module) -> None:
        remove_overrides(transformer, transformer.transformer_blocks)

    def check_image_size(self, config: Any, height: int, width: int) -> None:
        super().check_image_size(config, height, width)
        if height != width:
            raise ShapeError(
                f"--height {height} != --width {width}; DiT's output reshape assumes square images. Use equal sizes."
            )

    def input_names(self, config: Any) -> tuple[str, ...]:
        return ("hidden_states", "timestep", "class_labels")

    def float_inputs(self, config: Any) -> tuple[str, ...]:
        return ("hidden_states",)

    def input_shapes(self, config: Any, spec: InputSpec) -> dict[str, tuple[int, ...]]:
        cfg = transformer_config(config)
        b = spec.model_batch
        return {
            "hidden_states": (b, cfg.in_channels, spec.height // VAE_SCALE, spec.width // VAE_SCALE),
            "timestep": (b,),
            "class_labels": (b,),
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
        """DiT terms: per image token 12 D^2 plus self-attention ``2*2*k^2*D``; every block's adaLN-Zero embedder
        (t MLP + 6D modulation) is per sample; a routed block runs its embedder once more for the router's temb.
        ``text_len`` is ignored (no text)."""
        self.check_context(context)
        c = self.full_config(config)
        D = int(c["num_attention_heads"]) * int(c["attention_head_dim"])
        B, N = batch, num_image_tokens
        p2, C_in = int(c["patch_size"]) ** 2, int(c["in_channels"])
        C_out = int(c["out_channels"] or C_in)
        t_mlp = 2 * B * (256 * D + D * D)
        model = {
            "embed.patch": 2 * B * N * C_in * p2 * D,
            "out.conditioning": t_mlp + 2 * B * D * 2 * D,  # blocks[0].norm1.emb + proj_out_1
            "out.proj": 2 * B * N * D * p2 * C_out,
        }

        def block(i: int, k: int, routed: bool) -> dict[str, int]:
            b = {
                "block.adaln": t_mlp + 2 * B * D * 6 * D,
                "block.attn.qkv_out": 4 * 2 * B * k * D * D,
                "block.attn.sdpa": 2 * 2 * B * k * k * D,
                "block.mlp": 2 * 2 * B * k * D * 4 * D,
            }
            if routed:
                b.update(router_terms(B, N, D, D, bottleneck))
                b["router.context"] += t_mlp  # the block's own norm1.emb(t, y), recomputed for the router
            return b

        notes = (
            "2 FLOPs per multiply-add; matrix products only",
            "class embedding lookups, norms, modulation, activations, softmax not counted",
        )
        return assemble_count(int(c["num_layers"]), N, 1, keep_ratios, B, bottleneck, model, block, notes)

    # -- the diffusers pipeline (DiTPipeline: class-conditional, no text) -----------------------------------
    def embedded_pipeline(self, transformer: nn.Module, recipe):
        """An SD-style VAE (``in_channels`` latent channels, scaling 0.18215, quant convs), DiT's DDIM scheduler
        (linear betas) and an ``id2label`` table: the first ids are named after :data:`TINY_LABELS`, the rest
        ``class <id>`` (the real checkpoint ships ImageNet's names)."""

        cfg = transformer.config
        n = int(cfg.num_embeds_ada_norm)
        id2label = {i: (TINY_LABELS[i] if i < len(TINY_LABELS) else f"class {i}") for i in range(n)}
        vae = C.vae(
            recipe.pipeline.seed + C.SEED_VAE,
            latent_channels=int(cfg.in_channels),
            scaling_factor=0.18215,
            shift_factor=None,
            quant_convs=True,
        )
        return self.pipeline_class()(transformer=transformer, vae=vae, scheduler=_scheduler(), id2label=id2label)

    def pipeline_index_extras(self, pipe) -> dict[str, Any]:
        """``id2label``: ``DiTPipeline`` takes it at ``__init__`` (for :meth:`get_label_ids`) but
        ``save_pretrained`` does not write it; the hub checkpoint has it in ``model_index.json``."""
        by_id: dict[int, list[str]] = {}
        for label, i in getattr(pipe, "labels", {}).items():
            by_id.setdefault(int(i), []).append(label)
        return {"id2label": {str(i): ", ".join(v) for i, v in sorted(by_id.items())}} if by_id else {}

    def max_sequence_length(self, pipe, text_len: int) -> int | None:
        return None  # no text stream

    def pipeline_text_len(self, pipe, max_sequence_length: int | None) -> int | None:
        return None

    def class_id(self, pipe, prompt: str, num_classes: int | None = None) -> int:
        """A class id from a ``--prompt``: an integer id, or a label of ``pipe.labels`` (``get_label_ids``); ``num_classes``
        defaults to the pipeline transformer's ``num_embeds_ada_norm``."""
        n = int(pipe.transformer.config.num_embeds_ada_norm if num_classes is None else num_classes)
        text = prompt.strip()
        if text.lstrip("-").isdigit():
            i = int(text)
            if not 0 <= i < n:
                raise ConfigError(
                    f"--prompt {prompt!r}: class id {i} is out of range; DiT takes class ids 0..{n - 1} (or a class label)."
                )
            return i
        labels = getattr(pipe, "labels", {}) or {}
        if text not in labels:
            some = ", ".join(repr(x) for x in list(labels)[:6]) or "(this pipeline has no id2label)"
            raise ConfigError(
                f"--prompt {prompt!r} is not a class label of this DiT pipeline; DiT is class-conditional: pass a label such as {some}, "
                f"or a class id 0..{n - 1}."
            )
        return int(pipe.get_label_ids([text])[0])

    CACHE_TEXT_INPUTS = {"class_labels": "class_labels"}
    PREDICTION = "epsilon"  # DDPM noise (plus the learned-variance half of the output, not trained here)

    def text_cache_info(self, pipe, text_len: int) -> dict[str, Any]:
        return {}  # no text encoder

    def encode_text_cache(
        self, pipe, config: Any, prompts: list[str], text_len: int, device: str
    ) -> tuple[dict[str, torch.Tensor], int]:
        """Class ids (:meth:`class_id`: an id or a label of the pipeline) as ``class_labels`` (int64, no axis per sample);
        the empty prompt is the null class ``num_embeds_ada_norm``, the unconditional input of DiT's CFG."""
        n = int(transformer_config(config).num_embeds_ada_norm)
        ids = [n if not p.strip() else self.class_id(pipe, p, num_classes=n) for p in prompts]
        return {"class_labels": torch.tensor(ids, dtype=torch.int64)}, 0

    def pipeline_call(
        self, pipe, prompt, *, negative_prompt, steps, guidance, height, width, max_sequence_length, generator
    ):
        """``DiTPipeline(class_labels=[id], guidance_scale=, ...)``: the prompt is a class label or id; the size is
        the transformer's ``sample_size`` (the pipeline takes no height/width); CFG uses the null class 1000."""
        if negative_prompt is not None:
            raise ConfigError(
                f"--negative-prompt {negative_prompt!r}: DiT is class-conditional; its CFG uses the null class, so drop --negative-prompt."
            )
        n = int(pipe.transformer.config.num_embeds_ada_norm)
        if guidance > 1.0 and n != 1000:
            raise ConfigError(
                f"DiTPipeline's CFG hard-codes the null class id 1000, but this DiT has num_embeds_ada_norm = {n} (null id {n}); "
                "call with --guidance 1 (no CFG) or use a 1000-class model."
            )
        side = int(pipe.transformer.config.sample_size) * VAE_SCALE
        for name, v in (("height", height), ("width", width)):
            if v is not None and v != side:
                raise ShapeError(
                    f"--{name} {v}: DiTPipeline generates at the transformer's sample_size, {side} px; drop --{name} or use {side}."
                )
        return {
            "class_labels": [self.class_id(pipe, prompt)],
            "guidance_scale": guidance,
            "num_inference_steps": steps,
            "generator": generator,
        }

    def make_inputs(
        self,
        config: Any,
        spec: InputSpec,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        timestep: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Seeded inputs as ``DiTPipeline`` feeds them: latents, float timestep in 0..1000, int64 class labels;
        with CFG ``[cond; uncond]`` halves sharing latent and timestep, the uncond half the null class."""
        cfg = transformer_config(config)
        g = torch.Generator(device="cpu").manual_seed(seed)
        shapes = self.input_shapes(cfg, spec)
        half = spec.batch
        n_classes = int(cfg.num_embeds_ada_norm)
        lat = torch.randn((half, *shapes["hidden_states"][1:]), generator=g)
        y = torch.randint(0, n_classes, (half,), generator=g)
        t = torch.rand((half,), generator=g) * 1000.0 if timestep is None else torch.full((half,), float(timestep))
        if spec.cfg:
            lat, t, y = torch.cat([lat, lat]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, n_classes)])
        return {"hidden_states": lat.to(dtype), "timestep": t.float(), "class_labels": y.to(torch.int64)}


def _capture_call(module: nn.Module, args: tuple, kwargs: dict):
    """Model pre-hook: this call's keep schedule (DiT's own forward has no model-level context to capture)."""
    state = hook_state(module)
    hs = kwargs.get("hidden_states", args[0] if args else None)
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    state.call = {"config": state.call_config(hs, t)}
    return None


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
    """A routed DiT block: context from the block's own ``norm1.emb(t, y)``, top-k, the unmodified block on
    the kept tokens, scatter back."""
    owner, index, state, config = block_context(block)
    if attention_mask is not None:
        raise ConfigError(
            "a routed DiT block got an attention_mask, which would need gathering. Call the transformer without one."
        )
    emb = block.norm1.emb
    temb = emb(timestep, class_labels, hidden_dtype=hidden_states.dtype)
    pooled = emb.class_embedder(class_labels)

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
    """DiT's DDIM scheduler (linear betas 1e-4..0.02, 1000 steps, no clipping): the embedded pipeline's, and
    the one training cuts learned phases on."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False
    )
