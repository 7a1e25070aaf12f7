"""What lives in diffusers' own SD3 forward works through the pruned transformer (the block-override design):
skip-layer guidance, ControlNet residuals and a peft LoRA with its ``joint_attention_kwargs`` scale.

Each is bit-identical to the dense model at ratio 0 (``torch.equal``); a ratio > 0 run shows the input still
matters to the routed model. Tiny seeded models (``sd35-tiny``: dual attention and qk-norm; ``sd3-tiny``).
"""

from __future__ import annotations

import copy

import pytest
import torch

from shiva_export.models import InputSpec, get_adapter, load_transformer
from shiva_export.prune import ShivaConfig, apply_shiva_, remove_shiva_
from shiva_export.recipe import load_recipe

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

MODELS = ["sd35-tiny", "sd3-tiny"]


@pytest.fixture(scope="module", params=MODELS)
def tiny(request):
    rec = load_recipe(request.param)
    model = load_transformer(recipe=rec).eval()
    spec = InputSpec(1, 128, 128, 8, True)  # 64 image tokens, CFG pair: the shape is not what these tests are about
    x = get_adapter(model).make_inputs(model.config, spec, seed=3)
    return request.param, model, x


def _run(model, x, **kw):
    with torch.no_grad():
        return model(**x, **kw).sample


def _pruned(model, ratio, x, **kw):
    apply_shiva_(model, ShivaConfig.uniform(len(model.transformer_blocks), ratio, cfg=True), seed=1)
    try:
        return _run(model, x, **kw)
    finally:
        remove_shiva_(model)


# -- skip-layer guidance ---------------------------------------------------------------------------------------


def test_skip_layers_through_the_pruned_transformer(tiny):
    """``skip_layers`` (the pipeline's ``skip_guidance_layers``) skips the same blocks routed or dense."""
    _, model, x = tiny
    dense = _run(model, x)
    for skip in ([1], [2], [1, 2]):  # routed blocks: their override must not run when diffusers skips them
        dense_skip = _run(model, x, skip_layers=skip)
        assert not torch.equal(dense_skip, dense), skip
        assert torch.equal(_pruned(model, 0.0, x, skip_layers=skip), dense_skip), skip
    assert not torch.equal(_pruned(model, 0.4, x, skip_layers=[1]), _pruned(model, 0.4, x))


def test_skip_guidance_layers_in_the_pipeline_at_ratio_0_equal_dense():
    """``StableDiffusion3Pipeline(skip_guidance_layers=...)`` end to end (torch backend): ratio 0 is dense."""
    from shiva_export.runtime.pipeline import load_pipeline

    pipe = load_pipeline("sd3-tiny", backend="torch", ratio=0.0)

    def latents(slg=(1,)):
        with torch.no_grad():
            return pipe(
                "a red cube",
                num_inference_steps=3,
                guidance_scale=4.5,
                output_type="latent",
                max_sequence_length=16,
                height=128,
                width=128,
                skip_guidance_layers=list(slg) if slg else None,
                skip_layer_guidance_start=0.0,
                skip_layer_guidance_stop=1.0,
                generator=torch.Generator().manual_seed(0),
            ).images

    routed = latents()
    routed_no_slg = latents(slg=None)
    remove_shiva_(pipe.transformer)
    dense = latents()
    assert torch.equal(routed, dense)
    assert not torch.equal(routed, routed_no_slg)  # the guidance really ran


# -- ControlNet residuals --------------------------------------------------------------------------------------


def _controlnet(model):
    from diffusers import SD3ControlNetModel

    c = model.config
    torch.manual_seed(7)
    net = SD3ControlNetModel(
        sample_size=c.sample_size,
        patch_size=c.patch_size,
        in_channels=c.in_channels,
        num_layers=2,
        attention_head_dim=c.attention_head_dim,
        num_attention_heads=c.num_attention_heads,
        joint_attention_dim=c.joint_attention_dim,
        caption_projection_dim=c.caption_projection_dim,
        pooled_projection_dim=c.pooled_projection_dim,
        out_channels=c.out_channels,
        pos_embed_max_size=c.pos_embed_max_size,
    ).eval()
    for p in net.parameters():  # diffusers zero-initialises the output projections: make them matter
        torch.nn.init.normal_(p, std=0.05)
    return net


def test_controlnet_residuals_through_the_pruned_transformer(tiny):
    _, model, x = tiny
    net = _controlnet(model)
    cond = torch.randn(x["hidden_states"].shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        res = net(
            hidden_states=x["hidden_states"],
            controlnet_cond=cond,
            conditioning_scale=1.0,
            encoder_hidden_states=x["encoder_hidden_states"],
            pooled_projections=x["pooled_projections"],
            timestep=x["timestep"],
        ).controlnet_block_samples
    assert len(res) == 2 and all(r.abs().max() > 0 for r in res)
    dense = _run(model, x, block_controlnet_hidden_states=res)
    assert not torch.equal(dense, _run(model, x))
    assert torch.equal(_pruned(model, 0.0, x, block_controlnet_hidden_states=res), dense)
    pruned = _pruned(model, 0.4, x, block_controlnet_hidden_states=res)
    assert torch.isfinite(pruned).all() and not torch.equal(
        pruned, _pruned(model, 0.4, x)
    )  # the residuals reach the routed model


# -- a peft LoRA with its scale --------------------------------------------------------------------------------


def test_lora_scale_through_joint_attention_kwargs(tiny):
    """A peft LoRA on the attention projections: ``joint_attention_kwargs={"scale": 0.5}`` scales it in the pruned
    model exactly as in the dense one (diffusers' forward carries ``@apply_lora_scale``)."""
    pytest.importorskip("peft")
    from peft import LoraConfig

    _, base, x = tiny
    model = copy.deepcopy(base)
    model.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    )
    g = torch.Generator().manual_seed(11)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero B so the adapter changes the output
            p.data = torch.randn(p.shape, generator=g) * 0.1
    half = {"joint_attention_kwargs": {"scale": 0.5}}
    dense_half, dense_full = _run(model, x, **half), _run(model, x)
    assert not torch.equal(dense_half, dense_full) and not torch.equal(dense_half, _run(base, x))
    pruned_half = _pruned(model, 0.0, x, **half)
    assert torch.equal(pruned_half, dense_half)
    assert not torch.equal(pruned_half, dense_full)
    assert torch.equal(_pruned(model, 0.0, x), dense_full)
    assert not torch.equal(_pruned(model, 0.4, x, **half), _pruned(model, 0.4, x))
    assert torch.equal(_run(model, x, **half), dense_half)  # the scale was restored after the pruned calls
