"""diffusers' own step caches (FirstBlockCache, TaylorSeer, MagCache) on torch pipelines, with or without
Shiva routing, and a counter of the transformer blocks that really ran.

API
---
``enable_cache(pipe, kind, **settings) -> dict``
    Switches one cache on for ``pipe.transformer`` (torch backend) with diffusers' real hook functions
    (``apply_first_block_cache``, ``apply_taylorseer_cache``, ``apply_mag_cache``). Returns the resolved
    settings (and, for MagCache without ``mag_ratios``, the ratios it calibrated). Kinds and settings
    (:data:`CACHE_KINDS`, defaults in :data:`DEFAULT_SETTINGS`):

    - ``"fbc"``: ``threshold`` (>= 0): skip blocks 1.. when block 0's residual changed by less than this
      (relative mean abs) since the last full step. 0 never skips.
    - ``"taylorseer"``: ``cache_interval`` (>= 1), ``disable_cache_before_step`` (>= 1),
      ``disable_cache_after_step`` (None or > before), ``max_order`` (>= 0), ``factors_dtype``
      (``fp32``/``fp16``/``bf16``). Every block is a Taylor-cached module: on a cached step no block runs and
      each block's output is the Taylor extrapolation of its last full outputs. ``cache_interval=1`` never skips.
    - ``"magcache"``: ``threshold``, ``max_skip_steps``, ``retention_ratio``, ``num_inference_steps`` (the
      steps every later call must run; default the recipe's), ``mag_ratios`` (one per step). Without
      ``mag_ratios`` the ratios are calibrated on the fly by one run of this pipeline in diffusers' calibration
      mode (nothing skipped) on ``calibration_prompt`` / ``calibration_guidance`` / ``calibration_seed``.

    Order: apply Shiva first (``load_pipeline(..., ratio=...)``), then the cache; ``apply_shiva_`` and
    ``remove_shiva_`` refuse a transformer that has a cache on. The cache state is reset after every pipeline
    call (diffusers' ``maybe_free_model_hooks``), so images do not depend on earlier calls.
``check_settings(kind, settings) -> dict``
    The settings over the kind's defaults, validated without a model (ConfigError), for checking a grid
    before loading anything.
``disable_cache(pipe)``
    Removes every hook :func:`enable_cache` installed; the transformer computes exactly as before.
``cache_info(pipe) -> dict | None``
    What :func:`enable_cache` returned, or None.
``count_executed_blocks(pipe)``
    Context manager yielding a list that fills with one record per transformer call::

        {"call": i, "blocks_run": [block indices], "keep": {block: keep ratio, 1.0 when dense},
         "routed": [blocks that ran routed], "batch": B, "num_image_tokens": N, "text_len": T}

    A block counts when its own forward ran (a probe sits below the cache's hooks, above Shiva's routing),
    so blocks a cache skipped are absent and a cache's probe block is present.
``executed_flops(records, pipe) -> ExecutedFlops``
    Analytic FLOPs (the adapter's ``count_flops`` convention) of what the records ran: per call the
    model-level terms (embeddings, output head) plus each executed block at its keep (router included when
    routed), against the same calls run dense. Records of one pipeline call = FLOPs of one image.

:data:`DEFAULT_GRID` holds the settings that span about 30 %..80 % of dense compute on ``sd35-shapes``
(28 steps, CFG 2.0), the default grid of a quality/compute frontier (measured numbers beside it).

Why the adapters are involved: SD3's pipeline sets no cache context and its transformer has no ``CacheMixin``,
so the context and the per-call reset come from hooks installed here; SD3's last block returns ``None`` text
states, which diffusers' FirstBlockCache tail hook subtracts (the TypeError of issue 17), fixed below the cache
by ``SD3Adapter.prepare_cache``; diffusers' default TaylorSeer identifiers (``^transformer_blocks.*attn``)
catch only SD3's joint ``attn`` (not SD3.5's ``attn2`` nor the FFNs), so every block still ran: here every
*block* is the cached module, which also composes with routing (inside a routed block the attention sees a
kept-token subset that changes between steps, which an attention-level Taylor cache would misalign).
"""

from __future__ import annotations

import functools
import math
import re
import time
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from shiva_export.errors import ConfigError, ShivaInternalError
from shiva_export.logging import get_logger
from shiva_export.models._override import bound_args
from shiva_export.models.base import CACHE_FIX_HOOK, get_adapter
from shiva_export.prune.api import routing_state
from shiva_export.runtime.generate import run_pipeline

__all__ = [
    "CACHE_KINDS",
    "DEFAULT_SETTINGS",
    "DEFAULT_GRID",
    "ExecutedFlops",
    "check_settings",
    "enable_cache",
    "disable_cache",
    "cache_info",
    "count_executed_blocks",
    "executed_flops",
]

logger = get_logger(__name__)

CACHE_KINDS = ("fbc", "taylorseer", "magcache")

#: Settings of each kind and their defaults (diffusers' defaults, except TaylorSeer's factors in fp32).
DEFAULT_SETTINGS: dict[str, dict[str, Any]] = {
    "fbc": {"threshold": 0.05},
    "taylorseer": {
        "cache_interval": 5,
        "disable_cache_before_step": 3,
        "disable_cache_after_step": None,
        "max_order": 1,
        "factors_dtype": "fp32",
    },
    "magcache": {
        "threshold": 0.06,
        "max_skip_steps": 3,
        "retention_ratio": 0.2,
        "num_inference_steps": None,
        "mag_ratios": None,
        "calibration_prompt": None,
        "calibration_guidance": None,
        "calibration_seed": 0,
    },
}

#: ``(kind, settings)`` spanning ~35..85 % of dense FLOPs on sd35-shapes, the default grid of a quality/compute
#: frontier. Fraction of dense FLOPs / mean PSNR vs dense (dB), 8 captions, seed 1, CFG 2.0, at 28 steps
#: (scripts/measure_caches.py) and, in brackets, at the 14-step knee (24 captions, `validate frontier`):
#: fbc 0.12: 0.53 / 47.0 [0.72 / 54.5], 0.2: 0.39 / 37.3 [0.54 / 38.8];
#: taylorseer interval 2: 0.54 / 54.3 [0.57 / 48.7], 5: 0.29 / 42.5 [0.36 / 37.8] (3 warm-up steps);
#: magcache (ratios calibrated on the fly) 0.06: 0.72 / 57.0 [0.86 / 54.3], 0.2: 0.50 / 50.6 [0.50 / 48.0].
#: Milder settings (fbc 0.05 / 0.08: 0.78 / 0.63 at 28 steps, 1.00 / 0.96 at 14) skip almost nothing at the knee.
#: MagCache entries need ``num_inference_steps`` = the run's steps when it differs from the recipe's.
DEFAULT_GRID: tuple[tuple[str, dict[str, Any]], ...] = (
    ("fbc", {"threshold": 0.12}),
    ("fbc", {"threshold": 0.2}),
    ("taylorseer", {"cache_interval": 2, "disable_cache_before_step": 3}),
    ("taylorseer", {"cache_interval": 5, "disable_cache_before_step": 3}),
    ("magcache", {"threshold": 0.06}),
    ("magcache", {"threshold": 0.2}),
)

_CACHE_ATTR = "_shiva_cache"
_PROBE_HOOK = "shiva_exec_probe"
_CONTEXT_NAME = "default"  # one context per call: SD3/PixArt batch [uncond; cond] into one call
_DTYPES = ("fp32", "fp16", "bf16")


# -- settings -----------------------------------------------------------------------------------------------
def _bad(kind: str, name: str, value: Any, want: str) -> ConfigError:
    return ConfigError(f"cache {kind!r} setting {name} = {value!r} is invalid; expected {want}. Fix the setting.")


def _num(kind: str, name: str, v: Any, *, integer: bool, lo: float, hi: float = math.inf, none_ok: bool = False) -> Any:
    if v is None and none_ok:
        return None
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not (lo <= v <= hi) or (not integer and not math.isfinite(v)):
        span = f"{lo:g}..{hi:g}" if math.isfinite(hi) else f">= {lo:g}"
        raise _bad(kind, name, v, f"{'an integer' if integer else 'a number'} {span}" + (" or None" if none_ok else ""))
    return v


def check_settings(kind: str, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` over the kind's defaults, validated (no model needed). ConfigError on an unknown kind,
    an unknown setting name or a value out of range."""
    if kind not in DEFAULT_SETTINGS:
        raise ConfigError(f"cache kind {kind!r} is unknown; choose one of {', '.join(CACHE_KINDS)}.")
    unknown = sorted(set(settings) - set(DEFAULT_SETTINGS[kind]))
    if unknown:
        raise ConfigError(
            f"cache {kind!r} has no setting {', '.join(unknown)}; its settings are {', '.join(DEFAULT_SETTINGS[kind])}."
        )
    s = {**DEFAULT_SETTINGS[kind], **settings}
    if kind == "fbc":
        _num(kind, "threshold", s["threshold"], integer=False, lo=0.0)
    elif kind == "taylorseer":
        _num(kind, "cache_interval", s["cache_interval"], integer=True, lo=1)
        # step 0 must compute: diffusers predicts from step 0 on when this is 0 and has nothing to predict from
        _num(kind, "disable_cache_before_step", s["disable_cache_before_step"], integer=True, lo=1)
        _num(
            kind,
            "disable_cache_after_step",
            s["disable_cache_after_step"],
            integer=True,
            lo=s["disable_cache_before_step"] + 1,
            none_ok=True,
        )
        _num(kind, "max_order", s["max_order"], integer=True, lo=0, hi=8)
        if s["factors_dtype"] not in _DTYPES:
            raise _bad(kind, "factors_dtype", s["factors_dtype"], f"one of {', '.join(_DTYPES)}")
    else:
        _check_magcache(kind, s)
    return s


def _check_magcache(kind: str, s: dict[str, Any]) -> None:
    _num(kind, "threshold", s["threshold"], integer=False, lo=0.0)
    _num(kind, "max_skip_steps", s["max_skip_steps"], integer=True, lo=0)
    _num(kind, "retention_ratio", s["retention_ratio"], integer=False, lo=0.0, hi=1.0)
    _num(kind, "num_inference_steps", s["num_inference_steps"], integer=True, lo=1, hi=1000, none_ok=True)
    _num(kind, "calibration_guidance", s["calibration_guidance"], integer=False, lo=0.0, none_ok=True)
    _num(kind, "calibration_seed", s["calibration_seed"], integer=True, lo=0)
    if s["calibration_prompt"] is not None and not isinstance(s["calibration_prompt"], str):
        raise _bad(kind, "calibration_prompt", s["calibration_prompt"], "a string or None")
    r = s["mag_ratios"]
    if r is not None:
        r = [float(x) for x in r] if isinstance(r, Sequence) and not isinstance(r, str) else None
        if not r or not all(math.isfinite(x) and x > 0 for x in r):
            raise _bad(
                kind,
                "mag_ratios",
                s["mag_ratios"],
                "a non-empty list of positive numbers (one per step) or None (calibrate)",
            )
        s["mag_ratios"] = r


# -- hooks --------------------------------------------------------------------------------------------------
@functools.cache
def _probe_class():
    from diffusers.hooks import ModelHook

    class ExecProbe(ModelHook):
        """Registered first on a block, so it runs only when every cache hook above it calls through."""

        def __init__(self, index: int):
            super().__init__()
            self.index = index
            self.sink = None

        def pre_forward(self, module, *args, **kwargs):
            if self.sink is not None:
                self.sink(self.index)
            return args, kwargs

    return ExecProbe


def _transformer(pipe) -> nn.Module:
    tr = getattr(pipe, "transformer", None)
    if tr is None:
        raise ConfigError(f"caches need a diffusers pipeline with a transformer; got a {type(pipe).__name__}.")
    from shiva_export.runtime.modules import (
        ShivaArtifactTransformer,  # lazy: shiva_export.runtime.modules defines it on first access (module __getattr__ imports diffusers)
    )

    if isinstance(tr, ShivaArtifactTransformer):
        raise ConfigError(
            f"caches hook the torch transformer's blocks; this pipeline runs {tr.backend} graphs. Load it with backend='torch'."
        )
    return tr


def _blocks(tr: nn.Module):
    adapter = get_adapter(tr)
    return adapter, adapter.blocks(tr)


def _foreign_hooks(blocks) -> list[str]:
    reg = [getattr(b, "_diffusers_hook", None) for b in blocks]
    return sorted({name for r in reg if r is not None for name in r.hooks if name != _PROBE_HOOK})


def _apply_fn(kind: str):
    from diffusers.hooks import apply_first_block_cache, apply_mag_cache, apply_taylorseer_cache

    return {"fbc": apply_first_block_cache, "taylorseer": apply_taylorseer_cache, "magcache": apply_mag_cache}[kind]


def _hook_names(kind: str) -> tuple[str, ...]:
    from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
    from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

    return {
        "fbc": (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK),
        "taylorseer": (_TAYLORSEER_CACHE_HOOK,),
        "magcache": (_MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK),
    }[kind]


def _diffusers_config(kind: str, s: dict[str, Any], tr: nn.Module, blocks):
    import torch
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    if kind == "fbc":
        return FirstBlockCacheConfig(threshold=float(s["threshold"]))
    if kind == "taylorseer":
        names = {id(m): n for n, m in tr.named_modules()}
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[s["factors_dtype"]]
        return TaylorSeerCacheConfig(
            cache_interval=s["cache_interval"],
            disable_cache_before_step=s["disable_cache_before_step"],
            disable_cache_after_step=s["disable_cache_after_step"],
            max_order=s["max_order"],
            taylor_factors_dtype=dtype,
            cache_identifiers=[re.escape(names[id(b)]) for b in blocks],  # every block, matched by its exact name
        )
    return MagCacheConfig(
        threshold=float(s["threshold"]),
        max_skip_steps=s["max_skip_steps"],
        retention_ratio=float(s["retention_ratio"]),
        num_inference_steps=s["num_inference_steps"],
        mag_ratios=s["mag_ratios"],
        calibrate=s["mag_ratios"] is None,
    )


def _check_registered(kind: str, blocks) -> None:
    if kind == "taylorseer":
        return  # TaylorSeer wraps modules by name and needs no block metadata
    from diffusers.hooks._helpers import TransformerBlockRegistry

    for cls in {type(b) for b in blocks}:
        try:
            TransformerBlockRegistry.get(cls)
        except ValueError:
            raise ConfigError(
                f"cache {kind!r}: diffusers has no block metadata for {cls.__name__}, so its hooks cannot wrap it; use 'taylorseer'."
            ) from None


def _install(tr: nn.Module, adapter, blocks, kind: str, config) -> dict[str, Any]:
    """Probes, the adapter's fixes, the diffusers cache, the per-call context and the per-image reset."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.hooks import CacheContext, _set_cache_context
    from diffusers.models.cache_utils import CacheMixin

    probe = _probe_class()
    for i, block in enumerate(blocks):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(probe(i), _PROBE_HOOK)
    adapter.prepare_cache(tr)
    _apply_fn(kind)(tr, config)
    HookRegistry.check_if_exists_or_initialize(tr).invalidate_child_registries_cache()
    handles = []
    if not adapter.PIPELINE_SETS_CACHE_CONTEXT:
        handles.append(
            tr.register_forward_pre_hook(
                lambda m, a, k: _set_cache_context(m, CacheContext(_CONTEXT_NAME)), with_kwargs=True
            )
        )
        handles.append(
            tr.register_forward_hook(lambda m, a, k, o: _set_cache_context(m, None), with_kwargs=True, always_call=True)
        )
    if isinstance(tr, CacheMixin):
        tr._cache_config = config  # diffusers' own bookkeeping agrees (is_cache_enabled, its reset after each call)
    else:
        # DiffusionPipeline.maybe_free_model_hooks (end of every __call__) resets components that have this method
        object.__setattr__(tr, "_reset_stateful_cache", types.MethodType(CacheMixin._reset_stateful_cache, tr))
    return {"handles": handles}


def _uninstall(tr: nn.Module, kind: str, handles) -> None:
    from diffusers.models.cache_utils import CacheMixin

    for h in handles:
        h.remove()
    _remove_hooks(
        tr, (*_hook_names(kind), CACHE_FIX_HOOK, _PROBE_HOOK)
    )  # outermost first: each removal is the chain's end
    if isinstance(tr, CacheMixin):
        tr._cache_config = None
    else:
        tr.__dict__.pop("_reset_stateful_cache", None)


def _remove_hooks(tr: nn.Module, names) -> None:
    """Removes the named diffusers hooks under ``tr`` and then every registry left empty, so the modules are
    exactly as before (diffusers leaves the class forward bound on the instance and the empty registry)."""
    from diffusers.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(tr)
    for name in names:
        registry.remove_hook(name, recurse=True)
    for module in tr.modules():
        reg = module.__dict__.get("_diffusers_hook")
        if reg is None or reg.hooks:
            continue
        f = module.__dict__.get("forward")
        if getattr(f, "__func__", None) is type(module).forward and f.__self__ is module:
            del module.__dict__["forward"]  # the registry left the class forward bound on the instance
        del module.__dict__["_diffusers_hook"]
    if "_diffusers_hook" in tr.__dict__:
        registry.invalidate_child_registries_cache()


# -- public API ---------------------------------------------------------------------------------------------
def enable_cache(pipe, kind: str, **settings: Any) -> dict[str, Any]:
    """Switches on one diffusers cache for ``pipe.transformer`` (see the module docstring for kinds and settings).

    Returns:
        dict: ``{"kind", "settings"}`` as resolved, plus ``"calibration"`` when MagCache calibrated its ratios.
    """
    s = check_settings(kind, settings)
    tr = _transformer(pipe)
    if _CACHE_ATTR in tr.__dict__:
        raise ConfigError(
            f"a {tr.__dict__[_CACHE_ATTR]['kind']!r} cache is already on; call disable_cache(pipe) first."
        )
    adapter, blocks = _blocks(tr)
    foreign = _foreign_hooks(blocks)
    if foreign:
        raise ConfigError(
            f"the transformer's blocks already carry diffusers hooks ({', '.join(foreign)}); remove them (transformer.disable_cache()) first."
        )
    _check_registered(kind, blocks)
    info: dict[str, Any] = {"kind": kind}
    if kind == "magcache":
        recipe = getattr(getattr(pipe, "shiva", None), "recipe", None)
        if s["num_inference_steps"] is None:
            s["num_inference_steps"] = recipe.pipeline.steps if recipe is not None else 28
        if s["mag_ratios"] is None:
            s["mag_ratios"], info["calibration"] = _calibrate(pipe, tr, adapter, blocks, s, recipe)
    config = _diffusers_config(kind, s, tr, blocks)
    try:
        installed = _install(tr, adapter, blocks, kind, config)
    except (ValueError, TypeError) as err:
        _uninstall(tr, kind, [])
        raise ConfigError(f"cache {kind!r} cannot be applied to {type(tr).__name__}: {err}") from None
    info["settings"] = s
    object.__setattr__(tr, _CACHE_ATTR, {**info, **installed})
    _reset(tr)
    logger.info("cache %s on: %s", kind, s)
    return dict(info)


def disable_cache(pipe) -> None:
    """Removes the cache :func:`enable_cache` installed (ConfigError when none is on)."""
    tr = _transformer(pipe)
    state = tr.__dict__.get(_CACHE_ATTR)
    if state is None:
        raise ConfigError("no cache is on for this pipeline; nothing to disable.")
    _uninstall(tr, state["kind"], state["handles"])
    del tr.__dict__[_CACHE_ATTR]


def cache_info(pipe) -> dict[str, Any] | None:
    """What :func:`enable_cache` returned for the cache that is on, or None."""
    state = _transformer(pipe).__dict__.get(_CACHE_ATTR)
    return None if state is None else {k: v for k, v in state.items() if k != "handles"}


def _reset(tr: nn.Module) -> None:
    from diffusers.hooks import HookRegistry

    HookRegistry.check_if_exists_or_initialize(tr).reset_stateful_hooks(recurse=True)


def _calibrate(pipe, tr, adapter, blocks, s: dict[str, Any], recipe) -> tuple[list[float], dict[str, Any]]:
    """MagCache ratios from one run of ``pipe`` in diffusers' calibration mode (every block runs).

    diffusers prints the ratios and clears them at step ``num_inference_steps``; the calibration config asks
    for one step more than the run, so that never happens, and the ratios are read after each call instead.
    """
    from diffusers.hooks import MagCacheConfig
    from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK

    steps = s["num_inference_steps"]
    prompt = s["calibration_prompt"] or adapter.EXAMPLE_PROMPT
    guidance = (
        s["calibration_guidance"]
        if s["calibration_guidance"] is not None
        else (recipe.pipeline.guidance if recipe is not None else 4.5)
    )
    installed = _install(tr, adapter, blocks, "magcache", MagCacheConfig(calibrate=True, num_inference_steps=steps + 1))
    tail = blocks[-1]
    hook = tail._diffusers_hook.get_hook(_MAG_CACHE_BLOCK_HOOK)
    if hook is None or not hook.is_tail:
        _uninstall(tr, "magcache", installed["handles"])
        raise ShivaInternalError("MagCache's tail hook is not on the adapter's last block")
    seen: list[float] = []
    h = tail.register_forward_hook(
        lambda m, a, o: seen.__setitem__(slice(None), hook.state_manager.get_state().calibration_ratios)
    )
    t0 = time.perf_counter()
    try:
        run_pipeline(pipe, prompt, steps=steps, guidance=guidance, seed=s["calibration_seed"])
    finally:
        h.remove()
        _uninstall(tr, "magcache", installed["handles"])
    if len(seen) != steps:
        raise ShivaInternalError(f"MagCache calibration recorded {len(seen)} ratios in a {steps}-step run")
    ratios = [float(x) for x in seen]
    return ratios, {
        "prompt": prompt,
        "guidance": guidance,
        "seed": s["calibration_seed"],
        "steps": steps,
        "seconds": round(time.perf_counter() - t0, 3),
        "mag_ratios": ratios,
    }


# -- executed blocks and their FLOPs ------------------------------------------------------------------------
class count_executed_blocks:
    """Context manager: one record per transformer call of the blocks whose forward really ran.

    Example:
        >>> with count_executed_blocks(pipe) as records:
        ...     pipe("a red cube", num_inference_steps=28)
        >>> executed_flops(records, pipe).fraction      # of the same calls run dense

    Args:
        pipe: A torch pipeline (a cache on or not). Blocks are counted by probes below any cache hook;
            without a cache on, temporary probes are installed and removed on exit.
    """

    def __init__(self, pipe):
        self._tr = _transformer(pipe)
        self.records: list[dict[str, Any]] = []
        self._temporary = False
        self._handle = None

    def __enter__(self) -> list[dict[str, Any]]:
        from diffusers.hooks import HookRegistry

        tr = self._tr
        self._adapter, self._blocks = _blocks(tr)
        self._temporary = _CACHE_ATTR not in tr.__dict__
        if self._temporary:
            foreign = _foreign_hooks(self._blocks)
            if foreign:  # a probe registered now would sit above them and count blocks they skip
                raise ConfigError(
                    f"the blocks carry diffusers hooks ({', '.join(foreign)}) not installed by enable_cache; "
                    "switch caches on with shiva_export.runtime.caches.enable_cache to count executed blocks."
                )
            for i, block in enumerate(self._blocks):
                HookRegistry.check_if_exists_or_initialize(block).register_hook(_probe_class()(i), _PROBE_HOOK)
        for block in self._blocks:
            block._diffusers_hook.get_hook(_PROBE_HOOK).sink = self._on_block
        self._handle = tr.register_forward_pre_hook(self._on_call, with_kwargs=True)
        return self.records

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        for block in self._blocks:
            block._diffusers_hook.get_hook(_PROBE_HOOK).sink = None
        if self._temporary:
            _remove_hooks(self._tr, (_PROBE_HOOK,))

    def _on_call(self, module, args, kwargs) -> None:
        bound = bound_args(module, args, kwargs)
        geo = self._adapter.call_geometry(module.config, bound)
        n = self._adapter.num_image_tokens(module.config, geo["height"], geo["width"])
        self.records.append(
            {
                "call": len(self.records),
                "blocks_run": [],
                "keep": {},
                "routed": [],
                "batch": int(bound["hidden_states"].shape[0]),
                "num_image_tokens": int(n),
                "text_len": geo["text_len"],
            }
        )

    def _on_block(self, index: int) -> None:
        if not self.records:
            return  # a block called outside a transformer call
        rec = self.records[-1]
        state = routing_state(self._tr)
        keep = None if state is None else state.call.get("config", state.config).keep_ratios[index]
        rec["blocks_run"].append(index)
        rec["keep"][index] = 1.0 if keep is None else float(keep)
        if keep is not None:
            rec["routed"].append(index)


@dataclass(frozen=True)
class ExecutedFlops:
    """FLOPs of the transformer calls in a list of :class:`count_executed_blocks` records.

    Args:
        total (int): FLOPs that ran: per call the model-level terms plus each executed block at its keep
            (its router included when routed).
        dense_total (int): FLOPs of the same calls run dense (every block, no router, no cache).
        calls (int): Transformer calls.
        blocks_run (int): Block executions.
        blocks_dense (int): ``calls x blocks``.
    """

    total: int
    dense_total: int
    calls: int
    blocks_run: int
    blocks_dense: int

    @property
    def fraction(self) -> float:
        """``total / dense_total``: the fraction of dense compute that ran."""
        return self.total / self.dense_total if self.dense_total else 0.0

    @property
    def block_fraction(self) -> float:
        return self.blocks_run / self.blocks_dense if self.blocks_dense else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "dense_total": self.dense_total,
            "fraction": self.fraction,
            "calls": self.calls,
            "blocks_run": self.blocks_run,
            "blocks_dense": self.blocks_dense,
            "block_fraction": self.block_fraction,
        }


def executed_flops(records: Sequence[dict[str, Any]], pipe) -> ExecutedFlops:
    """Analytic FLOPs of what ``records`` ran on ``pipe.transformer`` (its adapter's ``count_flops``)."""
    tr = _transformer(pipe)
    adapter, blocks = _blocks(tr)
    n_blocks = len(blocks)
    state = routing_state(tr)
    bottleneck = state.config.bottleneck if state is not None else 64
    context = state.config.context if state is not None else "drop"  # kept context costs its extra K/V projections
    counts: dict[tuple, Any] = {}

    def count(keeps, rec):
        # architectures without text (DiT) report text_len None: they count no text tokens either way
        key = (keeps, rec["num_image_tokens"], rec["text_len"], rec["batch"])
        if key not in counts:
            counts[key] = adapter.count_flops(
                tr.config,
                rec["num_image_tokens"],
                rec["text_len"] or 1,
                keeps,
                batch=rec["batch"],
                bottleneck=bottleneck,
                context=context if keeps is not None else "drop",
            )
        return counts[key]

    total = dense = run = 0
    for rec in records:
        routed = set(rec["routed"])
        keeps = tuple(rec["keep"][i] if i in routed else None for i in range(n_blocks)) if routed else None
        c = count(keeps, rec)
        total += c.model_level_total + sum(sum(c.blocks[i].values()) for i in rec["blocks_run"])
        dense += count(None, rec).total
        run += len(rec["blocks_run"])
    return ExecutedFlops(total, dense, len(records), run, len(records) * n_blocks)
