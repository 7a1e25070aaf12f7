"""Shared machinery of the adapters (SD3, Flux, PixArt, DiT): the model keeps its own forward;
only routed blocks get an instance ``forward``, and the router context is captured with hooks.

Everything installed is recorded in the routing state so :func:`remove_overrides` undoes it exactly:
block attributes live in each block's ``__dict__`` (plain attributes, not submodules, deep-copied with the
model), hooks are recorded as ``(submodule name, hook id, kind)``.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Sequence

import torch
from torch import nn

from shiva_export.prune.api import router_bank, routing_state
from shiva_export.prune.topk import gather_tokens, scatter_tokens, select_topk, static_k

__all__ = [
    "OWNER",
    "INDEX",
    "install_overrides",
    "add_hook",
    "remove_overrides",
    "hook_state",
    "block_context",
    "route_tokens",
    "phase_timestep",
    "rows_of",
    "bound_args",
]

OWNER = "_shiva_owner"
INDEX = "_shiva_block_index"


def install_overrides(transformer: nn.Module, blocks: Sequence[nn.Module], routed_forward: Callable) -> None:
    """Gives every routed block (flat index ``i``) the instance forward ``routed_forward(block, ...)``."""
    state = routing_state(transformer)
    for i, block in enumerate(blocks):
        if state.config.keep_ratios[i] is None:
            continue
        object.__setattr__(block, OWNER, transformer)  # plain attribute: not a submodule
        object.__setattr__(block, INDEX, i)
        block.forward = types.MethodType(routed_forward, block)


def add_hook(transformer: nn.Module, name: str, fn: Callable, kind: str) -> None:
    """Registers a ``pre`` (with kwargs) or ``post`` forward hook on ``transformer.get_submodule(name)``."""
    mod = transformer.get_submodule(name)
    if mod is not transformer:
        object.__setattr__(mod, OWNER, transformer)  # so the hook finds the routing state (hook_state)
    h = mod.register_forward_pre_hook(fn, with_kwargs=True) if kind == "pre" else mod.register_forward_hook(fn)
    routing_state(transformer).handles.append((name, h.id))


def remove_overrides(transformer: nn.Module, blocks: Sequence[nn.Module]) -> None:
    state = routing_state(transformer)
    for name, hid in state.handles:
        mod = transformer.get_submodule(name)
        for d in (mod._forward_pre_hooks, mod._forward_pre_hooks_with_kwargs, mod._forward_hooks):
            d.pop(hid, None)
        if mod is not transformer:
            mod.__dict__.pop(OWNER, None)
    state.handles = []
    for block in blocks:
        for attr in ("forward", OWNER, INDEX):
            block.__dict__.pop(attr, None)


def hook_state(module: nn.Module):
    """The routing state a hook on ``module`` (the model or one of its submodules) writes to."""
    return routing_state(module.__dict__.get(OWNER, module))


def block_context(block: nn.Module):
    """``(owner transformer, flat block index, routing state, this call's ShivaConfig)`` of a routed block."""
    owner = block.__dict__[OWNER]
    state = routing_state(owner)
    return owner, block.__dict__[INDEX], state, state.call.get("config", state.config)


def rows_of(t, rows):
    """``t`` restricted to batch rows ``rows`` (``None``: all rows; non-tensors pass unchanged)."""
    if rows is None or not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    return t.index_select(0, rows)


def route_tokens(owner, index, state, config, hidden_states, temb, pooled, run_block: Callable, shared: bool = False):
    """Score, select, gather, ``run_block(kept, idx) -> (extra, kept_out)``, scatter; records the selection.

    ``run_block(tokens, idx, rows=None)`` runs the unmodified diffusers block on ``tokens`` (the image tokens
    at positions ``idx`` ``[b, k]``, or all of them when ``idx`` is None) of batch rows ``rows`` (None: all
    rows), with every other block input restricted to those rows. A training route override
    (``prune.api.set_route_override``) receives it and decides the selection itself.

    Args:
        shared (bool): One index set for the whole call (element-wise max of the rows' scores), for blocks
            whose per-token side inputs have no batch axis (Flux RoPE). Otherwise CFG halves share indices
            when ``config.cfg`` and every other row routes on its own scores.

    Returns:
        ``(extra, hidden_states)``: whatever ``run_block`` returned beside the kept tokens, and the full
        image-token tensor with the block's outputs scattered back (rejected tokens unchanged).
    """
    routers = router_bank(owner)
    if state.route_override is not None:
        return state.route_override(index, hidden_states, temb, pooled, run_block, shared, routers)
    n = int(hidden_states.shape[1])  # static N: int() bakes it in at trace time
    k = static_k(n, config.keep_ratios[index])
    scores = routers(index, hidden_states, temb, pooled)
    if shared:
        s = scores.amax(dim=0, keepdim=True) if scores.shape[0] > 1 else scores
        idx = select_topk(s, k, cfg=False, selection=config.selection).expand(hidden_states.shape[0], k)
    else:
        idx = select_topk(scores, k, cfg=config.cfg, selection=config.selection)
    kept = gather_tokens(hidden_states, idx)
    extra, kept_out = run_block(kept, idx)
    out = scatter_tokens(hidden_states, idx, kept_out)
    if state.recorder is not None:
        rec = {"block": index, "k": k, "indices": idx.detach(), "scores": scores.detach()}
        if state.record_hidden:
            rec.update(
                hidden_in=hidden_states.detach(),
                hidden_out=out.detach(),
                block_input=kept.detach(),
                temb=temb.detach(),
                pooled=pooled.detach(),
            )
        state.recorder.append(rec)
    return extra, out


def phase_timestep(t, scale: float):
    """The call's timestep on the 0..1000 phase scale."""
    return None if t is None else torch.as_tensor(t) * scale


_PARAMS: dict[type, list[str]] = {}


def bound_args(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """A forward pre-hook's ``(args, kwargs)`` as ``{parameter name: value}`` of ``type(module).forward``."""
    cls = type(module)
    if cls not in _PARAMS:
        _PARAMS[cls] = list(inspect.signature(cls.forward).parameters)[1:]
    return dict(zip(_PARAMS[cls], args)) | kwargs
