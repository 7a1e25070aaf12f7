"""Apply and remove Shiva token pruning on a diffusers transformer, in place and reversibly.

:func:`apply_shiva_` attaches a :class:`~shiva_export.prune.router.RouterBank` as the submodule
``transformer.shiva_routers`` and a :class:`RoutingState`, then lets the model's adapter install the routing:
every adapter replaces only the routed blocks' ``forward`` (on the instance) and captures the router context
with a forward pre-hook on the model. :func:`remove_shiva_` undoes both, so the class's own forward (and its
exact outputs) come back.

This package sits below ``shiva_export.models`` (docs/architecture.md): it never imports an adapter. The
adapter is passed in (``apply_shiva_(..., adapter=)``) or found through the lookup the models package
registers on import (:func:`register_adapter_lookup`). Adapters read and write the routing state through the
public :func:`routing_state`, :func:`router_bank` and :meth:`RoutingState.call_config`.

Per routed block with keep ratio ``r`` and N image tokens (``k = floor(N r)``, a Python int):
score tokens with the router -> ``TopK(k)`` -> sort indices by position -> gather the kept tokens ->
run the unmodified diffusers block on them with *all* text tokens -> scatter the block's outputs back.
Rejected tokens pass through unchanged (identity). Block 0 is always dense.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from shiva_export.errors import ConfigError, ShivaInternalError
from shiva_export.logging import get_logger
from shiva_export.prune.router import RouterBank, RouterConfig
from shiva_export.prune.schedule import call_timestep, check_phases, phase_index
from shiva_export.prune.topk import SELECTIONS, static_k

__all__ = [
    "CONTEXTS",
    "ShivaConfig",
    "check_context",
    "apply_shiva_",
    "remove_shiva_",
    "is_shiva_applied",
    "record_selection",
    "block_budgets",
    "set_route_override",
    "set_shiva_config_",
    "set_shiva_phases_",
    "shiva_config",
    "phase_trace",
    "RoutingState",
    "routing_state",
    "router_bank",
    "set_router_bank_",
    "register_adapter_lookup",
]

logger = get_logger(__name__)

ROUTERS_ATTR = "shiva_routers"
_STATE_ATTR = "_shiva_state"

#: What a routed block does with its rejected tokens' context: ``"drop"`` (the paper: they leave the block
#: entirely) or ``"keep"`` (RAS / ToCa style: they still give keys and values, only their queries, attention
#: output and MLP are skipped; adapters that support it list it in ``ModelAdapter.CONTEXT_MODES``).
CONTEXTS = ("drop", "keep")


@dataclass(frozen=True)
class ShivaConfig:
    """What to prune: a keep ratio per block.

    Args:
        keep_ratios (tuple[float | None, ...]): One entry per transformer block: ``None`` for a dense
            (unrouted) block, else the fraction of image tokens the block keeps, in (0, 1]. Block 0 must
            be ``None`` (First-Block Skip). ``1.0`` routes a block through the full top-k/gather/scatter
            path with ``k = N``.
        cfg (bool): The batch holds ``[uncond; cond]`` halves that share kept indices. Defaults to False.
        bottleneck (int): Router width d'. Defaults to 64.
        group_size (int): Adjacent routed blocks per router. Defaults to 2.
        selection (str): ``"bounded"`` exact top-k with every TopK K <= 3840 and a backend-independent
            tie rule (lower position wins), or ``"topk"`` (plain torch.topk + sort). Defaults to ``"bounded"``.
        context (str): ``"drop"``: rejected tokens leave the block (kept tokens attend to kept and text
            tokens only). ``"keep"``: rejected tokens still contribute keys and values from their current
            hidden states (attention over all N image tokens + text; queries, attention output and MLP
            only for the kept ones). Defaults to ``"drop"``.

    Example:
        >>> cfg = ShivaConfig.uniform(num_layers=24, ratio=0.4)   # keep 60% in blocks 1..23
        >>> cfg.keep_ratios[:3]
        (None, 0.6, 0.6)
    """

    keep_ratios: tuple[float | None, ...]
    cfg: bool = False
    bottleneck: int = 64
    group_size: int = 2
    selection: str = "bounded"
    context: str = "drop"

    def __post_init__(self):
        kr = tuple(self.keep_ratios)
        object.__setattr__(self, "keep_ratios", kr)
        if not kr:
            raise ConfigError("keep_ratios is empty; give one entry per transformer block.")
        if kr[0] is not None:
            raise ConfigError(f"block 0 keep ratio is {kr[0]}; block 0 is always dense, set it to None.")
        for i, r in enumerate(kr):
            if r is not None and not (isinstance(r, (int, float)) and 0.0 < r <= 1.0 and math.isfinite(r)):
                raise ConfigError(
                    f"keep ratio of block {i} is {r!r}; expected 0 < keep_ratio <= 1 (or None for dense)."
                )
        if not self.routed_blocks:
            raise ConfigError("no block is routed; give at least one block a keep ratio.")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"selection {self.selection!r} is unknown; choose one of {SELECTIONS}.")
        check_context(self.context)

    @classmethod
    def uniform(
        cls,
        num_layers: int,
        ratio: float,
        routed_blocks: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> ShivaConfig:
        """Same pruning ratio in every routed block.

        Args:
            num_layers (int): Transformer blocks in the model.
            ratio (float): Fraction of image tokens pruned, in [0, 1); ``keep_ratio = 1 - ratio``.
            routed_blocks (Sequence[int]): Routed blocks. Defaults to ``1 .. num_layers - 1``.
        """
        if not (isinstance(ratio, (int, float)) and 0.0 <= ratio < 1.0):
            raise ConfigError(
                f"ratio {ratio!r} is out of range; expected 0 <= ratio < 1 (fraction of image tokens pruned)."
            )
        routed = list(range(1, num_layers)) if routed_blocks is None else list(routed_blocks)
        keep = 1.0 - ratio
        return cls(tuple(keep if i in routed else None for i in range(num_layers)), **kwargs)

    @property
    def routed_blocks(self) -> tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.keep_ratios) if r is not None)

    def router_config(self, hidden_dim: int, pooled_dim: int) -> RouterConfig:
        return RouterConfig(hidden_dim, pooled_dim, self.routed_blocks, self.bottleneck, self.group_size)

    def with_keep_ratios(self, keep_ratios: Sequence[float | None]) -> ShivaConfig:
        return replace(self, keep_ratios=tuple(keep_ratios))

    def to_dict(self) -> dict:
        return {
            "keep_ratios": list(self.keep_ratios),
            "cfg": self.cfg,
            "bottleneck": self.bottleneck,
            "group_size": self.group_size,
            "selection": self.selection,
            "context": self.context,
        }


def check_context(context: str) -> str:
    """``context`` if it is one of :data:`CONTEXTS`, else a one-line :class:`ConfigError`."""
    if context not in CONTEXTS:
        raise ConfigError(
            f"context {context!r} is unknown; choose one of {', '.join(CONTEXTS)} (--context keep|drop, recipe [prune] context)."
        )
    return context


def block_budgets(config: ShivaConfig, num_tokens: int) -> dict[int, int]:
    """``{block: k}`` for every routed block at ``num_tokens`` image tokens."""
    return {b: static_k(num_tokens, config.keep_ratios[b]) for b in config.routed_blocks}


@dataclass
class RoutingState:
    """What a Shiva-applied transformer carries besides its router bank (``routing_state(transformer)``).

    Adapters' hooks and routed blocks read ``config`` / ``call`` and write ``call`` (this call's schedule and
    context, set by the model's pre-hook through :meth:`call_config`) and ``handles``; the other fields belong
    to this module, training (``route_override``) and the runtime (``phases``, ``auto_cfg``, ``trace``).
    """

    config: ShivaConfig
    recorder: list | None = field(default=None)
    record_hidden: bool = False
    route_override: Any = None  # training: callable replacing route_tokens' selection (see set_route_override)
    phases: tuple | None = None  # runtime: ((TimestepPhase, ShivaConfig), ...) dispatched on the call's timestep
    auto_cfg: bool = False  # runtime: decide per call whether the batch is a CFG pair (see set_shiva_phases_)
    trace: list = field(default_factory=list)  # runtime: phase name of every call since set_shiva_phases_
    call: dict = field(default_factory=dict)  # block-override adapters: this call's config and context (pre-hook)
    handles: list = field(default_factory=list)  # block-override adapters: hook handles to remove
    adapter: Any = None  # the architecture adapter that installed the routing (remove_shiva_ asks the same one)

    def call_config(self, hidden_states: torch.Tensor, timestep, skip_layers=None) -> ShivaConfig:
        """The keep schedule of this call: the phase owning ``timestep``, and CFG as this call needs it
        (``skip_layers``: the call's skip-layer-guidance argument, which makes a batch not a CFG pair)."""
        if self.phases is None:
            return self.config
        i = phase_index([ph for ph, _ in self.phases], call_timestep(timestep))
        phase, config = self.phases[i]
        self.trace.append(phase.name)
        if self.auto_cfg:
            b = int(hidden_states.shape[0])
            pair = (
                skip_layers is None
                and b % 2 == 0
                and b > 0
                and torch.equal(hidden_states[: b // 2], hidden_states[b // 2 :])
            )
            if config.cfg != pair:
                config = replace(config, cfg=pair)
        return config


def is_shiva_applied(transformer: nn.Module) -> bool:
    return hasattr(transformer, _STATE_ATTR)


def routing_state(transformer: nn.Module) -> RoutingState | None:
    """The :class:`RoutingState` of a Shiva-applied transformer, or None when Shiva is not applied."""
    return transformer.__dict__.get(_STATE_ATTR)


def router_bank(transformer: nn.Module) -> nn.Module:
    """The router bank (or the scorer standing in for it) a Shiva-applied transformer routes with."""
    return transformer._modules[ROUTERS_ATTR]


def set_router_bank_(transformer: nn.Module, bank: nn.Module) -> nn.Module:
    """Routes a Shiva-applied transformer with ``bank`` (a RouterBank or any module with its call signature,
    e.g. a training-free scorer) from now on; returns the bank it replaced."""
    if not is_shiva_applied(transformer):
        raise ConfigError("set_router_bank_ needs a transformer with Shiva applied (apply_shiva_ or load_pipeline).")
    old = transformer._modules[ROUTERS_ATTR]
    transformer._modules[ROUTERS_ATTR] = bank
    return old


_ADAPTER_LOOKUP: list = []


def register_adapter_lookup(lookup) -> None:
    """Sets ``lookup(transformer) -> adapter``, the default when :func:`apply_shiva_` is given no adapter.

    ``shiva_export.models`` registers its ``get_adapter`` when it is imported; this package cannot import it
    (it lies below the models floor)."""
    _ADAPTER_LOOKUP[:] = [lookup]


def _adapter(transformer: nn.Module):
    if not _ADAPTER_LOOKUP:
        raise ConfigError(
            f"no architecture adapter for {type(transformer).__name__}: pass apply_shiva_(..., adapter=get_adapter(transformer)) "
            "with get_adapter from shiva_export.models (importing shiva_export.models also registers it as the default)."
        )
    return _ADAPTER_LOOKUP[0](transformer)  # get_adapter: a one-line ConfigError listing the supported classes


def apply_shiva_(
    transformer: nn.Module, config: ShivaConfig, routers: RouterBank | None = None, seed: int = 0, *, adapter=None
) -> RouterBank:
    """Applies Shiva pruning to ``transformer`` in place and returns its router bank.

    Args:
        transformer (nn.Module): A diffusers transformer with an adapter (``shiva_export.models``).
        config (ShivaConfig): Keep ratio per block.
        routers (RouterBank): Trained routers. Defaults to a seeded random bank (``seed``).
        seed (int): Seed of the random router init when ``routers`` is None. Defaults to 0.
        adapter (ModelAdapter): The transformer's architecture adapter. Defaults to the registered lookup
            (``shiva_export.models.get_adapter``).

    Example:
        >>> bank = apply_shiva_(transformer, ShivaConfig.uniform(get_adapter(transformer).num_blocks(transformer), 0.4))
        >>> out = transformer(**inputs).sample      # pruned forward
        >>> remove_shiva_(transformer)                # dense again, bit for bit
    """
    adapter = _adapter(transformer) if adapter is None else adapter
    n_blocks = adapter.num_blocks(transformer)
    if len(config.keep_ratios) != n_blocks:
        raise ConfigError(
            f"keep_ratios has {len(config.keep_ratios)} entries but the model has {n_blocks} blocks; give one per block."
        )
    if is_shiva_applied(transformer):
        raise ConfigError("Shiva is already applied to this transformer; call remove_shiva_(transformer) first.")
    _check_no_block_hooks(transformer, adapter, "apply_shiva_")
    adapter.check_context(config.context)
    rc = config.router_config(*adapter.router_dims(transformer))
    if routers is None:
        routers = RouterBank(rc)
        routers.reset_parameters(seed)
    elif routers.config != rc:
        raise ConfigError(f"router bank was built for {routers.config}, but this model/config needs {rc}.")
    ref = next(transformer.parameters())
    routers.to(device=ref.device)
    transformer.add_module(ROUTERS_ATTR, routers)
    object.__setattr__(transformer, _STATE_ATTR, RoutingState(config, adapter=adapter))
    try:
        adapter.install_routing(transformer)
    except Exception:  # e.g. a processor context "keep" cannot wrap: leave the model as it was
        transformer._modules.pop(ROUTERS_ATTR, None)
        object.__delattr__(transformer, _STATE_ATTR)
        raise
    logger.info("Shiva applied: %d routed blocks, %d routers", len(config.routed_blocks), rc.num_routers)
    return routers


def _check_no_block_hooks(transformer: nn.Module, adapter, what: str) -> None:
    """Routing replaces routed blocks' ``forward``; diffusers hooks (caches) wrap that same attribute, so
    they must be registered after routing and removed before it."""
    names = sorted(
        {n for b in adapter.blocks(transformer) for n in getattr(b.__dict__.get("_diffusers_hook"), "hooks", {})}
    )
    if names:
        raise ConfigError(
            f"{what}: the transformer's blocks carry diffusers hooks ({', '.join(names)}), e.g. a cache; routing must sit below them. "
            "Call shiva_export.runtime.caches.disable_cache(pipe) first and enable the cache again afterwards."
        )


def remove_shiva_(transformer: nn.Module) -> RouterBank:
    """Removes Shiva pruning in place (restores the class forward); returns the detached router bank."""
    if not is_shiva_applied(transformer):
        raise ConfigError("Shiva is not applied to this transformer; nothing to remove.")
    adapter = getattr(transformer, _STATE_ATTR).adapter
    _check_no_block_hooks(transformer, adapter, "remove_shiva_")
    adapter.remove_routing(transformer)
    bank = transformer._modules.pop(ROUTERS_ATTR)
    object.__delattr__(transformer, _STATE_ATTR)
    if "forward" in transformer.__dict__:
        raise ShivaInternalError("forward still overridden after remove_shiva_")
    return bank


class record_selection:
    """Context manager that records, per routed block, the kept indices and router scores.

    Example:
        >>> with record_selection(transformer) as rec:
        ...     transformer(**inputs)
        >>> rec[0]["block"], rec[0]["indices"].shape
        (1, torch.Size([2, 153]))

    Args:
        transformer (nn.Module): Transformer with Shiva applied.
        hidden_states (bool): Also record each routed block's image-token input (``hidden_in``), its
            output after the scatter (``hidden_out``), the kept tokens the block received
            (``block_input``) and the router context (``temb``, ``pooled``). Defaults to False.
    """

    def __init__(self, transformer: nn.Module, hidden_states: bool = False):
        if not is_shiva_applied(transformer):
            raise ConfigError("record_selection needs a transformer with Shiva applied (apply_shiva_).")
        self._state: RoutingState = getattr(transformer, _STATE_ATTR)
        self._hidden = hidden_states
        self.records: list[dict] = []

    def __enter__(self) -> list[dict]:
        self._state.recorder = self.records
        self._state.record_hidden = self._hidden
        return self.records

    def __exit__(self, *exc) -> None:
        self._state.recorder = None
        self._state.record_hidden = False


def _state(transformer: nn.Module, what: str) -> RoutingState:
    if not is_shiva_applied(transformer):
        raise ConfigError(f"{what} needs a transformer with Shiva applied (apply_shiva_).")
    return getattr(transformer, _STATE_ATTR)


def _check_same_routing(old: ShivaConfig, new: ShivaConfig) -> None:
    if len(new.keep_ratios) != len(old.keep_ratios) or new.routed_blocks != old.routed_blocks:
        raise ConfigError(
            f"the new keep schedule routes blocks {list(new.routed_blocks)}, the router bank serves {list(old.routed_blocks)}; "
            "a schedule can change keep ratios, not which blocks are routed. Re-apply Shiva for another block set."
        )
    if (new.bottleneck, new.group_size) != (old.bottleneck, old.group_size):
        raise ConfigError("the new config changes the router shape (bottleneck/group_size); re-apply Shiva instead.")
    if new.context != old.context:
        raise ConfigError(
            f"the new config changes context {old.context!r} -> {new.context!r}, which the installed routing fixes; re-apply Shiva instead."
        )


def shiva_config(transformer: nn.Module) -> ShivaConfig:
    """The keep schedule a Shiva-applied transformer runs when no phase schedule is set."""
    return _state(transformer, "shiva_config").config


def set_shiva_config_(transformer: nn.Module, config: ShivaConfig) -> None:
    """Switches the keep schedule of a Shiva-applied transformer in place (same routed blocks and router
    bank, other keep ratios or CFG flag). Clears a phase schedule set by :func:`set_shiva_phases_`."""
    state = _state(transformer, "set_shiva_config_")
    _check_same_routing(state.config, config)
    state.config = config
    state.phases = None
    state.auto_cfg = False


def set_shiva_phases_(transformer: nn.Module, phases, *, auto_cfg: bool = True) -> None:
    """Makes a Shiva-applied transformer pick its keep schedule per call from the call's timestep.

    Args:
        transformer (nn.Module): Transformer with Shiva applied.
        phases (Sequence[TimestepPhase]): Phases in sampling order (``shiva_export.prune.schedule``); each
            call runs the phase that owns ``timestep`` (every entry of the batch must be equal).
        auto_cfg (bool): Decide per call whether the batch is a classifier-free-guidance pair: it is when
            no ``skip_layers`` is given, the batch is even and both halves share the latent and timestep
            (the pipeline's ``torch.cat([latents] * 2)``). Only then do both halves keep the same tokens, so a
            ``guidance_scale <= 1`` call or a skip-layer-guidance call routes each row by its own scores.
            Defaults to True.

    Every call appends the phase name to :func:`phase_trace`. ``set_shiva_config_`` removes the schedule.
    """
    state = _state(transformer, "set_shiva_phases_")
    phases = check_phases(phases)
    table = []
    for ph in phases:
        cfg = state.config.with_keep_ratios(ph.keep_ratios)
        _check_same_routing(state.config, cfg)
        table.append((ph, cfg))
    state.phases = tuple(table)
    state.auto_cfg = bool(auto_cfg)
    state.trace = []


def phase_trace(transformer: nn.Module, clear: bool = False) -> list[str]:
    """Phase names of the calls since :func:`set_shiva_phases_` (``clear`` empties the record)."""
    state = _state(transformer, "phase_trace")
    out = list(state.trace)
    if clear:
        state.trace.clear()
    return out


def set_route_override(transformer: nn.Module, fn) -> None:
    """Installs (or with ``None`` removes) a callable that replaces the hard routing of every routed block.

    ``fn(index_block, hidden_states, temb, pooled, run_block, shared, routers) -> (extra, hidden_states)``
    (the protocol of :func:`shiva_export.models._override.route_tokens`). Training uses it to route through the
    differentiable top-k (``shiva_export.train``); inference and export never set it.
    """
    if not is_shiva_applied(transformer):
        raise ConfigError("set_route_override needs a transformer with Shiva applied (apply_shiva_).")
    getattr(transformer, _STATE_ATTR).route_override = fn
