"""Training-free token scorers that stand in for the Shiva router bank (the baselines of ``validate quality``).

Each scorer is an ``nn.Module`` with the router bank's call signature ``(block, x, temb, pooled) -> scores
(B, N)``; :func:`set_scorer_` swaps it in on a transformer that has Shiva applied, so the same hard top-k,
gather and scatter run (static k per routed block, CFG halves keep the same tokens) and only the choice
of tokens differs:

- :class:`RandomScorer`: fresh seeded uniform scores on every call (a random router);
- :class:`NormScorer`: the L2 norm of each token's hidden state (the norm heuristic);
- :class:`RotatingDitherScorer`: an ordered-dither (Bayer) rank of the token grid, shifted by the block index,
  so every budget keeps an evenly spread spatial subset and each token is skipped in some blocks only (the
  rotating spatial stride of ToDo-style downsampling, fitted to any static k);
- :class:`FixedDitherScorer`: the same dither rank without the shift: one fixed spatial subset skipped in
  every block at every step (a strawman kept for comparison, labelled as what it is);
- :class:`MaskScorer`: fixed per-token scores given by the caller, e.g. a ground-truth foreground mask
  (the oracle of the non-uniform-cost check).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from shiva_export.errors import ConfigError
from shiva_export.prune.api import is_shiva_applied, set_router_bank_

__all__ = [
    "RandomScorer",
    "NormScorer",
    "FixedDitherScorer",
    "RotatingDitherScorer",
    "MaskScorer",
    "set_scorer_",
    "bayer_rank",
]


class RandomScorer(nn.Module):
    """Uniform random scores from a seeded generator (a different draw per call, the same run to run)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = int(seed)
        self.reset()

    def reset(self) -> None:
        self._gen = torch.Generator(device="cpu").manual_seed(self.seed)

    def forward(self, block: int, x: torch.Tensor, temb: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return torch.rand(x.shape[:2], generator=self._gen).to(device=x.device, dtype=x.dtype)


class NormScorer(nn.Module):
    """The L2 norm of each image token's hidden state."""

    def forward(self, block: int, x: torch.Tensor, temb: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return x.float().norm(dim=-1).to(x.dtype)


def bayer_rank(side: int) -> torch.Tensor:
    """Ordered-dither threshold of each cell of a ``side`` x ``side`` grid (row-major), in [0, 1).

    Keeping the k cells with the lowest threshold gives an evenly spread subset for every k (a 2x2
    Bayer matrix recursively refined; ``side`` is rounded up to a power of two and cropped).
    """
    n = 1 << max(0, math.ceil(math.log2(max(1, side))))
    m = torch.zeros(1, 1, dtype=torch.long)
    while m.shape[0] < n:
        m = torch.cat([torch.cat([4 * m, 4 * m + 2], 1), torch.cat([4 * m + 3, 4 * m + 1], 1)], 0)
    m = m[:side, :side].reshape(-1).double()
    return (m.argsort().argsort().double() / m.numel()).float()


def _dither_scores(x: torch.Tensor, shift: tuple[int, int]) -> torch.Tensor:
    """Scores (B, N) of the ordered-dither rank of the square token grid of ``x``, rolled by ``shift`` (rows, cols)."""
    n = int(x.shape[1])
    side = math.isqrt(n)
    if side * side != n:
        raise ConfigError(
            f"The dither scorers need a square token grid; got {n} image tokens. Use a square image size."
        )
    s = 1.0 - torch.roll(bayer_rank(side).reshape(side, side), shifts=shift, dims=(0, 1)).reshape(-1)
    return s.to(device=x.device, dtype=x.dtype).expand(x.shape[0], n)


class FixedDitherScorer(nn.Module):
    """A fixed dither subset: the same evenly spread tokens in every block at every step."""

    def forward(self, block: int, x: torch.Tensor, temb: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return _dither_scores(x, (0, 0))


#: Grid shifts of the 2 x 2 dither level in an order where consecutive blocks keep complementary cells.
_SHIFTS = ((0, 0), (0, 1), (1, 1), (1, 0))


class RotatingDitherScorer(nn.Module):
    """The dither subset rolled per block: block ``b`` shifts the grid by ``_SHIFTS[b % 4]`` plus twice
    ``_SHIFTS[b // 4 % 4]``, so the 16 first blocks take every offset of a 4 x 4 cell and no token is skipped
    in every block (at keep 0.6 over 5 blocks, every token runs in 2 to 4 of them)."""

    def forward(self, block: int, x: torch.Tensor, temb: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        fine, coarse = _SHIFTS[int(block) % 4], _SHIFTS[int(block) // 4 % 4]
        return _dither_scores(x, (fine[0] + 2 * coarse[0], fine[1] + 2 * coarse[1]))


class MaskScorer(nn.Module):
    """Fixed scores per token (B or 1, N), e.g. a foreground mask plus a small tie-breaking jitter."""

    def __init__(self, scores: torch.Tensor):
        super().__init__()
        self.register_buffer(
            "scores", torch.as_tensor(scores, dtype=torch.float32).reshape(-1, torch.as_tensor(scores).shape[-1])
        )

    def forward(self, block: int, x: torch.Tensor, temb: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        s = self.scores
        if s.shape[0] not in (1, x.shape[0]):
            if x.shape[0] % s.shape[0] == 0:  # CFG: the same mask for both halves
                s = s.repeat(x.shape[0] // s.shape[0], 1)
            else:
                raise ConfigError(
                    f"MaskScorer has {s.shape[0]} rows for a batch of {x.shape[0]}; give 1 or one per sample."
                )
        return s.to(device=x.device, dtype=x.dtype).expand(x.shape[0], -1)


def set_scorer_(transformer: nn.Module, scorer: nn.Module) -> nn.Module:
    """Replaces the router bank of a Shiva transformer with ``scorer``; returns the bank it replaced."""
    if not is_shiva_applied(transformer):
        raise ConfigError("set_scorer_ needs a transformer with Shiva applied (apply_shiva_ or load_pipeline).")
    return set_router_bank_(transformer, scorer)
