"""Analytic FLOP counts of any architecture, and the ideal speedup they imply.

The counting convention (what is counted, per sample or per model batch) is in :mod:`shiva_export.models.flops`.

Every architecture's formula lives in its adapter (``ModelAdapter.count_flops``; SD3's term table is
the comment above ``FLOP_TERMS`` in ``models/sd3.py``), all of them returning a
:class:`~shiva_export.models.flops.FlopCount`. This module asks the adapter (:func:`count_model_flops`)
and compares two counts (:func:`ideal_speedup`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shiva_export.errors import ConfigError
from shiva_export.models.base import get_adapter
from shiva_export.models.flops import FlopCount

__all__ = ["FlopCount", "count_model_flops", "ideal_speedup"]


def ideal_speedup(dense: FlopCount, pruned: FlopCount) -> float:
    """FLOP ratio ``dense.total / pruned.total``: the speedup if time were proportional to FLOPs.

    Args:
        dense (FlopCount): The reference count (usually ``keep_ratios=None``).
        pruned (FlopCount): The pruned count at the same shapes.

    Raises:
        ConfigError: The two counts are for different token counts or batch sizes.
    """
    a = (dense.num_image_tokens, dense.text_len, dense.batch)
    b = (pruned.num_image_tokens, pruned.text_len, pruned.batch)
    if a != b:
        raise ConfigError(
            f"ideal_speedup compares counts at different shapes: (N, T, batch) = {a} vs {b}. They must match. "
            "Count both at the same image size, text length and batch."
        )
    return dense.total / pruned.total


def count_model_flops(
    model_or_architecture: Any,
    config: Any,
    num_image_tokens: int,
    text_len: int,
    keep_ratios: Sequence[float | None] | None = None,
    *,
    batch: int = 1,
    bottleneck: int = 64,
    context: str = "drop",
) -> FlopCount:
    """The FLOPs of one forward of any architecture: the adapter of ``model_or_architecture`` (a transformer, a
    class name or a recipe ``architecture`` key) counts ``config`` (a config dict or diffusers config)."""
    return get_adapter(model_or_architecture).count_flops(
        config, num_image_tokens, text_len, keep_ratios, batch=batch, bottleneck=bottleneck, context=context
    )
