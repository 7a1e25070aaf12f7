"""`shiva-export train` on every architecture (``tests/archcases.py``, SD3 included): the route-override protocol
gives a bit-exact dense teacher and a student whose forward equals inference's hard routing, gradients reach
the routers, and a short run writes a recipe whose learned phases export."""

from __future__ import annotations

import pytest
import torch

from shiva_export.models import InputSpec, get_adapter, load_transformer, make_inputs
from shiva_export.prune.api import ShivaConfig, apply_shiva_, remove_shiva_, set_route_override
from shiva_export.recipe import load_recipe
from shiva_export.train.data import SyntheticData
from shiva_export.train.ste import DifferentiableTopK
from shiva_export.train.student import RouteState, make_override
from tests import archcases, shared

XDIST_GROUP = shared.TRAINING  # conftest: one worker, which makes the shared artifacts once

MODELS = archcases.NAMES


def _setup(name: str, batch: int = 2):
    rec = load_recipe(name)
    model = load_transformer(recipe=rec)
    for p in model.parameters():
        p.requires_grad_(False)
    a = get_adapter(model)
    n = a.num_blocks(model)
    routed = rec.routed_blocks(n)
    data = SyntheticData(model, rec.shapes.height, rec.shapes.width, rec.shapes.text_len, seed=5)
    batch_ = data.batch(batch, timesteps=torch.tensor([900.0, 300.0][:batch]))
    return rec, model, n, routed, batch_.model_inputs()


@pytest.mark.parametrize("name", MODELS)
def test_dense_teacher_is_the_plain_forward_bit_for_bit(name):
    rec, model, n, routed, inputs = _setup(name)
    with torch.no_grad():
        ref = model(**inputs).sample
        apply_shiva_(model, ShivaConfig.uniform(n, 0.4, routed))
        st = RouteState(routed, DifferentiableTopK(), set())
        set_route_override(model, make_override(st))
        out = model(**inputs).sample
        remove_shiva_(model)
    assert torch.equal(out, ref)


def _teacher_updates(model, st, inputs):
    with torch.no_grad():
        st.mode, st.record_updates = "dense", True
        model(**inputs)
        st.record_updates = False


@pytest.mark.parametrize("estimator", ["output-gated", "residual"])
@pytest.mark.parametrize("name", MODELS)
def test_student_forward_equals_hard_routing_and_grads_reach_routers(name, estimator):
    rec, model, n, routed, inputs = _setup(name)
    keep = 0.6
    bank = apply_shiva_(model, ShivaConfig.uniform(n, 1.0 - keep, routed), seed=0)
    with torch.no_grad():
        hard = model(**inputs).sample  # inference routing (hard top-k, shared indices where the adapter needs them)
    topk = DifferentiableTopK(noise_std=0.0)
    st = RouteState(routed, topk, set(), estimator=estimator)
    set_route_override(model, make_override(st))
    _teacher_updates(model, st, inputs)
    st.mode, st.keep = "student", torch.full((2, len(routed)), keep)
    out = model(**inputs).sample
    assert torch.equal(out.detach(), hard)
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in bank.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    set_route_override(model, None)
    remove_shiva_(model)


def test_flux_student_shares_one_index_set_per_keep_group():
    rec, model, n, routed, inputs = _setup("flux-tiny")
    apply_shiva_(model, ShivaConfig.uniform(n, 0.4, routed), seed=0)
    seen = []

    def spy(index, hs, temb, pooled, run_block, shared, routers):
        seen.append(shared)
        return inner(index, hs, temb, pooled, run_block, shared, routers)

    st = RouteState(routed, DifferentiableTopK(noise_std=0.0), set())
    inner = make_override(st)
    set_route_override(model, spy)
    _teacher_updates(model, st, inputs)
    seen.clear()
    st.mode, st.keep = "student", torch.tensor([[0.6] * len(routed), [0.8] * len(routed)])  # two keep groups
    with torch.no_grad():
        out = model(**inputs).sample
    assert seen and all(seen) and torch.isfinite(out).all()
    remove_shiva_(model)


@pytest.mark.parametrize("name", MODELS)
def test_short_training_writes_an_exportable_recipe(name):
    res = shared.short_training(
        name
    )  # TrainConfig(**shared.SHORT_TRAINING), once per session (test_train_loop resumes against it)
    assert res.finished and res.router_path.is_file() and abs(res.mean_keep - 0.6) <= 0.02
    rec = load_recipe(res.recipe_path)
    assert rec.architecture == get_adapter(rec.architecture).NAME and len(rec.schedule.phases) == 2
    # the phase boundaries come from this architecture's own pipeline sampler
    model = load_transformer(recipe=rec)
    a = get_adapter(model)
    n_tok = a.num_image_tokens(model.config, rec.shapes.height, rec.shapes.width)
    assert rec.schedule.timesteps == pytest.approx(a.sampler_timesteps(model.config, 28, n_tok))
    # the learned early phase routes the model with the trained router
    from shiva_export.prune.router import load_routers

    keep = rec.phase_keep_ratios(0, a.num_blocks(model))
    scfg = ShivaConfig(tuple(keep))
    bank, _ = load_routers(rec.router_weights_path(), scfg.router_config(*a.router_dims(model)))
    apply_shiva_(model, scfg, routers=bank)
    spec = InputSpec(batch=1, height=rec.shapes.height, width=rec.shapes.width, text_len=rec.shapes.text_len, cfg=False)
    with torch.no_grad():
        y = model(**make_inputs(model, spec, seed=1)).sample
    assert torch.isfinite(y).all()
