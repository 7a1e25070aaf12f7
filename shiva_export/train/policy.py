"""Adaptive ratio policy, EMA budget loss, stratified sampling and LUT quantisation (paper Sec. 2.3-2.4).

``logit(keep_{t,l}) = Phi_time(e_t) + Phi_layer(e_l) + b_anchor`` (Eqs. 10-11, App. B.3). The policy
depends only on ``(t, l)``, so at inference it is evaluated once per sampler timestep into a lookup table
(:meth:`RatioPolicy.lut`) and, because every distinct ``k`` pattern is a separate static graph, the LUT
is collapsed into at most four contiguous phases by :func:`quantize_lut`.

Choices where the paper is silent (documented on each object): final layers of both branches start
at zero (``keep = target`` everywhere at init); ``mu`` of the EMA budget starts at the target; the
router-warm-up ratio range is ``[0.3, 0.9]`` in four groups; timesteps are continuous in ``[0, T)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from shiva_export.errors import ConfigError, ShapeError
from shiva_export.logging import get_logger
from shiva_export.models import get_adapter, num_blocks
from shiva_export.prune.topk import static_k

__all__ = [
    "RatioPolicy",
    "EMABudget",
    "PhaseSchedule",
    "timestep_embedding",
    "stratified_timesteps",
    "stratified_ratios",
    "quantize_lut",
    "MAX_PHASES",
    "KeepMeasure",
    "calibrate_anchor",
]

logger = get_logger(__name__)

#: Most phases :func:`quantize_lut` produces (each phase is one set of static shapes to build).
MAX_PHASES = 4


def timestep_embedding(timesteps: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep embedding ``[cos | sin]``, as SD3's ``Timesteps(256, flip_sin_to_cos=True, 0)``.

    Args:
        timesteps (torch.Tensor): ``[B]`` timesteps (float or int), e.g. in ``[0, 1000)``.
        dim (int): Embedding width (even). Defaults to 256.
        max_period (float): Lowest frequency's period. Defaults to 10000.

    Returns:
        torch.Tensor: ``[B, dim]`` float32.
    """
    if dim < 2 or dim % 2:
        raise ConfigError(f"timestep embedding width is {dim}; expected an even int >= 2.")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.reshape(-1).float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


class RatioPolicy(nn.Module):
    """Keep ratio per (timestep, layer): ``m + (1 - m) sigmoid(Phi_time(e_t) + Phi_layer(e_l) + b_anchor [+ eps])``
    with the floor ``m = min_keep`` (0: the paper's bare sigmoid).

    * ``Phi_layer``: ``Embedding(num_layers, 256) -> Linear(256, 256) -> SiLU -> Linear(256, 1)``.
    * ``Phi_time``: sinusoidal embedding (256) ``-> Linear(256, 256) -> SiLU -> Linear(256, 1)`` (the
      "mirrored" MLP: same shape as the layer branch).
    * ``b_anchor``: learnable scalar, initialised to ``logit(target)``.
    * The last Linear of each branch is zero-initialised (a choice; the paper gives no init), so a fresh
      policy returns exactly ``target`` everywhere and starts on budget.
    * Logit noise ``eps ~ N(0, logit_noise_std^2)`` (paper: N(0, 1)) is added in ``train()`` mode when
      :attr:`logit_noise` is True (policy stage); switch it off for joint tuning. :meth:`lut` never
      adds noise.

    Args:
        num_layers (int): Transformer blocks (layer ids ``0 .. num_layers - 1``).
        target (float): Target mean keep ratio ``R_target`` in (0, 1). Defaults to 0.6.
        embed_dim (int): Layer / timestep embedding width. Defaults to 256.
        hidden_dim (int): MLP hidden width. Defaults to 256.
        logit_noise (bool): Add logit noise in training mode. Defaults to False.
        logit_noise_std (float): Sigma of the logit noise. Defaults to 1.0.
        min_keep (float): Floor of every keep ratio: ``keep = min_keep + (1 - min_keep) * sigmoid(z)``, so no
            layer collapses to a handful of tokens (not in the paper, which uses a bare sigmoid). In
            ``[0, target)``. Defaults to 0.0.
        max_logit (float | None): Bound the logits smoothly to ``(-m, m)`` (``m tanh(z / m)``). Without a
            bound, a layer whose keep sits at the floor or ceiling has a near-zero gradient that Adam still
            turns into steps of ``lr``: its logit drifts without limit (measured: -1400 after 250 steps).
            Defaults to None (the paper's unbounded logit).

    Example:
        >>> policy = RatioPolicy(num_layers=24, target=0.6)
        >>> keep = policy(t, torch.arange(1, 24))          # [B, 23], differentiable
        >>> table = policy.lut(sampler_timesteps, range(24))  # [steps, 24], deterministic
    """

    def __init__(
        self,
        num_layers: int,
        target: float = 0.6,
        embed_dim: int = 256,
        hidden_dim: int = 256,
        logit_noise: bool = False,
        logit_noise_std: float = 1.0,
        min_keep: float = 0.0,
        max_logit: float | None = None,
    ):
        super().__init__()
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ConfigError(f"policy num_layers is {num_layers!r}; expected an int >= 1 (transformer blocks).")
        _check_ratio("policy target", target, open_right=True)
        if not (math.isfinite(logit_noise_std) and logit_noise_std >= 0):
            raise ConfigError(f"logit_noise_std is {logit_noise_std!r}; expected a finite float >= 0.")
        if not (isinstance(min_keep, (int, float)) and 0.0 <= min_keep < target):
            raise ConfigError(f"min_keep is {min_keep!r}; expected 0 <= min_keep < target ({target}).")
        self.num_layers = num_layers
        self.target = float(target)
        self.min_keep = float(min_keep)
        if max_logit is not None and not (isinstance(max_logit, (int, float)) and max_logit > 0):
            raise ConfigError(f"max_logit is {max_logit!r}; expected a float > 0 or None.")
        self.max_logit = None if max_logit is None else float(max_logit)
        self.embed_dim = embed_dim
        self.logit_noise = bool(logit_noise)
        self.logit_noise_std = float(logit_noise_std)
        self.layer_embed = nn.Embedding(num_layers, embed_dim)
        self.layer_mlp = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, 1))
        self.time_mlp = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, 1))
        self.b_anchor = nn.Parameter(torch.tensor(_logit((self.target - self.min_keep) / (1.0 - self.min_keep))))
        for head in (self.layer_mlp[-1], self.time_mlp[-1]):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, target={self.target:g}, min_keep={self.min_keep:g}, logit_noise={self.logit_noise}"

    def logits(
        self,
        timesteps: torch.Tensor,
        layers: torch.Tensor,
        noise: bool | None = None,
        generator: torch.Generator | None = None,
        anchor_shift: float = 0.0,
    ) -> torch.Tensor:
        """``[len(timesteps), len(layers)]`` policy logits.

        Args:
            timesteps (torch.Tensor): ``[T]`` timesteps (the backbone's convention, e.g. ``[0, 1000)``).
            layers (torch.Tensor): ``[L]`` layer ids in ``[0, num_layers)``.
            noise (bool | None): Add logit noise. Defaults to ``training and logit_noise``.
            generator (torch.Generator | None): RNG of the noise.
            anchor_shift (float): Added to ``b_anchor`` (budget projection and calibration). Defaults to 0.
        """
        device = self.b_anchor.device
        t = torch.as_tensor(timesteps, device=device).reshape(-1)
        ids = torch.as_tensor(layers, device=device).reshape(-1).long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_layers):
            raise ConfigError(
                f"policy layer ids span {int(ids.min())}..{int(ids.max())}; expected 0..{self.num_layers - 1}. "
                "Pass transformer block indices of this model."
            )
        phi_t = self.time_mlp(timestep_embedding(t, self.embed_dim))  # [T, 1]
        phi_l = self.layer_mlp(self.layer_embed(ids)).reshape(1, -1)  # [1, L]
        z = phi_t + phi_l + self.b_anchor + anchor_shift
        if self.max_logit is not None:  # bounded: Adam keeps moving saturated logits at lr per step otherwise
            z = self.max_logit * torch.tanh(z / self.max_logit)
        if noise is None:
            noise = self.training and self.logit_noise
        if noise and self.logit_noise_std > 0:
            z = z + self.logit_noise_std * torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        return z

    def forward(
        self,
        timesteps: torch.Tensor,
        layers: torch.Tensor,
        noise: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Keep ratios ``min_keep + (1 - min_keep) * sigmoid(logits)`` as ``[len(timesteps), len(layers)]`` (differentiable)."""
        return self.keep_of(self.logits(timesteps, layers, noise=noise, generator=generator))

    def keep_of(self, logits: torch.Tensor) -> torch.Tensor:
        """Keep ratios of policy logits (the floor applied)."""
        return self.min_keep + (1.0 - self.min_keep) * torch.sigmoid(logits)

    @torch.no_grad()
    def lut(self, timesteps, layers) -> torch.Tensor:
        """Deterministic keep-ratio table for a sampler: ``[len(timesteps), len(layers)]`` float32, no noise.

        Args:
            timesteps: The sampler's timesteps, in sampling order (e.g. ``scheduler.timesteps``).
            layers: Layer ids (e.g. ``range(1, num_layers)`` for the routed blocks).
        """
        t = torch.as_tensor(timesteps, dtype=torch.float32)
        ids = torch.as_tensor(list(layers) if not isinstance(layers, torch.Tensor) else layers, dtype=torch.long)
        return self.forward(t, ids, noise=False).float().detach()


class EMABudget(nn.Module):
    """EMA-stabilised budget loss (Eqs. 12-13).

    ``mu <- beta * mean_keep_batch + (1 - beta) * mu`` (without gradient), then
    ``loss = lam * mean_keep_batch * sg(2 * (mu - target))``: a push on the batch mean keep ratio
    down while the long-run mean ``mu`` is above target, up while below. Single batches may exceed the
    budget. ``mu`` starts at ``target`` (the paper gives no init) and is updated only in ``train()``
    mode; it is a buffer, so it is checkpointed with the module.

    In data-parallel training the paper synchronises ``mean_keep_batch`` across GPUs for the EMA: with
    ``sync=True`` and an initialised ``torch.distributed`` group the detached mean is all-reduced
    (averaged) before the update; the loss keeps the local mean (DDP averages its gradient).

    Args:
        target (float): ``R_target`` in (0, 1].
        beta (float): EMA weight of the new batch, in (0, 1]. Defaults to 0.2.
        lam (float): Loss weight. Defaults to 1.0 (the paper gives no value for real training).
        sync (bool): All-reduce the batch mean when distributed. Defaults to True.

    Example:
        >>> budget = EMABudget(target=0.6, lam=0.1)
        >>> loss = task_loss + budget(keep)              # keep: every keep ratio used in this batch
    """

    def __init__(self, target: float, beta: float = 0.2, lam: float = 1.0, sync: bool = True):
        super().__init__()
        _check_ratio("budget target", target, open_right=False)
        if not (isinstance(beta, (int, float)) and 0.0 < beta <= 1.0):
            raise ConfigError(f"EMA beta is {beta!r}; expected 0 < beta <= 1 (paper: 0.2).")
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
            raise ConfigError(f"budget lam is {lam!r}; expected a finite float >= 0.")
        self.target = float(target)
        self.beta = float(beta)
        self.lam = float(lam)
        self.sync = bool(sync)
        self.register_buffer("mu", torch.tensor(self.target, dtype=torch.float64))

    def extra_repr(self) -> str:
        return f"target={self.target:g}, beta={self.beta:g}, lam={self.lam:g}, mu={float(self.mu):.4f}"

    @torch.no_grad()
    def update(self, mean_keep: torch.Tensor | float) -> float:
        """EMA step with a batch mean keep ratio; returns the new ``mu`` (no-op in eval mode)."""
        m = torch.as_tensor(mean_keep, dtype=torch.float64, device=self.mu.device).detach().clone()
        if self.sync and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(m)
            m /= torch.distributed.get_world_size()
        if self.training:
            self.mu.mul_(1.0 - self.beta).add_(self.beta * m)
        return float(self.mu)

    def forward(self, keep: torch.Tensor) -> torch.Tensor:
        """Updates ``mu`` with ``keep.mean()`` and returns ``lam * keep.mean() * sg(2 (mu - target))``.

        Args:
            keep (torch.Tensor): The keep ratios used in this batch (any shape, differentiable).
        """
        if keep.numel() == 0:
            raise ShapeError("budget keep ratios are empty; pass the keep ratios used in this batch.")
        mean = keep.mean()
        mu = self.update(mean.detach())
        direction = 2.0 * (mu - self.target)
        return self.lam * mean * direction


# ------------------------------------------------------------------------------------------- sampling
def stratified_timesteps(
    batch: int,
    T: int = 1000,
    generator: torch.Generator | None = None,
    integer: bool = False,
) -> torch.Tensor:
    """One timestep per stratum (Eq. 15): ``[0, T)`` split into ``batch`` equal bins, ascending.

    Args:
        batch (int): Global batch size B (= number of strata).
        T (int): Timestep range. Defaults to 1000.
        generator (torch.Generator | None): RNG.
        integer (bool): Return int64 timesteps (bin ``b`` is ``[floor(bT/B), floor((b+1)T/B))``;
            needs ``B <= T``). Defaults to False: float32 in ``[bT/B, (b+1)T/B)``.

    Returns:
        torch.Tensor: ``[batch]`` timesteps, the ``b``-th from the ``b``-th stratum.
    """
    if not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"stratified batch is {batch!r}; expected an int >= 1.")
    if not isinstance(T, int) or T < 1:
        raise ConfigError(f"timestep range T is {T!r}; expected an int >= 1.")
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    b = torch.arange(batch, dtype=torch.float64)
    if not integer:
        t = (b + u) * (T / batch)
        return t.clamp(max=math.nextafter(T, 0)).float()
    if batch > T:
        raise ConfigError(
            f"stratified batch {batch} exceeds T = {T} integer timesteps; use integer=False or a smaller batch."
        )
    lo = torch.floor(b * T / batch)
    hi = torch.floor((b + 1) * T / batch)
    return (lo + torch.floor(u * (hi - lo))).long()


def stratified_ratios(
    batch: int,
    groups: int = 4,
    r_min: float = 0.3,
    r_max: float = 0.9,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Keep ratios for the router warm-up: one per group, groups on disjoint sub-intervals.

    ``[r_min, r_max]`` is split into ``groups`` equal sub-intervals; the batch is split into ``groups``
    contiguous groups (sizes differ by at most one); group ``g`` draws one ratio uniformly from the
    ``g``-th sub-interval and all its samples use it. The paper gives neither ``r_min``, ``r_max`` nor
    the group count: the defaults ``[0.3, 0.9]`` in 4 groups cover the range its learned policy uses
    (about 0.4 to 0.8, Fig. 4b) with margin on both sides.

    Args:
        batch (int): Batch size (>= ``groups``).
        groups (int): Number of groups K. Defaults to 4.
        r_min (float): Lowest keep ratio, in (0, 1]. Defaults to 0.3.
        r_max (float): Highest keep ratio, in ``(r_min, 1]``. Defaults to 0.9.
        generator (torch.Generator | None): RNG.

    Returns:
        torch.Tensor: ``[batch]`` float32 keep ratios.
    """
    if not isinstance(groups, int) or groups < 1:
        raise ConfigError(f"ratio groups is {groups!r}; expected an int >= 1.")
    if not isinstance(batch, int) or batch < groups:
        raise ConfigError(f"stratified ratio batch is {batch!r}; expected an int >= groups ({groups}).")
    _check_ratio("r_min", r_min, open_right=False)
    _check_ratio("r_max", r_max, open_right=False)
    if not r_min < r_max:
        raise ConfigError(f"ratio range is [{r_min}, {r_max}]; expected r_min < r_max.")
    width = (r_max - r_min) / groups
    u = torch.rand(groups, generator=generator, dtype=torch.float64)
    per_group = r_min + (torch.arange(groups, dtype=torch.float64) + u) * width
    sizes = [batch // groups + (1 if g < batch % groups else 0) for g in range(groups)]
    return torch.repeat_interleave(per_group, torch.tensor(sizes)).float()


# ------------------------------------------------------------------------------------ LUT quantisation
@dataclass(frozen=True)
class PhaseSchedule:
    """One phase of a quantised LUT: a static per-block schedule for a run of sampler steps.

    Attributes:
        start (int): First sampler step index of the phase (inclusive).
        stop (int): One past the last step index.
        keep_ratios (tuple[float, ...]): Mean keep ratio per LUT column (layer) over the phase.
        k (tuple[int, ...]): Exact per-block budget ``floor(N * keep)`` (>= 1) at ``num_tokens``.
        num_tokens (int): N the budgets were computed for.
        layers (tuple[int, ...] | None): Block index of each column, when given.
    """

    start: int
    stop: int
    keep_ratios: tuple[float, ...]
    k: tuple[int, ...]
    num_tokens: int
    layers: tuple[int, ...] | None = None

    @property
    def steps(self) -> range:
        return range(self.start, self.stop)

    def to_keep_ratios(self, num_blocks: int) -> tuple[float | None, ...]:
        """Per-block ``keep_ratios`` for :class:`~shiva_export.prune.api.ShivaConfig` (``None`` = dense).

        Needs ``layers``. Each ratio is the snapped ``k / N`` so ``static_k(N, ratio) == k`` exactly.
        """
        if self.layers is None:
            raise ConfigError("phase has no layer ids; pass layers= to quantize_lut to map columns to blocks.")
        out: list[float | None] = [None] * num_blocks
        for layer, k in zip(self.layers, self.k):
            if not 0 <= layer < num_blocks:
                raise ConfigError(f"phase layer id is {layer}; expected 0..{num_blocks - 1}.")
            out[layer] = k / self.num_tokens
        return tuple(out)

    def to_dict(self) -> dict:
        return {
            "start": self.start,
            "stop": self.stop,
            "keep_ratios": list(self.keep_ratios),
            "k": list(self.k),
            "num_tokens": self.num_tokens,
            "layers": None if self.layers is None else list(self.layers),
        }


def quantize_lut(lut: torch.Tensor, n_tokens: int, phases: int, layers=None) -> list[PhaseSchedule]:
    """Collapses a ``[steps, layers]`` keep-ratio LUT into ``phases`` contiguous static schedules.

    The split points minimise the within-phase squared error ``sum ||lut[s] - mean_phase||^2`` (exact
    dynamic programming over the sampler steps; ties go to the earliest split). Each phase gets the
    mean keep ratio per layer and the exact per-block budget ``k = floor(N * keep)`` (clamped to
    ``[1, N]``), so a phase maps to one static-shape graph.

    Args:
        lut (torch.Tensor): ``[steps, L]`` keep ratios in sampling order (from :meth:`RatioPolicy.lut`).
        n_tokens (int): Image tokens N of the target resolution.
        phases (int): Number of phases, 1..4 (and at most ``steps``).
        layers (Sequence[int] | None): Block index of each LUT column (recorded on each phase).

    Returns:
        list[PhaseSchedule]: ``phases`` schedules covering steps ``0..steps-1`` in order.
    """
    if not isinstance(lut, torch.Tensor) or lut.dim() != 2 or lut.shape[0] < 1 or lut.shape[1] < 1:
        shape = tuple(lut.shape) if isinstance(lut, torch.Tensor) else type(lut).__name__
        raise ShapeError(
            f"keep-ratio LUT is {shape}; expected a non-empty [steps, layers] tensor. Build it with RatioPolicy.lut()."
        )
    steps, n_layers = int(lut.shape[0]), int(lut.shape[1])
    if not isinstance(phases, int) or not 1 <= phases <= min(MAX_PHASES, steps):
        raise ConfigError(f"phases is {phases!r}; expected an int in 1..{min(MAX_PHASES, steps)}. Use fewer phases.")
    if not isinstance(n_tokens, int) or n_tokens < 1:
        raise ConfigError(f"n_tokens is {n_tokens!r}; expected an int >= 1 (image tokens at the target resolution).")
    table = lut.detach().double().cpu()
    if not bool(((table > 0) & (table <= 1)).all()):
        raise ConfigError("keep-ratio LUT has values outside (0, 1]; expected sigmoid outputs from RatioPolicy.lut().")
    cols = None
    if layers is not None:
        cols = tuple(int(v) for v in layers)
        if len(cols) != n_layers:
            raise ConfigError(f"layers has {len(cols)} ids but the LUT has {n_layers} columns; give one per column.")

    bounds = _best_split(table, phases)
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        mean = table[a:b].mean(dim=0)
        keep = tuple(float(v) for v in mean)
        k = tuple(static_k(n_tokens, max(v, 1.0 / n_tokens)) for v in keep)
        out.append(PhaseSchedule(start=a, stop=b, keep_ratios=keep, k=k, num_tokens=n_tokens, layers=cols))
    lut_mean = float(table.mean())
    q_mean = sum(sum(p.k) * (p.stop - p.start) for p in out) / (n_tokens * steps * n_layers)
    logger.debug(
        "quantize_lut: %d phases %s, LUT mean keep %.4f, quantised mean k/N %.4f", phases, bounds, lut_mean, q_mean
    )
    return out


def _best_split(table: torch.Tensor, phases: int) -> list[int]:
    """Boundaries ``[0, b1, ..., steps]`` minimising the within-segment sum of squared errors."""
    steps = table.shape[0]
    csum = torch.cat([torch.zeros(1, table.shape[1], dtype=table.dtype), table.cumsum(0)])
    csq = torch.cat([torch.zeros(1, dtype=table.dtype), (table**2).sum(1).cumsum(0)])

    def sse(a: int, b: int) -> float:  # steps a..b-1
        s = csum[b] - csum[a]
        return float(csq[b] - csq[a] - (s * s).sum() / (b - a))

    inf = float("inf")
    cost = [[inf] * (steps + 1) for _ in range(phases + 1)]
    back = [[0] * (steps + 1) for _ in range(phases + 1)]
    cost[0][0] = 0.0
    for p in range(1, phases + 1):
        for b in range(p, steps + 1):
            for a in range(p - 1, b):
                c = cost[p - 1][a] + sse(a, b)
                if c < cost[p][b] - 1e-12:
                    cost[p][b], back[p][b] = c, a
    bounds = [steps]
    for p in range(phases, 0, -1):
        bounds.append(back[p][bounds[-1]])
    return bounds[::-1]


def _check_ratio(name: str, value, open_right: bool) -> None:
    ok = (
        isinstance(value, (int, float))
        and math.isfinite(value)
        and 0.0 < value
        and (value < 1.0 if open_right else value <= 1.0)
    )
    if not ok:
        rng = "0 < value < 1" if open_right else "0 < value <= 1"
        raise ConfigError(f"{name} is {value!r}; expected {rng}. Pass a keep ratio (fraction of image tokens kept).")


# ------------------------------------------------------------------------------------------- budget
KEEP_MEASURES = ("tokens", "flops")


class KeepMeasure:
    """What the budget calls "mean keep" of a keep table ``[S, L]`` (S timesteps or samples, L routed layers).

    * ``"tokens"``: the plain mean of the keep ratios (the paper's ``R``).
    * ``"flops"``: the uniform keep ratio whose FLOPs equal the table's mean FLOPs. Each routed block's
      FLOPs are exactly quadratic in its kept tokens (linear layers ``~k``, attention ``~k (k + T)``), so
      the adapter's FLOP counter, evaluated at three budgets, gives ``f_l(r) = a_l + b_l r + c_l r^2`` and
      the measure inverts ``sum_l f_l(r) = mean_s sum_l f_l(keep_sl)`` in closed form (differentiable).
      A layer whose attention dominates then costs more budget per token than a cheap one.
      With context ``"keep"`` a routed block at ``k < N`` also projects the rejected tokens' keys and values
      (and ``norm1`` once more), which ``k = N`` does not: the cost jumps at keep 1, so the fit uses three
      budgets below it (exact for every ``k < N``; the policy's keeps stay below 1 unless ``min_keep`` says otherwise).

    Args:
        mode (str): ``"tokens"`` or ``"flops"``.
        coeffs (torch.Tensor | None): ``[L, 3]`` per-layer ``(a, b, c)`` (``"flops"`` only).
    """

    def __init__(self, mode: str = "tokens", coeffs: torch.Tensor | None = None):
        if mode not in KEEP_MEASURES:
            raise ConfigError(f"budget measure {mode!r} is unknown; choose one of {KEEP_MEASURES}.")
        if mode == "flops" and coeffs is None:
            raise ConfigError(
                "the 'flops' budget measure needs per-layer FLOP coefficients; build it with KeepMeasure.for_model."
            )
        self.mode = mode
        self.coeffs = None if coeffs is None else coeffs.double()

    @classmethod
    def for_model(
        cls,
        mode: str,
        transformer,
        num_image_tokens: int,
        text_len: int,
        routed,
        bottleneck: int = 64,
        context: str = "drop",
    ) -> KeepMeasure:
        """The measure of ``transformer``'s routed blocks at ``num_image_tokens`` image and ``text_len`` text tokens,
        routed with ``context`` (``ShivaConfig.context``)."""
        if mode == "tokens":
            return cls("tokens")

        adapter = get_adapter(transformer)
        n_layers, routed = num_blocks(transformer), list(routed)
        rows, rs = [], []
        for r in (0.25, 0.5, 1.0) if context == "drop" else (0.25, 0.5, 0.75):
            keeps = [r if i in routed else None for i in range(n_layers)]
            fc = adapter.count_flops(
                transformer.config, num_image_tokens, text_len, keeps, bottleneck=bottleneck, context=context
            )
            rows.append([float(sum(fc.blocks[i].values())) for i in routed])
            rs.append(static_k(num_image_tokens, r) / num_image_tokens)
        v = torch.tensor([[1.0, r, r * r] for r in rs], dtype=torch.float64)
        f = torch.tensor(rows, dtype=torch.float64)  # [3, L]
        coeffs = torch.linalg.solve(v, f).T  # [L, 3]
        return cls("flops", coeffs / coeffs.sum(dim=0).abs().max())  # scale out (values are ~1e9)

    def __call__(self, keep: torch.Tensor) -> torch.Tensor:
        """The scalar measure of a keep table ``[S, L]`` (differentiable)."""
        if keep.dim() != 2:
            raise ShapeError(f"keep table shape is {tuple(keep.shape)}; expected [S, L].")
        if self.mode == "tokens":
            return keep.mean()
        c = self.coeffs.to(keep.device)
        if keep.shape[1] != c.shape[0]:
            raise ShapeError(f"keep table has {keep.shape[1]} layers; the FLOP measure was built for {c.shape[0]}.")
        k = keep.double()
        total = (c[:, 0] + c[:, 1] * k + c[:, 2] * k * k).sum(dim=1).mean()  # mean over rows of sum over layers
        a, b, q = c[:, 0].sum(), c[:, 1].sum(), c[:, 2].sum()
        if float(q) <= 1e-12:
            r = (total - a) / b
        else:
            r = (-b + torch.sqrt((b * b - 4.0 * q * (a - total)).clamp_min(0.0))) / (2.0 * q)
        return r.to(keep.dtype)


def calibrate_anchor(
    policy: RatioPolicy, timesteps: list[float], layers: list[int], target: float, measure: KeepMeasure | None = None
) -> tuple[float, float]:
    """Shifts ``b_anchor`` so the LUT's budget measure equals ``target``; returns (raw measure, shift)."""
    measure = measure or KeepMeasure("tokens")
    t, ids = torch.tensor(timesteps), torch.tensor(layers)

    def at(shift: float) -> float:
        return float(measure(policy.keep_of(policy.logits(t, ids, noise=False, anchor_shift=shift).double().cpu())))

    with torch.no_grad():
        raw = at(0.0)
        lo, hi = -20.0, 20.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if at(mid) < target:
                lo = mid
            else:
                hi = mid
        delta = 0.5 * (lo + hi)
        policy.b_anchor.add_(delta)
    return raw, delta
