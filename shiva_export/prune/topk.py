"""Static top-k token selection: the only place ``k`` is derived.

Everything here keeps shapes static for ONNX/TensorRT: ``k`` is a Python int computed from the static
token count at trace time, never a tensor, and selection uses ``TopK(sorted=1)`` + ``GatherElements`` /
``ScatterElements`` only (no NonZero, no boolean masks, no data-dependent shapes).
"""

from __future__ import annotations

import math

import torch

from shiva_export.errors import ConfigError, ShapeError
from shiva_export.prune.topk_lowering import select_topk_bounded

__all__ = ["SELECTIONS", "static_k", "select_topk", "gather_tokens", "scatter_tokens"]

# floor(N * keep) with a guard for binary round-off: keep = 1 - 0.3 = 0.7000000000000001 would
# otherwise give floor(1000 * 0.7) = 700 correctly but 1 - 0.7 = 0.30000000000000004 can land below
# an integer. The guard is far below 1/N for any realistic N.
_EPS = 1e-9


def static_k(num_tokens: int, keep_ratio: float) -> int:
    """Tokens a routed block keeps: ``k = floor(N * keep_ratio)``.

    Args:
        num_tokens (int): Static image-token count N of the block input.
        keep_ratio (float): Fraction kept, in (0, 1].

    Raises:
        ConfigError: ``keep_ratio`` is outside (0, 1] or leaves ``k = 0``.
    """
    if not isinstance(num_tokens, int):
        raise TypeError(f"num_tokens must be a Python int (static shape), got {type(num_tokens).__name__}")
    if not 0.0 < keep_ratio <= 1.0:
        raise ConfigError(
            f"keep ratio {keep_ratio} is out of range; expected 0 < keep_ratio <= 1 (ratio = 1 - keep in [0, 1))."
        )
    k = math.floor(num_tokens * keep_ratio + _EPS)
    if k < 1:
        raise ConfigError(
            f"ratio {1 - keep_ratio:g} leaves k = 0 of {num_tokens} image tokens; "
            f"use a ratio below {1 - 1 / num_tokens:.6g} or a larger image."
        )
    return min(k, num_tokens)


SELECTIONS = ("bounded", "topk")


def select_topk(scores: torch.Tensor, k: int, cfg: bool = False, selection: str = "bounded") -> torch.Tensor:
    """Indices of the ``k`` highest-scoring tokens per sample, sorted by position.

    Sorting by position makes ``k = N`` reproduce the dense model bit for bit (attention sums in the
    original order). With ``cfg=True`` the batch holds two halves (uncond, cond) that must keep the same
    tokens: selection uses the element-wise max of the halves' scores (paper, Sec. 2.5).

    Args:
        scores (torch.Tensor): ``[B, N]`` router scores.
        k (int): Static token budget, ``1 <= k <= N``.
        cfg (bool): Batch is ``[uncond; cond]``. Defaults to False.
        selection (str): ``"bounded"`` (default): :func:`~shiva_export.prune.topk_lowering.select_topk_bounded`,
            exact top-k with every TopK ``K <= 3840`` (TensorRT's limit) and a documented tie rule (lower
            position wins) that holds identically in PyTorch, ONNX Runtime and TensorRT.
            ``"topk"``: plain ``torch.topk`` + ``torch.sort`` (ties backend-defined; K up to N).

    Returns:
        torch.Tensor: ``[B, k]`` int64 indices, ascending within each row.
    """
    if cfg:
        if (
            not torch.compiler.is_compiling()
            and not torch.onnx.is_in_onnx_export()
            and isinstance(scores.shape[0], int)
            and scores.shape[0] % 2
        ):
            raise ShapeError(
                f"a CFG-routed call got a batch of {scores.shape[0]} rows, which is not [uncond; cond] pairs; "
                "this call is not classifier-free guidance (guidance_scale <= 1 or skip-layer guidance): use cfg=False for it."
            )
        # Slicing (not reshape(2, -1, N)) keeps a dynamic batch symbolic under torch.export.
        half = scores.shape[0] // 2
        scores = torch.maximum(scores[:half], scores[half:])
    if selection == "bounded":
        idx = select_topk_bounded(scores, k)
    elif selection == "topk":
        idx = torch.topk(scores, k, dim=1, largest=True, sorted=True).indices
        idx = torch.sort(idx, dim=1).values
    else:
        raise ConfigError(f"selection {selection!r} is unknown; choose one of {SELECTIONS}.")
    if cfg:
        idx = torch.cat([idx, idx], dim=0)
    return idx


def gather_tokens(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``tokens[b, idx[b, j], :]`` as ``[B, k, D]`` (exports as GatherElements)."""
    d = int(tokens.shape[2])
    return torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, d))


def scatter_tokens(tokens: torch.Tensor, idx: torch.Tensor, updated: torch.Tensor) -> torch.Tensor:
    """Copy of ``tokens`` with rows ``idx`` replaced by ``updated``; other rows pass through unchanged."""
    d = int(tokens.shape[2])
    return tokens.scatter(1, idx.unsqueeze(-1).expand(-1, -1, d), updated.to(tokens.dtype))
