"""Adaptive ratio policy, EMA budget loss, stratified sampling and LUT quantisation (paper Sec. 2.3-2.4)."""

from __future__ import annotations

import math

import pytest
import torch

from shiva_export.errors import ConfigError, ShapeError
from shiva_export.prune.api import ShivaConfig, block_budgets
from shiva_export.prune.topk import static_k
from shiva_export.train.policy import (
    EMABudget,
    RatioPolicy,
    quantize_lut,
    stratified_ratios,
    stratified_timesteps,
    timestep_embedding,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomised(policy: RatioPolicy, seed: int = 0) -> RatioPolicy:
    g = _gen(seed)
    with torch.no_grad():
        for p in policy.parameters():
            if p is not policy.b_anchor:
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p.shape[-1]) ** 0.5)
    return policy


# ------------------------------------------------------------------------------------------- policy
@pytest.mark.parametrize("target", (0.6, 0.8, 0.25))
def test_anchor_init_is_logit_target_and_fresh_policy_is_on_budget(target):
    policy = RatioPolicy(num_layers=24, target=target)
    assert float(policy.b_anchor.detach()) == pytest.approx(math.log(target / (1 - target)), abs=1e-7)
    table = policy.lut(torch.linspace(0, 999, 50), range(24))
    torch.testing.assert_close(table, torch.full((50, 24), target), rtol=0, atol=1e-6)


def test_architecture_matches_the_paper():
    policy = RatioPolicy(num_layers=24)
    assert tuple(policy.layer_embed.weight.shape) == (24, 256)
    lin = [m for m in policy.layer_mlp if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in lin] == [(256, 256), (1, 256)]
    assert isinstance(policy.layer_mlp[1], torch.nn.SiLU) and isinstance(policy.time_mlp[1], torch.nn.SiLU)
    lin = [m for m in policy.time_mlp if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in lin] == [(256, 256), (1, 256)]


def test_timestep_embedding_matches_sd3_time_proj():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.5, 28.0, 500.0, 999.0])
    want = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, 256), want, rtol=0, atol=1e-6)


def test_lut_shape_determinism_and_additive_structure():
    policy = _randomised(RatioPolicy(num_layers=24, target=0.6, logit_noise=True)).train()
    t = torch.tensor([999.0, 750.0, 500.0, 250.0, 20.0])
    layers = list(range(1, 24))
    a, b = policy.lut(t, layers), policy.lut(t, layers)
    assert a.shape == (5, 23) and a.dtype == torch.float32 and not a.requires_grad
    assert torch.equal(a, b)  # no logit noise in the LUT, even in train mode with noise on
    assert bool(((a > 0) & (a < 1)).all()) and float(a.std()) > 0.01
    noisy = policy(t, torch.tensor(layers), generator=_gen(1))
    assert not torch.allclose(noisy.detach(), a)  # the training forward is noisy in the policy stage
    torch.testing.assert_close(policy(t, torch.tensor(layers), noise=False).detach(), a)
    policy.logit_noise = False
    torch.testing.assert_close(policy(t, torch.tensor(layers)).detach(), a)
    # Decoupled additive design: logit(t, l) - logit(t, l0) does not depend on t.
    z = policy.logits(t, torch.tensor(layers), noise=False).detach()
    torch.testing.assert_close(z - z[:, :1], (z - z[:, :1])[:1].expand_as(z), rtol=0, atol=1e-5)
    with pytest.raises(ConfigError):
        policy.lut(t, [0, 24])


def test_policy_gradients_reach_both_branches_and_anchor():
    policy = RatioPolicy(num_layers=8, target=0.6)
    keep = policy(torch.tensor([10.0, 900.0]), torch.arange(1, 8), noise=False)
    keep.mean().backward()
    assert float(policy.b_anchor.grad) > 0
    assert float(policy.layer_mlp[-1].weight.grad.abs().sum()) > 0
    assert float(policy.time_mlp[-1].weight.grad.abs().sum()) > 0


def test_policy_rejects_bad_config():
    for bad in (0.0, 1.0, -0.2, float("nan")):
        with pytest.raises(ConfigError):
            RatioPolicy(num_layers=4, target=bad)
    with pytest.raises(ConfigError):
        RatioPolicy(num_layers=0)


# ------------------------------------------------------------------------------------------- budget
def test_ema_update_math_is_exact():
    budget = EMABudget(target=0.6, beta=0.2, lam=0.5)
    assert float(budget.mu) == 0.6
    mu = 0.6
    for m in (0.9, 0.7, 0.3, 0.55):
        keep = torch.full((3, 4), m, dtype=torch.float64)
        loss = budget(keep)
        mu = 0.2 * m + 0.8 * mu
        assert float(budget.mu) == pytest.approx(mu, abs=1e-15)
        assert float(loss) == pytest.approx(0.5 * m * 2 * (mu - 0.6), abs=1e-15)
    budget.eval()
    budget(torch.tensor([0.1]))
    assert float(budget.mu) == pytest.approx(mu, abs=1e-15)  # no EMA update in eval mode
    assert "mu" in budget.state_dict()
    with pytest.raises(ShapeError):
        budget(torch.tensor([]))
    with pytest.raises(ConfigError):
        EMABudget(target=0.6, beta=0.0)


@pytest.mark.parametrize(("history", "direction"), [(0.9, -1), (0.3, +1)])
def test_budget_gradient_pushes_keep_toward_target(history, direction):
    """mu above target -> the gradient lowers the keep ratios; below -> raises them."""
    budget = EMABudget(target=0.6, beta=0.2, lam=1.0)
    for _ in range(30):
        budget(torch.tensor([history]))
    keep = torch.tensor([0.6, 0.7], requires_grad=True)
    budget(keep).backward()
    assert bool((torch.sign(-keep.grad) == direction).all())  # gradient descent moves keep this way

    policy = RatioPolicy(num_layers=6, target=0.6)
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    t, layers = torch.tensor([100.0, 600.0]), torch.arange(1, 6)
    before = float(policy.lut(t, layers).mean())
    budget(policy(t, layers, noise=False)).backward()
    opt.step()
    after = float(policy.lut(t, layers).mean())
    assert math.copysign(1, after - before) == direction


# ------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("batch", (1, 3, 16, 1000))
def test_stratified_timesteps_one_per_stratum(batch):
    t = stratified_timesteps(batch, T=1000, generator=_gen(batch))
    assert t.shape == (batch,) and t.dtype == torch.float32
    stratum = torch.floor(t.double() * batch / 1000).long()
    assert torch.equal(stratum, torch.arange(batch))
    assert bool(((t >= 0) & (t < 1000)).all())
    assert torch.equal(t, stratified_timesteps(batch, T=1000, generator=_gen(batch)))
    ti = stratified_timesteps(batch, T=1000, generator=_gen(0), integer=True)
    assert ti.dtype == torch.int64
    lo = torch.div(torch.arange(batch) * 1000, batch, rounding_mode="floor")
    hi = torch.div((torch.arange(batch) + 1) * 1000, batch, rounding_mode="floor")
    assert bool(((ti >= lo) & (ti < hi)).all())
    with pytest.raises(ConfigError):
        stratified_timesteps(0)


def test_stratified_timesteps_are_uniform_per_bin():
    g = _gen(3)
    draws = torch.stack([stratified_timesteps(4, T=1000, generator=g) for _ in range(4000)])
    within = draws - torch.arange(4) * 250.0
    assert abs(float(within.mean()) - 125.0) < 3.0


def test_stratified_ratios_disjoint_groups():
    r = stratified_ratios(16, groups=4, r_min=0.3, r_max=0.9, generator=_gen(0))
    assert r.shape == (16,) and r.dtype == torch.float32
    groups = r.reshape(4, 4)
    assert bool((groups == groups[:, :1]).all())  # one ratio per group
    for gi in range(4):
        lo, hi = 0.3 + 0.15 * gi, 0.3 + 0.15 * (gi + 1)
        assert lo <= float(groups[gi, 0]) < hi + 1e-7
    r = stratified_ratios(10, groups=3, generator=_gen(1))
    assert [int((r == v).sum()) for v in torch.unique_consecutive(r)] == [4, 3, 3]
    assert bool(((r >= 0.3) & (r <= 0.9)).all())
    with pytest.raises(ConfigError):
        stratified_ratios(2, groups=4)
    with pytest.raises(ConfigError):
        stratified_ratios(8, r_min=0.9, r_max=0.3)


# ------------------------------------------------------------------------------------------- LUT
def test_quantize_lut_recovers_piecewise_constant_phases_and_exact_k():
    n_tokens = 4096
    levels = torch.tensor([[0.40, 0.50, 0.90], [0.60, 0.65, 0.70], [0.80, 0.85, 0.75]])
    lut = torch.cat([levels[0].expand(20, 3), levels[1].expand(18, 3), levels[2].expand(12, 3)])
    phases = quantize_lut(lut, n_tokens, 3, layers=[1, 2, 5])
    assert [(p.start, p.stop) for p in phases] == [(0, 20), (20, 38), (38, 50)]
    for p, lvl in zip(phases, levels):
        assert p.keep_ratios == pytest.approx(lvl.double().tolist(), abs=1e-6)
        assert p.k == tuple(math.floor(n_tokens * v) for v in p.keep_ratios)
        assert p.k == tuple(static_k(n_tokens, v) for v in p.keep_ratios)
        config = ShivaConfig(p.to_keep_ratios(6))
        assert config.keep_ratios[0] is None and config.routed_blocks == (1, 2, 5)
        assert block_budgets(config, n_tokens) == dict(zip((1, 2, 5), p.k))


def test_quantize_lut_phase_means_cover_and_validate():
    g = _gen(9)
    policy = _randomised(RatioPolicy(num_layers=24, target=0.6), seed=4).eval()
    steps = torch.linspace(1000, 20, 28)
    lut = policy.lut(steps, range(1, 24))
    for n_phase in (1, 2, 3, 4):
        phases = quantize_lut(lut, 1024, n_phase)
        assert len(phases) == n_phase
        assert phases[0].start == 0 and phases[-1].stop == 28
        assert all(a.stop == b.start and a.stop > a.start for a, b in zip(phases, phases[1:]))
        for p in phases:
            want = lut[p.start : p.stop].double().mean(0)
            assert p.keep_ratios == pytest.approx(want.tolist(), abs=1e-12)
            assert p.k == tuple(max(1, math.floor(1024 * v)) for v in p.keep_ratios) and len(p.k) == 23
    one = quantize_lut(lut, 1024, 1)[0]
    assert one.keep_ratios == pytest.approx(lut.double().mean(0).tolist(), abs=1e-12)
    tiny = quantize_lut(torch.full((3, 2), 1e-4), 100, 1)[0]
    assert tiny.k == (1, 1)  # floor(N * keep) = 0 -> at least one token
    for bad in (0, 5):
        with pytest.raises(ConfigError):
            quantize_lut(lut, 1024, bad)
    with pytest.raises(ConfigError):
        quantize_lut(lut[:2], 1024, 3)
    with pytest.raises(ShapeError):
        quantize_lut(lut[0], 1024, 1)
    with pytest.raises(ConfigError):
        quantize_lut(lut, 1024, 2, layers=[1, 2])
    with pytest.raises(ConfigError):
        quantize_lut(torch.rand(4, 3, generator=g) + 1.0, 1024, 2)
