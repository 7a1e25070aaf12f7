"""Residual-based differentiable top-k: hard forward == inference top-k, surrogate gradients, memory, App. A.3."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from shiva_export.errors import ConfigError, ShapeError
from shiva_export.prune.topk import gather_tokens, scatter_tokens, select_topk, static_k
from shiva_export.train.ste import (
    DifferentiableTopK,
    TemperatureSchedule,
    gather_with_ste,
    inclusion_probability,
    route_with_ste,
    scatter_with_ste,
    soft_rank,
    soft_rank_reference,
)


@pytest.fixture
def one_thread():
    """Small-tensor loops are dominated by thread-pool overhead on a shared CPU: run them on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _block(d: int, seed: int = 0):
    lin = torch.nn.Linear(d, d)
    with torch.no_grad():
        g = _gen(seed)
        lin.weight.copy_(torch.randn(d, d, generator=g) / d**0.5)
        lin.bias.copy_(torch.randn(d, generator=g))
    return lambda z: z + torch.nn.functional.gelu(lin(z.float())).to(z.dtype)


# ------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize(
    ("n", "keep"), [(n, r) for n in (7, 100, 1024) for r in (0.05, 0.3, 0.6, 0.999, 1.0)] + [(4096, 0.6), (4096, 0.95)]
)
@pytest.mark.parametrize("train", (False, True))
def test_forward_indices_equal_select_topk(n, keep, train):
    scores = torch.randn(3, n, generator=_gen(n))
    topk = DifferentiableTopK().train(train)
    keep_t = torch.tensor(keep, requires_grad=True)
    sel = topk.select(scores, keep_t, generator=_gen(1))
    k = static_k(n, max(keep, 1 / n))
    assert sel.k == k == math.floor(n * keep) or (k == 1 and math.floor(n * keep) == 0)
    assert torch.equal(sel.indices, select_topk(scores, k))
    assert sel.indices.shape == (3, k) and sel.rejected.shape == (3, n - k)
    both = torch.sort(torch.cat([sel.indices, sel.rejected], dim=1), dim=1).values
    assert torch.equal(both, torch.arange(n).expand(3, n))
    assert bool((sel.rejected[:, 1:] > sel.rejected[:, :-1]).all())
    assert torch.equal(sel.pi_sel, torch.gather(sel.pi, 1, sel.indices))
    assert torch.equal(sel.pi_rej, torch.gather(sel.pi, 1, sel.rejected))


def test_forward_ties_cfg_and_selection_modes():
    g = _gen(3)
    ties = torch.randint(0, 3, (4, 300), generator=g).float()  # heavy ties: lower position wins
    topk = DifferentiableTopK().train()
    for sel_mode in ("bounded", "topk"):
        topk.selection = sel_mode
        for cfg in (False, True):
            sel = topk.select(ties, 0.4, cfg=cfg, generator=g)
            assert torch.equal(sel.indices, select_topk(ties, 120, cfg=cfg, selection=sel_mode))
    sel = topk.select(ties, 0.4, cfg=True)
    assert torch.equal(sel.indices[:2], sel.indices[2:]) and torch.equal(sel.pi[:2], sel.pi[2:])


def test_k_is_floor_of_keep_and_invalid_inputs():
    s = torch.randn(1, 4096)
    topk = DifferentiableTopK()
    assert topk.select(s, torch.tensor(0.60001)).k == 2457  # floor(4096 * 0.60001) = floor(2457.64)
    assert topk.select(s, 0.6).k == static_k(4096, 0.6) == 2457
    assert topk.select(s, 1e-6).k == 1  # a noisy policy may ask for < 1 token: clamp to 1
    for bad in (0.0, -0.1, 1.01, float("nan"), torch.tensor([0.5, 0.5])):
        with pytest.raises(ConfigError):
            topk.select(s, bad)
    with pytest.raises(ShapeError):
        topk.select(torch.randn(1, 3, 4), 0.5)
    with pytest.raises(ShapeError):
        topk.select(torch.randn(3, 10), 0.5, cfg=True)
    with pytest.raises(ConfigError):
        DifferentiableTopK(tau_rank=0.0)
    with pytest.raises(ConfigError):
        DifferentiableTopK(noise_std=-1.0)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
@pytest.mark.parametrize("cfg", (False, True))
def test_ste_routing_forward_is_bit_identical_to_hard_routing(dtype, cfg):
    b, n, d = 4, 257, 24
    g = _gen(5)
    x = torch.randn(b, n, d, generator=g).to(dtype).requires_grad_(True)
    scores = torch.randn(b, n, generator=g, requires_grad=True)
    keep = torch.tensor(0.37, requires_grad=True)
    block = _block(d)
    sel = DifferentiableTopK().train().select(scores, keep, cfg=cfg, generator=g)
    got = route_with_ste(x, sel, block)
    want = scatter_tokens(x, sel.indices, block(gather_tokens(x, sel.indices)))
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(gather_with_ste(x, sel), gather_tokens(x, sel.indices))
    assert torch.equal(scatter_with_ste(x, sel, gather_tokens(x, sel.indices)), x)
    with pytest.raises(ShapeError):
        scatter_with_ste(x, sel, x)


# ------------------------------------------------------------------------------------------ backward
def test_residual_ste_gives_the_paper_inner_products():
    """dL/dpi_i = <grad_sel_i, x_i> (selected), -<grad_rej_i, x_i> (rejected)  (Eq. 7 / App. A.2)."""
    b, n, d = 2, 40, 8
    g = _gen(7)
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    scores = torch.randn(b, n, generator=g, dtype=torch.float64)
    w = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    block = lambda z: z + torch.tanh(z @ torch.ones(d, d, dtype=z.dtype) / d)  # noqa: E731
    loss_fn = lambda y: (w * y).sum() + (y**2).sum()  # noqa: E731

    sel = DifferentiableTopK().eval().select(scores, 0.45)
    pi = sel.pi.detach().requires_grad_(True)
    sel_leaf = type(sel)(
        sel.indices, sel.rejected, pi, pi.gather(1, sel.indices), pi.gather(1, sel.rejected), sel.k, sel.k_soft
    )
    (grad_pi,) = torch.autograd.grad(loss_fn(route_with_ste(x, sel_leaf, block)), pi)

    # Hard path gradients: w.r.t. the block input of selected tokens and the output of rejected ones.
    x_in = gather_tokens(x, sel.indices).requires_grad_(True)
    passthrough = x.clone().requires_grad_(True)
    out = scatter_tokens(passthrough, sel.indices, block(x_in))
    g_in, g_out = torch.autograd.grad(loss_fn(out), (x_in, passthrough))
    want = torch.empty(b, n, dtype=torch.float64)
    want.scatter_(1, sel.indices, (g_in * gather_tokens(x, sel.indices)).sum(-1))
    want.scatter_(1, sel.rejected, -(gather_tokens(g_out, sel.rejected) * gather_tokens(x, sel.rejected)).sum(-1))
    torch.testing.assert_close(grad_pi, want, rtol=1e-12, atol=1e-12)


def test_gradients_reach_scores_and_k():
    g = _gen(11)
    scores = torch.randn(2, 64, generator=g, requires_grad=True)
    keep = torch.tensor(0.5, requires_grad=True)
    sel = DifferentiableTopK().train().select(scores, keep, generator=g)
    (dpi_dk,) = torch.autograd.grad(sel.pi.sum(), keep, retain_graph=True)
    jac = torch.autograd.functional.jacobian(
        lambda kk: inclusion_probability(soft_rank(scores.detach(), 0.2), kk * 64, 0.1), keep.detach()
    )
    assert float(dpi_dk) > 0 and bool((jac > 0).all())  # d pi_i / d k > 0 for every token
    x = torch.randn(2, 64, 5, generator=g)
    out = route_with_ste(x, sel, lambda z: 0.5 * z)
    out.square().sum().backward()
    assert keep.grad is not None and float(keep.grad) != 0.0
    assert scores.grad is not None and float(scores.grad.abs().sum()) > 0
    # Ranks depend on score differences only: the score gradient sums to zero per row.
    torch.testing.assert_close(scores.grad.sum(1), torch.zeros(2), atol=1e-4, rtol=0)


def test_noise_only_in_training_and_explore():
    s = torch.randn(1, 50, generator=_gen(2))
    topk = DifferentiableTopK(noise_std=0.5)
    a, b = topk.train().select(s, 0.5, generator=_gen(1)), topk.select(s, 0.5, generator=_gen(2))
    assert not torch.equal(a.pi, b.pi) and torch.equal(a.indices, b.indices)
    c, d = topk.eval().select(s, 0.5, generator=_gen(1)), topk.select(s, 0.5, generator=_gen(2))
    assert torch.equal(c.pi, d.pi)
    torch.testing.assert_close(c.pi, inclusion_probability(soft_rank_reference(s, 0.2), 25.0, 0.1))
    explore = DifferentiableTopK(noise_std=0.5, explore=True).train()
    e = explore.select(s, 0.5, generator=_gen(4))
    noisy = s + 0.5 * torch.randn(s.shape, generator=_gen(4))
    assert torch.equal(e.indices, select_topk(noisy, 25))


# ------------------------------------------------------------------------------------------ soft rank
def test_soft_rank_chunked_equals_unchunked_n256():
    g = _gen(13)
    s = torch.randn(3, 256, generator=g, dtype=torch.float64)
    w = torch.randn(3, 256, generator=g, dtype=torch.float64)
    ref_in = s.clone().requires_grad_(True)
    ref = soft_rank_reference(ref_in, 0.2)
    (ref_g,) = torch.autograd.grad((w * ref).sum(), ref_in)
    for chunk in (1, 16, 37, 256, None):
        s_in = s.clone().requires_grad_(True)
        r = soft_rank(s_in, 0.2, chunk_size=chunk)
        (gr,) = torch.autograd.grad((w * r).sum(), s_in)
        torch.testing.assert_close(r, ref, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(gr, ref_g, rtol=1e-10, atol=1e-10)


def test_soft_rank_gradcheck_and_orientation():
    s = torch.randn(2, 7, generator=_gen(17), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: soft_rank(t, 0.3, chunk_size=3), (s,))
    r = soft_rank(torch.tensor([[5.0, 0.0, -5.0]]), 0.2)
    torch.testing.assert_close(r, torch.tensor([[1.0, 2.0, 3.0]]), atol=1e-9, rtol=0)  # descending rank


class _PeakNumel(TorchDispatchMode):
    """Largest tensor produced by any aten op (forward and autograd backward) while active."""

    def __init__(self):
        super().__init__()
        self.peak, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.peak:
                self.peak, self.op = t.numel(), str(func)
        return out


def test_n4096_never_materialises_n_by_n(one_thread):
    n, d, chunk = 4096, 64, 256
    g = _gen(19)
    scores = torch.randn(1, n, generator=g, requires_grad=True)
    x = torch.randn(1, n, d, generator=g, requires_grad=True)
    keep = torch.tensor(0.6, requires_grad=True)
    topk = DifferentiableTopK(chunk_size=chunk).train()
    with _PeakNumel() as peak:
        sel = topk.select(scores, keep, generator=g)
        out = route_with_ste(x, sel, lambda z: z - 0.5 * torch.tanh(z))
        out.square().mean().backward()
    assert peak.peak <= max(chunk * n, n * d), (peak.peak, peak.op)  # [chunk, N] scalar blocks at most
    assert peak.peak < n * n
    assert keep.grad is not None and torch.isfinite(scores.grad).all() and float(scores.grad.abs().sum()) > 0
    # The default chunk also bounds the block (4 Mi scalars) and gives the same ranks as chunk=256.
    s = scores.detach().double()
    r = soft_rank(s, 0.2)
    torch.testing.assert_close(r, soft_rank(s, 0.2, chunk_size=chunk), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(r.sum(), torch.tensor(n * (n + 1) / 2, dtype=torch.float64), rtol=1e-12, atol=1e-6)


# ------------------------------------------------------------------------------------------ gradient sign
def _toy(sign: float):
    """N=6, D=4: two high-energy 'signal' tokens (1, 4), k=2 keeps signal 1 and noise 2, rejects signal 4.

    Dense block ``z + sign * g(z) z`` with ``g = relu(|z|/sqrt(D) - 3) / (|z|/sqrt(D))``: identity on
    low-energy tokens; attenuates (sign=-1) or amplifies (sign=+1) high-energy ones. Loss: squared
    distance to the dense block's output (distillation).
    """
    n, d = 6, 4
    x = torch.randn(1, n, d, generator=_gen(0), dtype=torch.float64)
    x[0, [1, 4]] += 10.0

    def block(z):
        e = z.norm(dim=-1, keepdim=True) / d**0.5
        return z + sign * torch.relu(e - 3.0) / e * z

    scores = torch.tensor([[0.0, 2.0, 1.0, -1.0, 0.5, -0.5]], dtype=torch.float64)
    return x, block, block(x), scores, 2.5 / n  # k = floor(2.5) = 2, k_soft = 2.5


def _ste_and_fd(sign: float):
    x, block, target, s0, keep0 = _toy(sign)
    topk = DifferentiableTopK().eval()
    s = s0.clone().requires_grad_(True)
    keep = torch.tensor(keep0, dtype=torch.float64, requires_grad=True)
    sel = topk.select(s, keep)
    assert sel.indices.tolist() == [[1, 2]]
    ((route_with_ste(x, sel, block) - target) ** 2).sum().backward()
    ste = torch.cat([s.grad[0], keep.grad.reshape(1)])

    # Expected loss under the soft relaxation: token i runs the block with probability pi_i.
    loss_sel = ((block(x) - target) ** 2).sum(-1)[0]  # 0: the selected path reproduces the teacher
    loss_rej = ((x - target) ** 2).sum(-1)[0]

    def expected(s_, k_):
        pi = topk.select(s_, k_).pi[0]
        return float((pi * loss_sel + (1 - pi) * loss_rej).sum())

    h, fd = 1e-6, []
    for m in range(6):
        e = torch.zeros_like(s0)
        e[0, m] = h
        fd.append((expected(s0 + e, keep0) - expected(s0 - e, keep0)) / (2 * h))
    fd.append((expected(s0, keep0 + h) - expected(s0, keep0 - h)) / (2 * h))
    return ste, torch.tensor(fd, dtype=torch.float64)


def test_surrogate_gradient_sign_matches_finite_difference():
    ste, fd = _ste_and_fd(sign=-1.0)
    # k: more budget helps (the rejected signal token gets in). s4 (rejected signal): raise it.
    # s2 (selected noise, in the way) and s0 / s5 (rejected noise ranked just below s4): lower them.
    for i in (0, 2, 4, 5, 6):
        assert math.copysign(1, ste[i]) == math.copysign(1, fd[i]) and abs(fd[i]) > 1e-3 * fd.abs().max(), (i, ste, fd)
    assert ste[6] < 0 and ste[4] < 0 and ste[2] > 0
    assert float(ste @ fd / (ste.norm() * fd.norm())) > 0.99


def test_surrogate_gradient_sign_flips_when_block_update_aligns_with_input():
    """Documented limitation: a rejected token's STE term -<dL/dy, x> points the wrong way here."""
    ste, fd = _ste_and_fd(sign=+1.0)
    assert ste[6] > 0 > fd[6] and ste[4] > 0 > fd[4]
    assert float(ste @ fd / (ste.norm() * fd.norm())) < -0.99


# ------------------------------------------------------------------------------------------ App. A.3
def test_synthetic_budget_and_router_learning(one_thread):
    """Paper App. A.3: N=100, D=16, 20 signal tokens (mean 10), 80 noise (mean 0); k starts at 50.

    Router: linear, Adam lr 0.1. Budget: the learnable k (token units, fed as keep = k / N), SGD lr 2.0,
    frozen for 100 warm-up steps, then 700 adaptation steps. Loss per batch:

    * task: distillation to the dense block, mean over tokens of the per-token squared L2 error;
      the dense block is identity on low-energy tokens and attenuates high-energy ones, so only
      signal tokens need the block and noise tokens are neutral (nothing in the loss names k* = 20);
    * sparsity: ``lam * k`` with lam = 0.1, i.e. lam per kept token (``lam * N * keep``).

    k must come down from 50 under the penalty alone and stop where dropping signal tokens starts to
    cost: the equilibrium is found by the estimator's gradient to k, not by a hard-coded target.
    """
    n, d, n_sig, batch = 100, 16, 20, 8
    g = _gen(1234)

    def sample(bsz):
        x = torch.randn(bsz, n, d, generator=g)
        order = torch.argsort(torch.rand(bsz, n, generator=g), dim=1)
        sig = torch.zeros(bsz, n, dtype=torch.bool).scatter_(1, order[:, :n_sig], True)
        return x + 10.0 * sig.unsqueeze(-1), sig

    def block(z):
        e = z.norm(dim=-1, keepdim=True) / d**0.5
        return z - torch.relu(e - 3.0) / e * z

    router = torch.nn.Linear(d, 1)
    with torch.no_grad():
        router.weight.copy_(torch.randn(1, d, generator=g) / d**0.5)
        router.bias.zero_()
    k_param = torch.nn.Parameter(torch.tensor(50.0))
    opt_router = torch.optim.Adam(router.parameters(), lr=0.1)
    opt_k = torch.optim.SGD([k_param], lr=2.0)
    topk = DifferentiableTopK(tau_rank=0.2, tau_sel=0.1).train()
    lam, warmup, adapt = 0.1, 100, 700

    history = []
    for step in range(warmup + adapt):
        x, _ = sample(batch)
        with torch.no_grad():
            target = block(x)
        keep = (k_param / n).clamp(1.0 / n, 1.0)
        sel = topk.select(router(x).squeeze(-1), keep, generator=g)
        task = ((route_with_ste(x, sel, block) - target) ** 2).sum(-1).mean()
        loss = task + lam * k_param
        opt_router.zero_grad()
        opt_k.zero_grad()
        loss.backward()
        opt_router.step()
        if step >= warmup:
            opt_k.step()
        history.append(float(k_param.detach()))

    assert history[warmup - 1] == 50.0  # frozen during warm-up
    assert min(history[warmup : warmup + 100]) < 40  # the penalty drives k down ...
    k_final = float(k_param.detach())
    assert 16.0 <= k_final <= 24.0, history[-20:]  # ... and the task gradient stops it near k* = 20
    x, sig = sample(64)
    with torch.no_grad():
        sel = topk.eval().select(router(x).squeeze(-1), k_final / n)
    kept = float(torch.gather(sig, 1, sel.indices).sum()) / float(sig.sum())
    assert kept >= 0.9, (k_final, kept)


# ------------------------------------------------------------------------------------------ annealing
def test_temperature_schedule_linear_cosine_hold_and_apply():
    lin = TemperatureSchedule(total_steps=100, shape="linear")
    assert lin(0) == (0.2, 0.1)
    assert lin(50) == pytest.approx((0.125, 0.0625))
    assert lin(100) == pytest.approx((0.05, 0.025)) and lin(10_000) == pytest.approx((0.05, 0.025))
    cos = TemperatureSchedule(total_steps=100, tau_rank_end=0.1, tau_sel_end=0.05, hold_steps=10)
    assert cos(5) == (0.2, 0.1) and cos(10) == (0.2, 0.1)
    assert cos(60) == pytest.approx((0.15, 0.075))  # cosine midpoint = linear midpoint
    assert cos(35) > lin(25)  # cosine starts slower than linear
    taus = [cos(s) for s in range(0, 130)]
    assert all(a[0] >= b[0] and a[1] >= b[1] for a, b in zip(taus, taus[1:]))  # monotone decay
    topk = DifferentiableTopK()
    assert cos.apply(topk, 110) == pytest.approx((0.1, 0.05))
    assert (topk.tau_rank, topk.tau_sel) == pytest.approx((0.1, 0.05))
    for bad in (dict(shape="exp"), dict(total_steps=0), dict(tau_sel_end=0.0), dict(hold_steps=-1)):
        with pytest.raises(ConfigError):
            TemperatureSchedule(**{"total_steps": 10, **bad})
