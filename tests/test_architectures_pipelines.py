"""Every architecture (``tests/archcases.py``) inside its own diffusers pipeline (torch backend): ``shiva_pipeline``
prunes the transformer of an offline tiny ``StableDiffusion3Pipeline`` / ``DiTPipeline`` / ``FluxPipeline`` /
``PixArtSigmaPipeline`` through its adapter.
Keep 1.0 reproduces the dense pipeline's image bit for bit; ratio 0.4 runs the routed path on every step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shiva_export.models import load_transformer
from shiva_export.models.components import clip_tokenizer, seeded, t5_encoder, t5_tokenizer
from shiva_export.prune import is_shiva_applied, remove_shiva_
from shiva_export.recipe import load_recipe
from shiva_export.runtime.pipeline import shiva_pipeline
from tests import archcases

torch.set_num_threads(1)


def _vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    with seeded(0):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=8,
            sample_size=128,
            scaling_factor=0.3611,
            shift_factor=0.1159,
        ).eval()  # Flux.1 VAE factors


def _sd3():
    from shiva_export.runtime.pipeline import load_diffusers_pipeline

    rec = load_recipe("sd35-tiny")
    pipe = load_diffusers_pipeline(recipe=rec)  # the embedded offline pipeline (two CLIPs, T5, 16-channel VAE)
    pipe.set_progress_bar_config(disable=True)
    return (
        rec,
        pipe,
        lambda p: (
            p(
                "a red cube",
                height=128,
                width=128,
                num_inference_steps=2,
                guidance_scale=4.5,
                max_sequence_length=rec.max_sequence_length(),
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            ).images
        ),
    )


def _dit():
    from diffusers import DDIMScheduler, DiTPipeline

    rec = load_recipe("dit-tiny")
    pipe = DiTPipeline(transformer=load_transformer(recipe=rec), vae=_vae(), scheduler=DDIMScheduler())
    return (
        rec,
        pipe,
        lambda p: (
            p(
                class_labels=[3],
                num_inference_steps=2,
                guidance_scale=4.0,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            ).images
        ),
    )


def _flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    rec = load_recipe("flux-tiny")
    tok = clip_tokenizer(16)
    with seeded(1):
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tok),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=16,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        ).eval()
    tok2 = t5_tokenizer()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(),
        text_encoder=clip,
        tokenizer=tok,
        text_encoder_2=t5_encoder(tok2, 32, 2),
        tokenizer_2=tok2,
        transformer=load_transformer(recipe=rec),
    )
    return (
        rec,
        pipe,
        lambda p: (
            p(
                "a red cube",
                height=128,
                width=128,
                num_inference_steps=2,
                guidance_scale=3.5,
                max_sequence_length=8,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            ).images
        ),
    )


def _pixart():
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    rec = load_recipe("pixart-tiny")
    tok = t5_tokenizer()
    pipe = PixArtSigmaPipeline(
        tokenizer=tok,
        text_encoder=t5_encoder(tok, 48, 2),
        vae=_vae(),
        transformer=load_transformer(recipe=rec),
        scheduler=DPMSolverMultistepScheduler(),
    )
    return (
        rec,
        pipe,
        lambda p: (
            p(
                "a red cube",
                height=128,
                width=128,
                num_inference_steps=2,
                guidance_scale=4.5,
                max_sequence_length=12,
                use_resolution_binning=False,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            ).images
        ),
    )


BUILD = {"sd3": _sd3, "flux": _flux, "pixart": _pixart, "dit": _dit}


@pytest.mark.parametrize("case", archcases.params())
def test_shiva_pipeline_keep_one_is_exact_and_ratio_runs(case):
    rec, pipe, run = BUILD[case.architecture]()
    assert rec.name == case.name
    with torch.no_grad():
        dense = run(pipe)
    shiva_pipeline(pipe, recipe=rec, ratio=0.0)
    assert is_shiva_applied(pipe.transformer)
    with torch.no_grad():
        same = run(pipe)
    assert np.array_equal(same, dense), f"max abs {np.abs(same - dense).max()}"
    remove_shiva_(pipe.transformer)
    shiva_pipeline(pipe, recipe=rec, ratio=0.4)
    with torch.no_grad():
        pruned = run(pipe)
    assert pruned.shape == dense.shape and np.isfinite(pruned).all() and not np.array_equal(pruned, dense)
    assert pipe.shiva.model == rec.name
    remove_shiva_(pipe.transformer)
    with torch.no_grad():
        assert np.array_equal(run(pipe), dense)
