"""diffusers' caches (FirstBlockCache, TaylorSeer, MagCache) on the embedded SD3.5 pipeline, alone and under
Shiva routing, and the executed-block counter (shiva_export.runtime.caches)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shiva_export.errors import ConfigError
from shiva_export.runtime import caches as C
from shiva_export.runtime.generate import run_pipeline
from shiva_export.runtime.pipeline import load_pipeline

STEPS = 8
N_BLOCKS = 6  # sd35-tiny
# sd35-tiny's block-0 residual changes by 0.38..0.48 (relative) between steps: 0.5 skips, 0 never does
FBC_SKIP = {"threshold": 0.5}
TS_SKIP = {"cache_interval": 2, "disable_cache_before_step": 2}
IDENTITY = [
    ("fbc", {"threshold": 0.0}),
    ("taylorseer", {"cache_interval": 1}),
    ("magcache", {"num_inference_steps": STEPS, "max_skip_steps": 0}),
]


@pytest.fixture(scope="module")
def pipes():
    torch.set_num_threads(1)
    return {
        "dense": load_pipeline("sd35-tiny", backend="torch", dense=True),
        "r0": load_pipeline("sd35-tiny", backend="torch", ratio=0.0),
        "r4": load_pipeline("sd35-tiny", backend="torch", ratio=0.4),
    }


def _run(pipe, prompt: str = "a red cube"):
    with C.count_executed_blocks(pipe) as records:
        image = run_pipeline(pipe, prompt, steps=STEPS, guidance=2.0, seed=1).image
    return image, records


def _cached(pipe, kind, settings, prompt: str = "a red cube"):
    C.enable_cache(pipe, kind, **settings)
    try:
        return _run(pipe, prompt)
    finally:
        C.disable_cache(pipe)


@pytest.fixture(scope="module")
def dense_run(pipes):
    return _run(pipes["dense"])


def _blocks_per_call(records):
    return [len(r["blocks_run"]) for r in records]


def test_counter_and_flops_of_plain_runs(pipes, dense_run):
    _, records = dense_run
    assert _blocks_per_call(records) == [N_BLOCKS] * STEPS
    assert records[0]["batch"] == 2 and records[0]["num_image_tokens"] == 256  # CFG pair, 256 px / 16 px tokens
    f = C.executed_flops(records, pipes["dense"])
    one = pipes["dense"].transformer.config
    from shiva_export.models import get_adapter

    per_call = get_adapter("sd3").count_flops(one, 256, records[0]["text_len"], batch=2).total
    assert f.total == f.dense_total == STEPS * per_call and f.fraction == 1.0
    _, routed = _run(pipes["r4"])
    assert all(
        r["keep"] == {0: 1.0, **{b: 0.6 for b in range(1, N_BLOCKS)}} and r["routed"] == [1, 2, 3, 4, 5] for r in routed
    )
    keeps = (None,) + (0.6,) * (N_BLOCKS - 1)
    pruned = get_adapter("sd3").count_flops(one, 256, records[0]["text_len"], keeps, batch=2).total
    assert C.executed_flops(routed, pipes["r4"]).total == STEPS * pruned


def test_fbc_skips_blocks_after_the_probe(pipes, dense_run):
    image, records = _cached(pipes["dense"], "fbc", FBC_SKIP)
    calls = _blocks_per_call(records)
    assert calls[0] == N_BLOCKS and 1 in calls  # a skipped call ran only the probe block 0
    assert all(r["blocks_run"] in ([0], list(range(N_BLOCKS))) for r in records)
    f = C.executed_flops(records, pipes["dense"])
    assert f.fraction < 0.8 and f.blocks_run == sum(calls)
    assert not np.array_equal(image, dense_run[0])


def test_taylorseer_skips_every_block_on_cached_steps(pipes):
    _, records = _cached(pipes["dense"], "taylorseer", TS_SKIP)
    # diffusers' schedule: compute below step 2, then every 2nd step from step 3 on
    assert _blocks_per_call(records) == [N_BLOCKS, N_BLOCKS, 0, N_BLOCKS, 0, N_BLOCKS, 0, N_BLOCKS]


def test_magcache_calibrates_on_the_fly_and_skips(pipes, dense_run):
    info = C.enable_cache(pipes["dense"], "magcache", num_inference_steps=STEPS, threshold=0.5)
    try:
        image, records = _run(pipes["dense"])
    finally:
        C.disable_cache(pipes["dense"])
    ratios = info["calibration"]["mag_ratios"]
    assert len(ratios) == STEPS and ratios[0] == 1.0 and info["settings"]["mag_ratios"] == ratios
    assert 0 in _blocks_per_call(records) and _blocks_per_call(records)[:2] == [
        N_BLOCKS,
        N_BLOCKS,
    ]  # retention 0.2 -> 2 steps
    assert not np.array_equal(image, dense_run[0])


@pytest.mark.parametrize("kind,settings", IDENTITY, ids=[k for k, _ in IDENTITY])
def test_cache_that_never_skips_is_dense_bit_for_bit(pipes, dense_run, kind, settings):
    image, records = _cached(pipes["dense"], kind, settings)
    assert _blocks_per_call(records) == [N_BLOCKS] * STEPS
    assert np.array_equal(image, dense_run[0])
    blocks = pipes["dense"].transformer.transformer_blocks
    assert all(
        "forward" not in b.__dict__ and "_diffusers_hook" not in b.__dict__ for b in blocks
    )  # disable_cache restored them
    assert np.array_equal(_run(pipes["dense"])[0], dense_run[0])


@pytest.mark.parametrize("kind,settings", [("fbc", FBC_SKIP), ("taylorseer", TS_SKIP)], ids=["fbc", "taylorseer"])
def test_cache_composes_with_shiva(pipes, kind, settings):
    alone, alone_rec = _cached(pipes["dense"], kind, settings)
    ratio0, ratio0_rec = _cached(pipes["r0"], kind, settings)
    assert np.array_equal(ratio0, alone) and _blocks_per_call(ratio0_rec) == _blocks_per_call(alone_rec)
    _, both = _cached(pipes["r4"], kind, settings)
    assert _blocks_per_call(both) == _blocks_per_call(alone_rec)  # same skip decisions on this model
    assert min(_blocks_per_call(both)) < N_BLOCKS
    ran = [r for r in both if len(r["blocks_run"]) > 1]
    assert ran and all(r["keep"][b] == 0.6 for r in ran for b in r["blocks_run"][1:])
    f_both = C.executed_flops(both, pipes["r4"]).fraction
    f_cache = C.executed_flops(alone_rec, pipes["dense"]).fraction
    _, shiva_rec = _run(pipes["r4"])
    assert f_both < min(f_cache, C.executed_flops(shiva_rec, pipes["r4"]).fraction)


def test_cache_state_is_reset_between_pipeline_calls(pipes):
    # TaylorSeer counts steps in its state: without the reset after each call, the third call would start at
    # step 16 and compute on other steps (FBC recomputes at step 0 anyway; MagCache resets itself at the last step)
    p = pipes["r4"]
    C.enable_cache(p, "taylorseer", **TS_SKIP)
    try:
        first, rec1 = _run(p)
        _run(p, "a blue sphere on a green floor")
        again, rec2 = _run(p)
    finally:
        C.disable_cache(p)
    assert np.array_equal(first, again) and _blocks_per_call(rec1) == _blocks_per_call(rec2)


def test_bad_kinds_settings_and_orders_raise_config_error(pipes):
    p = pipes["dense"]
    with pytest.raises(ConfigError, match="unknown"):
        C.enable_cache(p, "teacache")
    with pytest.raises(ConfigError, match="no setting"):
        C.enable_cache(p, "fbc", treshold=0.1)
    for kind, bad in [
        ("fbc", {"threshold": -0.1}),
        ("fbc", {"threshold": float("nan")}),
        ("taylorseer", {"cache_interval": 0}),
        ("taylorseer", {"disable_cache_before_step": 0}),
        ("taylorseer", {"cache_interval": 2.5}),
        ("taylorseer", {"factors_dtype": "fp8"}),
        ("magcache", {"retention_ratio": 1.5}),
        ("magcache", {"mag_ratios": [1.0, -2.0]}),
    ]:
        with pytest.raises(ConfigError, match="invalid"):
            C.enable_cache(p, kind, **bad)
    assert C.cache_info(p) is None
    with pytest.raises(ConfigError, match="no cache"):
        C.disable_cache(p)
    from shiva_export.prune.api import ShivaConfig, apply_shiva_, remove_shiva_

    C.enable_cache(p, "fbc")
    try:
        with pytest.raises(ConfigError, match="already on"):
            C.enable_cache(p, "taylorseer")
        with pytest.raises(ConfigError, match="disable_cache"):
            apply_shiva_(p.transformer, ShivaConfig.uniform(N_BLOCKS, 0.4))
    finally:
        C.disable_cache(p)
    C.enable_cache(pipes["r4"], "fbc")
    try:
        with pytest.raises(ConfigError, match="disable_cache"):
            remove_shiva_(pipes["r4"].transformer)
    finally:
        C.disable_cache(pipes["r4"])


def test_counter_refuses_hooks_it_cannot_sit_below(pipes):
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
    from diffusers.hooks.hooks import HookRegistry

    tr = pipes["dense"].transformer
    apply_first_block_cache(tr, FirstBlockCacheConfig(threshold=0.5))  # directly, not through enable_cache
    try:
        with pytest.raises(ConfigError, match="enable_cache"):
            with C.count_executed_blocks(pipes["dense"]):
                pass
    finally:
        reg = HookRegistry.check_if_exists_or_initialize(tr)
        for name in (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK):
            reg.remove_hook(name, recurse=True)
        for m in tr.modules():
            m.__dict__.pop("_diffusers_hook", None)
            m.__dict__.pop("forward", None)


def test_flux_pipeline_context_and_fbc():
    torch.set_num_threads(1)
    pipe = load_pipeline("flux-tiny", backend="torch", dense=True)
    ref = run_pipeline(pipe, "a red cube", steps=6, guidance=3.5, seed=1).image
    n = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    for threshold, identical in ((0.0, True), (1.0, False)):
        C.enable_cache(pipe, "fbc", threshold=threshold)
        assert pipe.transformer.is_cache_enabled  # diffusers' CacheMixin bookkeeping agrees
        try:
            with C.count_executed_blocks(pipe) as records:
                image = run_pipeline(pipe, "a red cube", steps=6, guidance=3.5, seed=1).image
        finally:
            C.disable_cache(pipe)
        assert np.array_equal(image, ref) == identical
        assert (_blocks_per_call(records) == [n] * 6) == identical
