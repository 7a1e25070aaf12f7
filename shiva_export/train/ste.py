"""Residual-based differentiable top-k (paper Sec. 2.1, App. A.1-A.3, App. B.2).

Forward (training and inference alike): the hard, static top-k of
:func:`shiva_export.prune.topk.select_topk` -- exactly ``k = floor(N * keep)`` tokens, the same
ascending indices, so a model trained through this module runs unchanged through the exported graph.

Backward (training only) goes through a surrogate built from *scalar* scores:

1. ``s~ = s + eps``, ``eps ~ N(0, noise_std^2)`` (only in ``train()`` mode).
2. Soft descending rank ``r_i = 1 + sum_{j != i} sigmoid((s~_j - s~_i) / tau_rank)`` (Algorithm 1). It is
   ``O(N^2)`` in scalars, never ``O(N^2 D)``: :func:`soft_rank` is a custom autograd function that walks
   row blocks of ``[B, chunk, N]`` in forward *and* backward and saves only ``s~`` ([B, N]) for the
   backward, so peak memory is ``O(B * chunk * N)`` whatever N.
3. Inclusion probability ``pi_i = sigmoid((k - r_i) / (tau_sel * N))`` with the continuous
   ``k = N * keep`` (App. B.2, Eq. 30). ``d pi_i / d k > 0`` and ``d pi_i / d s`` are both non-zero.
4. Residual straight-through estimator (Eq. 7/23): the gathered selected inputs are multiplied by
   ``1 + pi - sg(pi)`` and the pass-through (rejected) tokens by ``1 - (pi - sg(pi))``. Both factors are
   exactly ``1.0`` in the forward pass (bit-identical outputs), and the backward gives
   ``dL/dpi_i = <dL/dx_sel_i, x_i>`` for a selected token and ``-<dL/dy_rej_i, x_i>`` for a rejected one.
   The gradient then reaches the router scores through ``pi(r(s~))`` and the budget through
   ``dL/dk = sum_i dL/dpi_i * dpi_i/dk`` (Eq. 24).

Example:
    >>> topk = DifferentiableTopK()                       # tau_rank=0.2, tau_sel=0.1, noise_std=0.1
    >>> keep = torch.tensor(0.6, requires_grad=True)
    >>> sel = topk.select(scores, keep)                   # scores: [B, N] from the router
    >>> out = route_with_ste(x, sel, block)               # x: [B, N, D]; block: [B, k, D] -> [B, k, D]
    >>> loss(out).backward()                              # grads reach the router and ``keep``

Caveat found while validating the estimator (see ``tests/test_train_ste.py``): for a rejected token the
estimator keeps only ``-<dL/dy, x>`` ("would a larger pass-through help?"). It agrees in sign with the
exact input-gating surrogate when the block's update on that token points against ``x`` (or, for a
selected token, whenever the selected path already reproduces the target); for a block whose update
is aligned with ``x`` it has the wrong sign. Score noise and ratio sampling do not change that.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from shiva_export.errors import ConfigError, ShapeError
from shiva_export.logging import get_logger
from shiva_export.prune.topk import SELECTIONS, gather_tokens, scatter_tokens, select_topk, static_k

__all__ = [
    "DEFAULT_NOISE_STD",
    "DEFAULT_MAX_BLOCK_ELEMENTS",
    "Selection",
    "DifferentiableTopK",
    "TemperatureSchedule",
    "soft_rank",
    "soft_rank_reference",
    "inclusion_probability",
    "gather_with_ste",
    "scatter_with_ste",
    "route_with_ste",
    "route_output_gated",
    "ESTIMATORS",
]

#: Gradient estimators of the routing: the paper's residual STE and the output-gated one (the default).
ESTIMATORS = ("output-gated", "residual")

logger = get_logger(__name__)

#: Default score-noise sigma. The paper does not give one. Router scores are ``w^T LayerNorm(...)``,
#: i.e. O(1); 0.1 is half the initial rank temperature, so the noise only reorders near-ties in the
#: surrogate and never swamps the ranking itself.
DEFAULT_NOISE_STD = 0.1

#: Default element budget of one ``[B, chunk, N]`` block of the soft rank (4 Mi scalars = 16 MiB fp32).
DEFAULT_MAX_BLOCK_ELEMENTS = 1 << 22


# ------------------------------------------------------------------------------------------- soft rank
def _row_chunk(batch: int, n: int, chunk_size: int | None) -> int:
    if chunk_size is None:
        return max(1, min(n, DEFAULT_MAX_BLOCK_ELEMENTS // max(1, batch * n)))
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(
            f"soft-rank chunk_size is {chunk_size!r}; expected an int >= 1. Pass a positive row count or None."
        )
    return min(chunk_size, n)


class _SoftRank(torch.autograd.Function):
    """``r_i = 1 + sum_{j != i} sigmoid((s_j - s_i) / tau)`` computed and differentiated in row blocks."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, tau: float, chunk: int) -> torch.Tensor:
        n = s.shape[1]
        r = torch.empty_like(s)
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            blk = (s[:, None, :] - s[:, a:b, None]).div_(tau).sigmoid_()  # [B, c, N]; row i, column j
            # sigmoid(0) = 0.5 exactly on the diagonal: 1 + (row sum - 0.5).
            r[:, a:b] = blk.sum(dim=2).add_(0.5)
        ctx.save_for_backward(s)
        ctx.tau = tau
        ctx.chunk = chunk
        return r

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_r: torch.Tensor):
        (s,) = ctx.saved_tensors
        tau, chunk = ctx.tau, ctx.chunk
        n = s.shape[1]
        grad_r = grad_r.to(s.dtype)
        grad_s = torch.zeros_like(s)
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            sig = (s[:, None, :] - s[:, a:b, None]).div_(tau).sigmoid_()
            p = sig.mul_(1.0 - sig)  # sigmoid'(d_ij), [B, c, N]
            g = grad_r[:, a:b]  # [B, c]
            # d r_i / d s_j = p_ij / tau (j != i); d r_i / d s_i = -sum_{j != i} p_ij / tau. The diagonal
            # p_ii = 0.25 enters both terms with opposite signs and cancels.
            grad_s += torch.bmm(g.unsqueeze(1), p).squeeze(1)
            grad_s[:, a:b] -= g * p.sum(dim=2)
        return grad_s.div_(tau), None, None


def soft_rank(scores: torch.Tensor, tau_rank: float, chunk_size: int | None = None) -> torch.Tensor:
    """Soft descending rank from pairwise sigmoids (Algorithm 1), memory-bounded.

    ``r_i = 1 + sum_{j != i} sigmoid((s_j - s_i) / tau_rank)``: about 1 for the highest score, about N
    for the lowest. Only ``[B, chunk, N]`` scalar blocks are ever materialised, in forward and backward.

    Args:
        scores (torch.Tensor): ``[B, N]`` floating-point scores.
        tau_rank (float): Rank temperature, > 0.
        chunk_size (int | None): Rows per block. Defaults to ``DEFAULT_MAX_BLOCK_ELEMENTS // (B * N)``.

    Returns:
        torch.Tensor: ``[B, N]`` soft ranks in ``scores``' dtype.
    """
    _check_scores(scores)
    _check_positive("tau_rank", tau_rank)
    chunk = _row_chunk(int(scores.shape[0]), int(scores.shape[1]), chunk_size)
    return _SoftRank.apply(scores, float(tau_rank), chunk)


def soft_rank_reference(scores: torch.Tensor, tau_rank: float) -> torch.Tensor:
    """Unchunked plain-autograd soft rank (test oracle; materialises ``[B, N, N]``)."""
    d = (scores[:, None, :] - scores[:, :, None]) / tau_rank
    off = ~torch.eye(scores.shape[1], dtype=torch.bool, device=scores.device)
    return 1.0 + (torch.sigmoid(d) * off).sum(dim=2)


def inclusion_probability(ranks: torch.Tensor, k: torch.Tensor | float, tau_sel: float) -> torch.Tensor:
    """``pi_i = sigmoid((k - r_i) / (tau_sel * N))`` (App. B.2, Eq. 30).

    Args:
        ranks (torch.Tensor): ``[B, N]`` soft ranks.
        k (torch.Tensor | float): Continuous budget ``N * keep`` (a tensor keeps its gradient).
        tau_sel (float): Selection temperature, > 0; scaled by N so the gradient scale does not
            depend on the resolution.
    """
    _check_positive("tau_sel", tau_sel)
    n = int(ranks.shape[1])
    return torch.sigmoid((k - ranks) / (tau_sel * n))


# ------------------------------------------------------------------------------------------- selection
@dataclass(frozen=True)
class Selection:
    """One block's hard selection plus the surrogate inclusion probabilities.

    Attributes:
        indices (torch.Tensor): ``[B, k]`` int64 kept positions, ascending (== ``select_topk``).
        rejected (torch.Tensor): ``[B, N - k]`` int64 rejected positions, ascending.
        pi (torch.Tensor): ``[B, N]`` inclusion probabilities (differentiable; float32 or float64).
        pi_sel (torch.Tensor): ``[B, k]`` ``pi`` at ``indices``.
        pi_rej (torch.Tensor): ``[B, N - k]`` ``pi`` at ``rejected``.
        k (int): Static budget used by the forward, ``floor(N * keep)`` clamped to ``[1, N]``.
        k_soft (torch.Tensor): Continuous budget ``N * keep`` (carries the gradient to ``keep``).
    """

    indices: torch.Tensor
    rejected: torch.Tensor
    pi: torch.Tensor
    pi_sel: torch.Tensor
    pi_rej: torch.Tensor
    k: int
    k_soft: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.pi.shape[1])


class DifferentiableTopK(nn.Module):
    """Hard top-k forward, residual-STE backward (paper Sec. 2.1). Holds no parameters.

    Score noise is added only in ``train()`` mode; in ``eval()`` the surrogate is deterministic.

    Args:
        tau_rank (float): Soft-rank temperature. Defaults to 0.2 (paper's start value).
        tau_sel (float): Selection temperature (multiplied by N). Defaults to 0.1 (paper's start value).
        noise_std (float): Sigma of the Gaussian score noise of the surrogate. The paper gives none;
            defaults to :data:`DEFAULT_NOISE_STD` (0.1).
        chunk_size (int | None): Rows per soft-rank block. Defaults to an automatic size with at most
            :data:`DEFAULT_MAX_BLOCK_ELEMENTS` scalars per block.
        selection (str): Forward top-k implementation, passed to ``select_topk``. Defaults to ``"bounded"``.
        explore (bool): Select the forward top-k on the *noisy* scores in training mode (the paper's
            Monte Carlo argument needs tokens near the boundary to be sometimes selected, sometimes
            not). The forward is then ``select_topk(s + eps, k)``. Defaults to False: the forward is
            ``select_topk(s, k)``, exactly as at inference, and the noise lives only in the surrogate.
    """

    def __init__(
        self,
        tau_rank: float = 0.2,
        tau_sel: float = 0.1,
        noise_std: float = DEFAULT_NOISE_STD,
        chunk_size: int | None = None,
        selection: str = "bounded",
        explore: bool = False,
    ):
        super().__init__()
        _check_positive("tau_rank", tau_rank)
        _check_positive("tau_sel", tau_sel)
        if not (isinstance(noise_std, (int, float)) and math.isfinite(noise_std) and noise_std >= 0):
            raise ConfigError(
                f"noise_std is {noise_std!r}; expected a finite float >= 0. Use 0 to disable score noise."
            )
        if selection not in SELECTIONS:
            raise ConfigError(f"selection {selection!r} is unknown; choose one of {SELECTIONS}.")
        if chunk_size is not None:
            _row_chunk(1, 1, chunk_size)
        self.tau_rank = float(tau_rank)
        self.tau_sel = float(tau_sel)
        self.noise_std = float(noise_std)
        self.chunk_size = chunk_size
        self.selection = selection
        self.explore = bool(explore)

    def extra_repr(self) -> str:
        return f"tau_rank={self.tau_rank:g}, tau_sel={self.tau_sel:g}, noise_std={self.noise_std:g}, explore={self.explore}"

    def set_temperatures(self, tau_rank: float, tau_sel: float) -> None:
        """Sets both temperatures (see :class:`TemperatureSchedule`)."""
        _check_positive("tau_rank", tau_rank)
        _check_positive("tau_sel", tau_sel)
        self.tau_rank, self.tau_sel = float(tau_rank), float(tau_sel)

    def select(
        self,
        scores: torch.Tensor,
        keep_ratio: float | torch.Tensor,
        cfg: bool = False,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> Selection:
        """Hard top-k selection with differentiable inclusion probabilities.

        Args:
            scores (torch.Tensor): ``[B, N]`` router scores.
            keep_ratio (float | torch.Tensor): Keep ratio in (0, 1]; a 1-element tensor may require
                grad (e.g. the ratio policy's output). The forward uses ``k = floor(N * keep)``
                (clamped to at least 1, since a noisy policy may ask for fewer than one token); the
                surrogate uses the continuous ``N * keep``.
            cfg (bool): The batch is ``[uncond; cond]``: both halves share indices selected on
                ``max(s_uncond, s_cond)`` (paper Sec. 2.5), and share ``pi``. Defaults to False.
            generator (torch.Generator | None): RNG of the score noise. Defaults to torch's global RNG.
            noise (torch.Tensor | None): Standard-normal score noise to use instead of drawing it (shaped
                like the selection's scores; distributed training derives it per global sample). Defaults to None.

        Returns:
            Selection: Indices, inclusion probabilities and budgets.

        Raises:
            ShapeError: ``scores`` is not a ``[B, N]`` floating tensor (B even with ``cfg``).
            ConfigError: ``keep_ratio`` is not a finite value in (0, 1].
        """
        _check_scores(scores)
        if cfg and scores.shape[0] % 2:
            raise ShapeError(
                f"cfg batch size is {scores.shape[0]}; expected an even [uncond; cond] batch. Pass cfg=False or double the batch."
            )
        n = int(scores.shape[1])
        keep_f, keep_t = _keep(keep_ratio, scores)
        # static_k's floor (with its round-off guard), but at least one token: floor(n * (1/n)) == 1.
        k = static_k(n, max(keep_f, 1.0 / n))

        s = scores
        if cfg:
            half = s.shape[0] // 2
            s = torch.maximum(s[:half], s[half:])
        work = s.float() if s.dtype in (torch.float16, torch.bfloat16) else s
        if self.training and self.noise_std > 0:
            if noise is not None:
                if tuple(noise.shape) != tuple(work.shape):
                    raise ShapeError(f"score noise shape is {tuple(noise.shape)}; expected {tuple(work.shape)}.")
                eps = noise.to(dtype=work.dtype, device=work.device)
            else:
                eps = torch.randn(work.shape, generator=generator, dtype=work.dtype, device=work.device)
            work = work + self.noise_std * eps
        hard_scores = work.detach() if (self.training and self.explore) else s.detach()
        idx = select_topk(hard_scores, k, selection=self.selection)
        rej = _complement(idx, n)
        k_soft = keep_t * n
        pi = inclusion_probability(soft_rank(work, self.tau_rank, self.chunk_size), k_soft, self.tau_sel)
        if cfg:
            idx, rej, pi = (torch.cat([t, t], dim=0) for t in (idx, rej, pi))
        return Selection(
            indices=idx,
            rejected=rej,
            pi=pi,
            pi_sel=torch.gather(pi, 1, idx),
            pi_rej=torch.gather(pi, 1, rej),
            k=k,
            k_soft=k_soft,
        )

    def forward(self, scores: torch.Tensor, keep_ratio: float | torch.Tensor, cfg: bool = False) -> Selection:
        return self.select(scores, keep_ratio, cfg=cfg)


def _complement(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Ascending positions not in ``idx`` (``[B, N - k]``)."""
    mask = torch.zeros(idx.shape[0], n, dtype=torch.int8, device=idx.device).scatter_(1, idx, 1)
    order = torch.argsort(mask, dim=1, stable=True)  # zeros (rejected) first, each group in position order
    return order[:, : n - idx.shape[1]]


# ------------------------------------------------------------------------------------------ STE routing
def _ste_factor(pi: torch.Tensor, sign: float, dtype: torch.dtype) -> torch.Tensor:
    # (pi - sg(pi)) is exactly 0.0 in the forward; 1 +- 0.0 is exactly 1.0 in every float dtype.
    return (1.0 + sign * (pi - pi.detach())).to(dtype).unsqueeze(-1)


def gather_with_ste(x: torch.Tensor, sel: Selection) -> torch.Tensor:
    """Selected tokens ``x[b, idx]`` times ``1 + pi - sg(pi)``: ``[B, k, D]``, values equal to the hard gather.

    Backward: ``dL/dpi_i = <dL/dx_sel_i, x_i>`` for every selected token (and the usual gradient to ``x``).
    """
    _check_tokens(x, sel)
    return gather_tokens(x, sel.indices) * _ste_factor(sel.pi_sel, 1.0, x.dtype)


def scatter_with_ste(x: torch.Tensor, sel: Selection, block_out: torch.Tensor) -> torch.Tensor:
    """Block outputs scattered into the pass-through ``x * (1 - (pi - sg(pi)))``: ``[B, N, D]``.

    Rejected tokens pass through unchanged in value; backward gives ``dL/dpi_i = -<dL/dy_i, x_i>`` for
    them. Selected rows are overwritten by ``block_out`` (their pass-through gets no gradient).
    """
    _check_tokens(x, sel)
    if tuple(block_out.shape) != (x.shape[0], sel.k, x.shape[2]):
        raise ShapeError(
            f"block output shape is {tuple(block_out.shape)}; expected {(x.shape[0], sel.k, x.shape[2])} ([B, k, D]). "
            "Return one row per selected token."
        )
    passthrough = x * _ste_factor(sel.pi, -1.0, x.dtype)
    return scatter_tokens(passthrough, sel.indices, block_out)


def route_with_ste(x: torch.Tensor, sel: Selection, block: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Residual routing of one block: ``block`` on the selected tokens, identity for the rest.

    Forward values equal ``scatter_tokens(x, idx, block(gather_tokens(x, idx)))`` bit for bit.

    Args:
        x (torch.Tensor): ``[B, N, D]`` block input (image tokens).
        sel (Selection): From :meth:`DifferentiableTopK.select`.
        block (Callable): Maps ``[B, k, D]`` to ``[B, k, D]`` (the block including its own residual).
    """
    return scatter_with_ste(x, sel, block(gather_with_ste(x, sel)))


def route_output_gated(
    x: torch.Tensor, sel: Selection, block: Callable[[torch.Tensor], torch.Tensor], teacher_update: torch.Tensor
) -> torch.Tensor:
    """Output-gated routing of one block: the gate ``pi`` multiplies the block's *update*, not its input.

    ``y_i = x_i + pi_i * Delta_i`` in the backward, where ``Delta_i`` is the student's own update
    ``f(x)_i - x_i`` for a selected token and the teacher's dense update at this block for a rejected one
    (already computed by the teacher pass). So ``dL/dpi_i = <dL/dy_i, Delta_i>``: "would applying more of
    this token's update help?", which has the right sign whether the update is aligned with ``x`` or not
    (the residual STE's ``-<dL/dy, x>`` for rejected tokens does not). Forward values equal
    ``scatter_tokens(x, idx, block(gather_tokens(x, idx)))`` bit for bit (the gates are ``pi - sg(pi) = 0``).
    This departs from the paper (see ``docs/training.md``).

    Args:
        x (torch.Tensor): ``[B, N, D]`` block input (image tokens).
        sel (Selection): From :meth:`DifferentiableTopK.select`.
        block (Callable): Maps ``[B, k, D]`` to ``[B, k, D]`` (the block including its own residual).
        teacher_update (torch.Tensor): ``[B, N, D]`` the teacher's dense ``f(x_t) - x_t`` at this block.
    """
    _check_tokens(x, sel)
    if tuple(teacher_update.shape) != tuple(x.shape):
        raise ShapeError(
            f"teacher update shape is {tuple(teacher_update.shape)}; expected {tuple(x.shape)} (the block input's)."
        )
    kept_in = gather_tokens(x, sel.indices)
    kept_out = block(kept_in)
    if tuple(kept_out.shape) != tuple(kept_in.shape):
        raise ShapeError(f"block output shape is {tuple(kept_out.shape)}; expected {tuple(kept_in.shape)} ([B, k, D]).")
    g_sel = (sel.pi_sel - sel.pi_sel.detach()).to(x.dtype).unsqueeze(-1)
    y_sel = kept_out + g_sel * (kept_out - kept_in).detach()
    g_all = (sel.pi - sel.pi.detach()).to(x.dtype).unsqueeze(-1)
    passthrough = x + g_all * teacher_update.detach().to(x.dtype)  # selected rows are overwritten below
    return scatter_tokens(passthrough, sel.indices, y_sel)


# ------------------------------------------------------------------------------------------ annealing
_SHAPES = ("linear", "cosine")


@dataclass(frozen=True)
class TemperatureSchedule:
    """Anneals ``tau_rank`` and ``tau_sel`` from the paper's start values to chosen end values.

    The paper gives the start values (0.2 and 0.1) and says both decay; it gives neither the end
    values nor the shape. The defaults here are a choice: end = start / 4 (0.05 and 0.025), cosine.
    At ``tau_sel = 0.025`` the inclusion window ``pi in [0.12, 0.88]`` spans ``+-0.05 N`` ranks around k.
    Steps beyond ``total_steps`` hold the end values.

    Args:
        total_steps (int): Steps over which to anneal (after ``hold_steps``), >= 1.
        tau_rank_start (float): Defaults to 0.2.
        tau_rank_end (float): Defaults to 0.05 (not given by the paper).
        tau_sel_start (float): Defaults to 0.1.
        tau_sel_end (float): Defaults to 0.025 (not given by the paper).
        shape (str): ``"cosine"`` (default) or ``"linear"``.
        hold_steps (int): Steps held at the start values first (e.g. a stage warm-up). Defaults to 0.

    Example:
        >>> sched = TemperatureSchedule(total_steps=5000)
        >>> sched(0)
        (0.2, 0.1)
        >>> [round(v, 6) for v in sched(5000)]
        [0.05, 0.025]
        >>> sched.apply(topk, step)     # sets topk.tau_rank / topk.tau_sel
    """

    total_steps: int
    tau_rank_start: float = 0.2
    tau_rank_end: float = 0.05
    tau_sel_start: float = 0.1
    tau_sel_end: float = 0.025
    shape: str = "cosine"
    hold_steps: int = 0

    def __post_init__(self):
        if not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise ConfigError(f"temperature schedule total_steps is {self.total_steps!r}; expected an int >= 1.")
        if not isinstance(self.hold_steps, int) or self.hold_steps < 0:
            raise ConfigError(f"temperature schedule hold_steps is {self.hold_steps!r}; expected an int >= 0.")
        for name in ("tau_rank_start", "tau_rank_end", "tau_sel_start", "tau_sel_end"):
            _check_positive(name, getattr(self, name))
        if self.shape not in _SHAPES:
            raise ConfigError(f"temperature schedule shape {self.shape!r} is unknown; choose one of {_SHAPES}.")

    def progress(self, step: int) -> float:
        """Fraction of the annealing done at ``step``, in [0, 1]."""
        u = min(max(step - self.hold_steps, 0) / self.total_steps, 1.0)
        return u if self.shape == "linear" else 0.5 * (1.0 - math.cos(math.pi * u))

    def __call__(self, step: int) -> tuple[float, float]:
        """``(tau_rank, tau_sel)`` at ``step``."""
        p = self.progress(step)
        return (
            self.tau_rank_start + p * (self.tau_rank_end - self.tau_rank_start),
            self.tau_sel_start + p * (self.tau_sel_end - self.tau_sel_start),
        )

    def apply(self, topk: DifferentiableTopK, step: int) -> tuple[float, float]:
        """Sets ``topk``'s temperatures for ``step`` and returns them."""
        taus = self(step)
        topk.set_temperatures(*taus)
        return taus


# ------------------------------------------------------------------------------------------ checks
def _check_positive(name: str, value) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} is {value!r}; expected a finite float > 0. Pass a positive temperature.")


def _check_scores(scores: torch.Tensor) -> None:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or not scores.is_floating_point():
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ShapeError(
            f"router scores are {shape}; expected a floating [B, N] tensor. Score image tokens per sample."
        )


def _check_tokens(x: torch.Tensor, sel: Selection) -> None:
    if x.dim() != 3 or x.shape[0] != sel.pi.shape[0] or x.shape[1] != sel.pi.shape[1]:
        raise ShapeError(
            f"tokens have shape {tuple(x.shape)}; expected [{sel.pi.shape[0]}, {sel.pi.shape[1]}, D] to match the selection. "
            "Route the tensor the scores were computed on."
        )


def _keep(keep_ratio: float | torch.Tensor, like: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``(python float, tensor)`` views of a scalar keep ratio, validated in (0, 1]."""
    if isinstance(keep_ratio, torch.Tensor):
        if keep_ratio.numel() != 1:
            raise ConfigError(
                f"keep ratio has shape {tuple(keep_ratio.shape)}; expected one value per routed block call. "
                "Split a batch with different timesteps into per-sample calls (k must be static per call)."
            )
        keep_f = float(keep_ratio.detach().reshape(()))  # the caller's value decides the floor, not a cast of it
        keep_t = keep_ratio.reshape(()).to(
            dtype=like.dtype if like.dtype == torch.float64 else torch.float32, device=like.device
        )
    elif isinstance(keep_ratio, (int, float)) and not isinstance(keep_ratio, bool):
        keep_f = float(keep_ratio)
        keep_t = torch.tensor(
            keep_f, dtype=like.dtype if like.dtype == torch.float64 else torch.float32, device=like.device
        )
    else:
        raise ConfigError(
            f"keep ratio is a {type(keep_ratio).__name__}; expected a float or a 1-element tensor in (0, 1]."
        )
    if not (math.isfinite(keep_f) and 0.0 < keep_f <= 1.0):
        raise ConfigError(
            f"keep ratio is {keep_f!r}; expected 0 < keep_ratio <= 1. Clamp or squash the policy output (sigmoid)."
        )
    return keep_f, keep_t
