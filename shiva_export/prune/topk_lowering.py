"""Top-k token selection lowered to ``TopK`` ops with ``K <= 3840`` (TensorRT's limit).

TensorRT (and TensorRT-RTX) rejects ``TopK`` with ``K > 3840`` ("K exceeds the maximum value allowed
(3840)"). SD3 has N = 4096 image tokens at 1024 px and N = 16384 at 2048 px, so most budgets ``k``
cannot be exported as one ``torch.topk(scores, k)``. :func:`select_topk_bounded` returns the same
``[B, k]`` int64 index rows as ``torch.sort(torch.topk(scores, k).indices).values`` (ascending
positions) using only static-shape ops: ``TopK`` (``sorted=1``, every ``K <= max_k``),
``ScatterElements``, ``GatherElements``, float ``CumSum``, ``Greater``/``Equal``/``LessOrEqual``,
``Where``, ``Cast``, ``Slice``, ``Add``/``Sub``, ``ReduceSum``, ``Range``/constants. No ``NonZero``, no
boolean-mask indexing, no data-dependent shapes.

Algorithm (threshold + stable compaction)
----------------------------------------
1. **k-th largest value** ``t`` per row. It is read from the *values* of ``TopK``:

   * ``k <= max_k``: ``t = TopK(scores, k, largest=1).values[:, k-1]``.
   * ``N - k + 1 <= max_k``: ``t`` is the ``(N-k+1)``-th smallest,
     ``TopK(scores, N-k+1, largest=0).values[:, N-k]``.
   * otherwise, several masked rounds in whichever direction needs fewer rounds: each round takes
     ``TopK`` of at most ``max_k`` elements from a working copy, then overwrites the picked positions
     with ``-inf`` (``+inf`` for the smallest direction) via ``ScatterElements``; the last value of
     the last round is ``t``. Masked elements can only be picked again when every remaining element
     equals the mask value, in which case the value read is the same, so ``t`` is exact even when
     scores contain ``±inf``.

2. **Keep mask** by value, not by TopK index: ``keep = (s > t) | (s == t & rank_eq <= k - count(s > t))``
   where ``rank_eq`` is the inclusive float ``CumSum`` of ``s == t`` along the row. Since
   ``count(s > t) < k <= count(s >= t)``, exactly ``k`` entries are kept.

3. **Order-preserving compaction** (sort-free): with ``c = CumSum(keep)`` (float, inclusive) the stable
   partition ``dest = where(keep, c - 1, k + p - c)`` is a permutation of ``0..N-1`` (kept tokens first,
   each group in position order). ``ScatterElements`` of the positions ``p`` into a ``[B, N]`` buffer at
   ``dest`` and a ``Slice`` to ``[:, :k]`` give the kept positions in ascending order. Scatter indices
   are unique, so the scatter is well defined in every backend.

Tie rule
--------
**Among equal scores the lower position wins** (is kept first). ``-0.0`` and ``+0.0`` compare equal and
are therefore ties; ``±inf`` are ordinary values. This is the order of a *stable* descending sort, see
:func:`topk_reference`, which is the test oracle.

Why this rule and why no unique keys: ``torch.topk`` on CPU follows no simple tie rule (checked with
torch 2.13: with scores drawn from ``{0,1,2,3}`` its index set differs from both "lower position wins"
and "higher position wins" in most cases, and it treats ``-0.0``/``+0.0`` as ties picked in an
unspecified order); ONNX specifies "lower index first" for ``TopK`` but TensorRT documents no tie
order. Instead of making keys unique before ``TopK`` (rank-based keys would need a full sort or an
``O(N^2)`` comparison, and packing (score, position) into one key needs a float bitcast that opset 20
lacks), this lowering never uses ``TopK`` *indices* to decide membership: ``TopK`` only supplies the
value ``t``, which is the same whichever equal element a backend returns, and ties at ``t`` are broken
by a position ``CumSum``. The rule therefore holds identically in PyTorch eager, ONNX Runtime and
TensorRT without unique keys. The round-masking indices may differ between backends on ties, but they
only affect which equal copies are masked, never the value multiset.

Preconditions: scores must not contain NaN (``t`` would be NaN and fewer than ``k`` tokens would be
kept; ``dest`` is clamped so the scatter stays in bounds, but the result is then meaningless).
``N < 2**24`` so the float ``CumSum`` is exact (TensorRT's ``CumSum`` accepts float types only).
"""

from __future__ import annotations

import math

import torch

__all__ = ["TRT_TOPK_MAX_K", "needs_lowering", "select_topk_bounded", "topk_reference"]

#: Largest ``K`` TensorRT's ``ITopKLayer`` accepts.
TRT_TOPK_MAX_K = 3840

# Float CumSum counts are exact below 2**24.
_MAX_N = 1 << 24


def needs_lowering(k: int, n: int, max_k: int = TRT_TOPK_MAX_K) -> bool:
    """Whether ``torch.topk(scores, k)`` over ``n`` tokens would exceed the backend's TopK limit.

    Returns False when ``k <= max_k`` (a plain ``TopK`` is accepted).
    """
    _check_static(k, n, max_k)
    return k > max_k


def topk_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Plain-torch oracle: ascending positions of the ``k`` highest scores, lower position wins ties.

    Uses a stable descending sort, so among equal scores the earlier position comes first.
    (``torch.topk`` itself does not follow a fixed tie rule on CPU.)

    Args:
        scores (torch.Tensor): ``[B, N]`` scores without NaN.
        k (int): ``1 <= k <= N``.

    Returns:
        torch.Tensor: ``[B, k]`` int64 positions, ascending within each row.
    """
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return torch.sort(order[:, :k], dim=1).values


def select_topk_bounded(scores: torch.Tensor, k: int, max_k: int = TRT_TOPK_MAX_K) -> torch.Tensor:
    """Ascending positions of the ``k`` highest scores per row, using only ``TopK`` with ``K <= max_k``.

    Equal to :func:`topk_reference` (ties: lower position wins) in eager mode, after ONNX export in
    ONNX Runtime, and in TensorRT. All shapes are static; ``k`` and ``N`` are Python ints.

    Args:
        scores (torch.Tensor): ``[B, N]`` floating-point scores without NaN.
        k (int): Static budget, ``1 <= k <= N``.
        max_k (int): Largest ``K`` any emitted ``TopK`` may have. Defaults to 3840 (TensorRT).

    Returns:
        torch.Tensor: ``[B, k]`` int64 positions, ascending within each row.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, N], got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be floating point, got {scores.dtype}")
    n = int(scores.shape[1])
    _check_static(k, n, max_k)

    positions = torch.arange(n, device=scores.device, dtype=torch.int64).unsqueeze(0).expand_as(scores)
    # No shortcut at k == N: keep 1.0 runs the same TopK/CumSum/Scatter path (t = the row minimum, one
    # TopK with K = 1), so the ratio-0 export is the real graph and still reproduces the dense model.
    thresh = _kth_largest(scores, k, max_k)  # [B, 1]

    # Keep mask: strictly above the threshold, plus the first (k - count_gt) ties by position.
    gt = scores > thresh
    eq = scores == thresh
    count_gt = gt.to(torch.float32).sum(dim=1, keepdim=True)  # [B, 1]
    rank_eq = torch.cumsum(eq.to(torch.float32), dim=1)  # inclusive rank among ties
    keep = gt | (eq & (rank_eq <= (k - count_gt)))

    # Stable partition: kept tokens to 0..k-1, dropped ones to k..N-1, each in position order.
    keep_f = keep.to(torch.float32)
    csum = torch.cumsum(keep_f, dim=1)
    pos_f = positions.to(torch.float32)
    dest_f = torch.where(keep, csum - 1.0, (k + pos_f) - csum)
    dest = dest_f.clamp(0.0, float(n - 1)).to(torch.int64)  # clamp: in-bounds even for NaN input
    perm = torch.scatter(torch.zeros_like(positions), 1, dest, positions)
    return perm[:, :k]


def _kth_largest(scores: torch.Tensor, k: int, max_k: int) -> torch.Tensor:
    """``[B, 1]`` k-th largest value per row (exact as a value; tie-order independent)."""
    n = int(scores.shape[1])
    m_small = n - k + 1  # the k-th largest is the (n-k+1)-th smallest
    if k <= max_k:
        vals = torch.topk(scores, k, dim=1, largest=True, sorted=True).values
        return vals[:, k - 1 : k]
    if m_small <= max_k:
        vals = torch.topk(scores, m_small, dim=1, largest=False, sorted=True).values
        return vals[:, m_small - 1 : m_small]

    largest = math.ceil(k / max_k) <= math.ceil(m_small / max_k)
    remaining = k if largest else m_small
    fill = float("-inf") if largest else float("inf")
    work = scores
    while True:
        m = min(max_k, remaining)
        vals, idx = torch.topk(work, m, dim=1, largest=largest, sorted=True)
        remaining -= m
        if remaining == 0:
            return vals[:, m - 1 : m]
        work = torch.scatter(work, 1, idx, torch.full_like(vals, fill))


def _check_static(k: int, n: int, max_k: int) -> None:
    for name, v in (("k", k), ("n", n), ("max_k", max_k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be a Python int (static shape), got {type(v).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must satisfy 1 <= k <= N={n}")
    if max_k < 1:
        raise ValueError(f"max_k={max_k} must be >= 1")
    if n >= _MAX_N:
        raise ValueError(f"N={n} too large: float CumSum positions are exact only for N < 2**24")
