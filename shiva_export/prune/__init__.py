"""Shiva-DiT static top-k token pruning (PyTorch)."""

from shiva_export.prune.api import (
    ShivaConfig,
    apply_shiva_,
    block_budgets,
    is_shiva_applied,
    record_selection,
    remove_shiva_,
)
from shiva_export.prune.router import RouterBank, RouterConfig, ShivaRouter, load_routers, save_routers
from shiva_export.prune.topk import gather_tokens, scatter_tokens, select_topk, static_k

__all__ = [
    "ShivaConfig",
    "apply_shiva_",
    "remove_shiva_",
    "is_shiva_applied",
    "record_selection",
    "block_budgets",
    "RouterBank",
    "RouterConfig",
    "ShivaRouter",
    "load_routers",
    "save_routers",
    "select_topk",
    "static_k",
    "gather_tokens",
    "scatter_tokens",
]
